"""Uniform rotation: one basis, no skip matrices, a stock model that plain transformers and GGUF load."""

import math

import pytest
import torch

import slicegpt
from slicegpt.api import make_standard
from slicegpt.adapters import get_adapter
from slicegpt.errors import SliceGPTError
from slicegpt.modeling.runtime import sliced_structure
from slicegpt.formats.gguf import export_gguf
from slicegpt.core.engine import slice_uniform
from slicegpt.core.onload import ResidentModel
from slicegpt.formats.standard import to_standard
from conftest import FAMILIES, TEXT, clone, make_model

EXACT = ["gemma", "llama", "mistral", "mixtral", "phi", "phi3", "qwen2", "qwen2_moe"]
APPROXIMATE = ["gemma2", "gemma3_text", "qwen3", "qwen3_moe"]
BLOCKED = ["gpt2", "gpt_neox", "gpt_neox_sequential", "opt", "opt_project"]

# how the stream is sliced: the default recipe without MLP neurons (neurons: test_mlp.py)
STREAM = dict(neurons="off")


def test_every_family_is_classified():
    assert sorted(EXACT + APPROXIMATE + BLOCKED) == FAMILIES


def _ids(n=3, length=24, seed=1):
    torch.manual_seed(seed)
    return torch.randint(3, 300, (n, length))


@pytest.mark.parametrize("family", FAMILIES)
def test_uniform_rotation_without_slicing_is_exact(family, exact_norms):
    model = make_model(family, torch.float64)
    ids = _ids()
    expected = model(ids).logits
    adapter = get_adapter(model.config)
    hidden = model.get_submodule(adapter.embeddings[0]).weight.shape[1]  # the residual width
    slice_uniform(ResidentModel(model), adapter, [(ids, torch.ones_like(ids))], hidden, progress=False)
    layer = model.get_submodule(adapter.layers)[0]
    assert not [n for n, _ in layer.named_parameters() if "shortcut" in n]
    assert torch.allclose(model(ids).logits, expected, atol=1e-8, rtol=0)


@pytest.mark.parametrize("family", EXACT)
def test_standard_model_equals_the_sliced_model_and_loads_with_plain_transformers(family, exact_norms, calibration,
                                                                                   tokenizer, tmp_path):
    from transformers import AutoModelForCausalLM

    model = make_model(family, torch.float64)
    sliced, config = slicegpt.slice_model(model, tokenizer, calibration, slicing=0.25, **STREAM, rotation="uniform",
                                          standard=False,
                                          progress=False)
    ids = calibration.input_ids[:2, :32]
    expected = sliced(ids).logits
    stock = make_standard(sliced, config, sample=ids)
    assert type(stock).__module__.startswith("transformers.models.")
    assert sliced_structure(stock) is None and "slicegpt" not in stock.config.to_dict()
    assert stock.get_input_embeddings().weight.shape[1] == config.sliced_hidden_size == 48
    # Gemma's stock embedding scale sqrt(d') is a float32 buffer: 1e-8 relative rounding
    tolerance = 1e-7 if family == "gemma" else 1e-10
    assert config.standard and config.deviations == [] and config.max_logit_deviation < tolerance
    assert torch.allclose(stock(ids).logits, expected, atol=tolerance, rtol=0)
    assert config.parameters_sliced == slicegpt.count_parameters(stock) < config.parameters_dense
    _assert_readers_equalized(stock)

    out = slicegpt.save(stock, tokenizer, config, tmp_path / family)
    assert not (out / "modeling_slicegpt.py").exists()
    plain = AutoModelForCausalLM.from_pretrained(out)  # no trust_remote_code, no slicegpt
    if family in ("mixtral", "qwen2_moe"):
        plain.set_experts_implementation("eager")  # grouped_mm has no float64 kernel
    assert plain.get_input_embeddings().weight.shape[1] == 48
    assert torch.allclose(plain(ids).logits, expected, atol=tolerance, rtol=0)
    again = slicegpt.load(out)
    if family in ("mixtral", "qwen2_moe"):
        again.model.set_experts_implementation("eager")
    assert again.sliced["slicing"]["standard"] and torch.equal(again.model(ids).logits, plain(ids).logits)
    prompt = ids[:1, :6]
    cached = plain.generate(prompt, max_new_tokens=8, do_sample=False, pad_token_id=0)
    uncached = plain.generate(prompt, max_new_tokens=8, do_sample=False, use_cache=False, pad_token_id=0)
    assert torch.equal(cached, uncached)


def _assert_readers_equalized(stock):
    """The norm gains live in the norms again: every plain reader column has RMS 1 (quantizes well)."""
    adapter = get_adapter(stock.config)
    checked = 0
    for layer in stock.get_submodule(adapter.layers):
        for norm in adapter.norm_names():
            paths = [p for b in adapter.branches if b.norm == norm for p in b.inputs]
            if any(ch in p for p in paths for ch in "?*"):
                continue
            columns = torch.cat([layer.get_submodule(p).weight.to(torch.float64) for p in paths])
            assert torch.allclose(columns.pow(2).mean(dim=0).sqrt(), torch.ones(columns.shape[1], dtype=torch.float64))
            checked += 1
    assert checked


@pytest.mark.parametrize("family", BLOCKED)
def test_families_whose_stock_class_ties_attention_to_the_width_are_refused_before_slicing(family, calibration):
    model = make_model(family)
    before = {n: p.clone() for n, p in model.named_parameters()}
    with pytest.raises(SliceGPTError, match="attention width .* cannot have a sliced hidden size.*per-layer"):
        slicegpt.slice_model(model, None, calibration, slicing=0.25, **STREAM, rotation="uniform", progress=False)
    assert all(torch.equal(p, before[n]) for n, p in model.named_parameters())


@pytest.mark.parametrize("family", APPROXIMATE)
def test_approximate_families_need_accept_deviation_and_report_it(family, calibration):
    model = make_model(family)
    with pytest.raises(SliceGPTError, match="cannot compute the sliced model exactly.*--accept-deviation"):
        slicegpt.slice_model(clone(model), None, calibration, slicing=0.25, **STREAM, rotation="uniform",
                             progress=False)
    stock, config = slicegpt.slice_model(model, None, calibration, slicing=0.25, **STREAM, rotation="uniform",
                                         accept_deviation=True, progress=False)
    assert config.standard and config.deviations
    assert config.max_logit_deviation is not None and config.max_logit_deviation > 0
    assert sliced_structure(stock) is None and "slicegpt" not in stock.config.to_dict()
    # the exact uniform model is still available without the standard conversion
    exact, exact_config = slicegpt.slice_model(make_model(family), None, calibration, slicing=0.25, **STREAM,
                                               rotation="uniform",
                                               standard=False, progress=False)
    assert not exact_config.standard and sliced_structure(exact)["structure"]["rotation"] == "uniform"


def test_per_layer_models_have_no_standard_form(calibration):
    model, _ = slicegpt.slice_model(make_model("llama"), None, calibration, slicing=0.25, **STREAM, progress=False)
    with pytest.raises(SliceGPTError, match="only a model sliced with --rotation uniform"):
        to_standard(model)
    with pytest.raises(SliceGPTError, match="--rotation uniform"):
        export_gguf(model, None, "unused.gguf")


def test_layernorm_basis_makes_kept_coordinates_sum_to_zero(calibration):
    """Phi: a stock LayerNorm on the sliced stream must subtract a zero mean."""
    model = make_model("phi", torch.float64)
    seen = []
    stock, config = slicegpt.slice_model(model, None, calibration, slicing=0.25, **STREAM, rotation="uniform",
                                         progress=False)
    assert isinstance(stock.model.final_layernorm, torch.nn.LayerNorm)
    hook = stock.model.layers[1].input_layernorm.register_forward_hook(lambda m, i, o: seen.append(i[0]))
    stock(calibration.input_ids[:2, :32])
    hook.remove()
    stream = seen[0]
    assert stream.shape[-1] == 48
    assert stream.sum(-1).abs().max() < 1e-9 * stream.abs().max()


def _final_gain(model, value=None):
    norm = model.model.norm
    if value is not None:
        with torch.no_grad():
            norm.weight.fill_(value)
    return norm.weight


def test_tied_head_stays_tied_only_when_exact_and_fit_is_opt_in(calibration, exact_norms):
    V, k = 300, 48
    ids = calibration.input_ids[:2, :32]
    # non-uniform final gain: untied (costs V x k parameters), exact
    untied, cu = slicegpt.slice_model(make_model("llama", torch.float64), None, calibration, slicing=0.25, **STREAM,
                                      rotation="uniform", progress=False)
    assert not untied.config.tie_word_embeddings and not cu.tied_head
    assert untied.lm_head.weight.shape == (V, k) and untied.lm_head.weight is not untied.model.embed_tokens.weight
    # fitted: tied again, V x k fewer parameters, the final gain is a fitted diagonal
    fitted, cf = slicegpt.slice_model(make_model("llama", torch.float64), None, calibration, slicing=0.25, **STREAM,
                                      rotation="uniform", head="fit", progress=False)
    assert fitted.config.tie_word_embeddings and cf.tied_head and cf.fit_tied_head
    assert fitted.lm_head.weight is fitted.model.embed_tokens.weight
    assert cu.parameters_sliced - cf.parameters_sliced == V * k
    assert not torch.allclose(fitted(ids).logits, untied(ids).logits, atol=1e-6)
    # uniform final gain: stays tied and exact (same function as the untied slicing)
    dense = make_model("llama", torch.float64)
    _final_gain(dense, 1.0)
    reference, _ = slicegpt.slice_model(clone(dense), None, calibration, slicing=0.25, **STREAM, rotation="uniform",
                                        standard=False, progress=False)
    tied, ct = slicegpt.slice_model(dense, None, calibration, slicing=0.25, **STREAM, rotation="uniform",
                                    progress=False)
    assert ct.tied_head and tied.lm_head.weight is tied.model.embed_tokens.weight
    assert torch.allclose(tied(ids).logits, reference(ids).logits, atol=1e-10, rtol=0)
    with pytest.raises(SliceGPTError, match="not tied"):
        slicegpt.slice_model(make_model("qwen2"), None, calibration, slicing=0.25, **STREAM, rotation="uniform",
                             head="fit", progress=False)
    with pytest.raises(SliceGPTError, match="uniform only"):
        slicegpt.slice_model(make_model("llama"), None, calibration, slicing=0.25, **STREAM, head="fit",
                             progress=False)


@pytest.mark.parametrize("family", ["llama", "mistral", "gemma2"])
@pytest.mark.parametrize("dtype,tolerance", [("f32", 1e-5), ("f16", 2e-3)])
def test_gguf_export_loads_back_through_transformers(family, dtype, tolerance, calibration, tokenizer, tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    # transformers' reader takes query_pre_attn_scalar from its default (256), llama.cpp from head_dim: real
    # Gemmas have both equal; tests/test_llama_cpp.py checks the fold that exports other values for llama.cpp
    overrides = {"head_dim": 256} if family == "gemma2" else {}
    stock, config = slicegpt.slice_model(make_model(family, **overrides), tokenizer, calibration, slicing=0.25,
                                         **STREAM,
                                         rotation="uniform", accept_deviation=family == "gemma2",
                                         head="fit" if family == "gemma2" else None, progress=False)
    path = export_gguf(stock, tokenizer, tmp_path / "model.gguf", dtype=dtype)
    back = AutoModelForCausalLM.from_pretrained(tmp_path, gguf_file=path.name, dtype=torch.float32)
    # the sliced stream of 48 is written padded to a whole block of 64
    assert back.config.hidden_size == 64
    assert back.config.head_dim == (256 if family == "gemma2" else 16)
    ids = calibration.input_ids[:2, :32]
    expected = stock(ids).logits
    scale = expected.abs().max()
    assert (back(ids).logits - expected).abs().max() <= tolerance * scale
    back_tokenizer = AutoTokenizer.from_pretrained(tmp_path, gguf_file=path.name)
    assert back_tokenizer(TEXT[:400])["input_ids"] == tokenizer(TEXT[:400])["input_ids"]
    with pytest.raises(SliceGPTError, match="already exists"):
        export_gguf(stock, tokenizer, path)


def test_every_output_kind_loads_with_slicegpt_and_transformers(calibration, tokenizer, tmp_path, monkeypatch):
    """Per-layer and exact-uniform directories (slicegpt format), standard directories, GGUF files."""
    from transformers import AutoModelForCausalLM

    monkeypatch.setenv("SLICEGPT_CACHE", str(tmp_path / "cache"))
    ids = calibration.input_ids[:2, :32]
    per_layer, c1 = slicegpt.slice_model(make_model("llama"), tokenizer, calibration, slicing=0.25, **STREAM,
                                         progress=False)
    exact, c2 = slicegpt.slice_model(make_model("gemma2"), tokenizer, calibration, slicing=0.25, **STREAM,
                                     rotation="uniform",
                                     standard=False, progress=False)
    stock, c3 = slicegpt.slice_model(make_model("llama"), tokenizer, calibration, slicing=0.25, **STREAM,
                                     rotation="uniform",
                                     progress=False)
    for name, model, config in [("per-layer", per_layer, c1), ("exact-uniform", exact, c2), ("standard", stock, c3)]:
        out = slicegpt.save(model, tokenizer, config, tmp_path / name)
        assert all(f.stat().st_mode & 0o777 == 0o644 for f in out.iterdir())  # safetensors writes 0600
        expected = model(ids).logits
        for loaded in (slicegpt.load(out).model, slicegpt.load_model(out).model,
                       AutoModelForCausalLM.from_pretrained(out, trust_remote_code=True)):
            assert torch.allclose(loaded(ids).logits, expected, atol=1e-5), name
    gguf = export_gguf(stock, tokenizer, tmp_path / "standard.gguf", dtype="f32")
    from_gguf = slicegpt.load_model(gguf)  # dequantized once into the cache, like any GGUF model
    cached = [p for p in (tmp_path / "cache" / "gguf").iterdir()]
    assert len(cached) == 1 and cached[0].stat().st_mode & 0o777 == 0o755  # whole, not private
    assert torch.allclose(from_gguf.model(ids).logits, stock(ids).logits, atol=1e-5)


def test_gguf_export_refuses_what_llama_cpp_cannot_run(calibration, tmp_path):
    for family, overrides, why in [
        ("phi", {}, "llama.cpp's phi2 sizes the attention projections by the embedding width"),
        ("qwen2_moe", {"mlp_only_layers": []}, "llama.cpp's qwen2moe sizes the attention projections"),
        ("qwen3_moe", {}, "llama.cpp's qwen3moe renormalises the top-k routing weights.*norm_topk_prob is False"),
        ("gemma3_text", {}, "llama.cpp's gemma3 makes every 6th layer global"),
        ("phi3", {"partial_rotary_factor": 0.5}, "rotates only part of each head"),
    ]:
        model = make_model(family, **overrides)
        if "partial_rotary_factor" in overrides:
            model.config.rope_parameters["partial_rotary_factor"] = 0.5
        stock, _ = slicegpt.slice_model(model, None, calibration, slicing=0.25, **STREAM, rotation="uniform",
                                        accept_deviation=True,
                                        progress=False)
        with pytest.raises(SliceGPTError, match=why):
            export_gguf(stock, None, tmp_path / f"{family}.gguf")
    untied, _ = slicegpt.slice_model(make_model("gemma2"), None, calibration, slicing=0.25, **STREAM,
                                     rotation="uniform",
                                     accept_deviation=True, progress=False)
    with pytest.raises(SliceGPTError, match="no separate head matrix.*--head fit"):
        export_gguf(untied, None, tmp_path / "g.gguf")
    assert not list(tmp_path.iterdir())


def test_uniform_perplexity_is_finite_and_param_count_honest(calibration):
    stock, config = slicegpt.slice_model(make_model("llama"), None, calibration, slicing=0.5, **STREAM,
                                         rotation="uniform",
                                         progress=False)
    assert config.sliced_hidden_size == 32 and config.rotation == "uniform"
    assert config.parameters_sliced == sum(p.numel() for p in {id(p): p for p in stock.parameters()}.values())
    assert math.isfinite(slicegpt.perplexity(stock, calibration, progress=False))


def test_gemma3_gguf_export_stores_llama_cpp_norms_and_loads_back(calibration, tokenizer, tmp_path):
    """Gemma 3 (approximate standard form, accepted): norms as 1 + w, sliding window, head dim."""
    import transformers as t
    from gguf import GGUFReader

    config = t.Gemma3TextConfig(vocab_size=300, hidden_size=64, intermediate_size=96, num_hidden_layers=6,
                                num_attention_heads=4, num_key_value_heads=2, head_dim=256, max_position_embeddings=256,
                                pad_token_id=0, bos_token_id=1, eos_token_id=2, sliding_window=8)
    torch.manual_seed(0)
    model = t.AutoModelForCausalLM.from_config(config).eval()  # default layer pattern: what GGUF readers assume
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.copy_(0.3 * torch.randn_like(p))
    stock, _ = slicegpt.slice_model(model, tokenizer, calibration, slicing=0.25, **STREAM, rotation="uniform",
                                    accept_deviation=True,
                                    progress=False)
    path = export_gguf(stock, tokenizer, tmp_path / "gemma3.gguf", dtype="f32", pad_stream_to=0)
    reader = GGUFReader(str(path))
    assert reader.fields["gemma3.embedding_length"].contents() == 48
    assert reader.fields["gemma3.attention.key_length"].contents() == 256  # = query_pre_attn_scalar, as in real Gemmas
    assert reader.fields["gemma3.attention.sliding_window"].contents() == 8
    norm = next(x for x in reader.tensors if x.name == "blk.0.attn_norm.weight")
    assert torch.allclose(torch.from_numpy(norm.data.copy()), stock.model.layers[0].input_layernorm.weight + 1)
    ids = calibration.input_ids[:2, :32]
    for written in (path, export_gguf(stock, tokenizer, tmp_path / "padded.gguf", dtype="f32")):
        back = t.AutoModelForCausalLM.from_pretrained(tmp_path, gguf_file=written.name, dtype=torch.float32)
        assert torch.allclose(back(ids).logits, stock(ids).logits, atol=1e-5)
    # by default the stream of 48 is padded to a whole block (zero dimensions, the stream scaled by sqrt(64/48))
    assert back.config.hidden_size == 64
