"""GGUF files in real llama.cpp: next-token probabilities equal the stock model's, family by family.

transformers' GGUF reader derives some families' head size from the (sliced) embedding width,
so it cannot check them; llama.cpp itself can. It runs through npm's node-llama-cpp (prebuilt
CPU binaries), installed by scripts/setup.sh into the slicegpt cache.
"""

import shutil
from pathlib import Path

import pytest
import torch

import slicegpt
from slicegpt.formats.gguf import BLOCK, embedding_length, export_gguf, feed_forward_length
from slicegpt.formats.llama_cpp import run_node_script
from slicegpt.formats.loading import cache_dir
from conftest import TEXT, make_model

SAMPLE = TEXT[:300] + " -- 12345 world's ... \"ok?!\"  (yes)"  # punctuation runs, digits, spaces


def _runner() -> Path | None:
    home = cache_dir() / "node-llama-cpp"
    if shutil.which("node") and (home / "node_modules" / "node-llama-cpp").is_dir():
        return home
    return None


pytestmark = pytest.mark.skipif(_runner() is None, reason="node-llama-cpp not installed (scripts/setup.sh does it)")


def llama_cpp_run(path: Path, prompt: list[int], continuation: list[int], text: str = "") -> tuple[torch.Tensor, list]:
    """llama.cpp's next-token probabilities along prompt + continuation, and its tokens for `text`."""
    [result] = run_node_script("llama_cpp_batch.mjs", [dict(file=str(path.resolve()), prompt=prompt,
                                                            continuation=continuation, text=text)], timeout=300)
    return torch.tensor(result["probs"], dtype=torch.float64), result["tokens"]


GEMMA3_GLOBAL_EVERY_6 = dict(num_hidden_layers=6, layer_types=["sliding_attention"] * 5 + ["full_attention"])
# the default recipe: MLP neurons alone meet it, the stream unrotated; the family's layers, each MLP
# keeping its own measured count (an array of feed_forward_length in the file where they differ)
DEFAULT = dict(size=0.8)
UNIFORM = dict(slicing=0.25, neurons="off", rotation="uniform")  # the stream sliced with one basis
FAMILIES = {  # family -> (config overrides, slice_model settings)
    "llama": ({}, UNIFORM),
    "mistral": ({}, DEFAULT),
    "qwen2": ({}, DEFAULT),
    "qwen3": ({}, DEFAULT),
    "phi3": ({"sliding_window": 32}, UNIFORM),  # written as llama with the context capped at the window
    "gemma": ({}, DEFAULT),
    # query_pre_attn_scalar 256 != head_dim 16: llama.cpp's fixed scale is folded into q_proj
    "gemma2": ({}, DEFAULT),
    "gemma3_text": (GEMMA3_GLOBAL_EVERY_6, DEFAULT),
    "mixtral": ({}, UNIFORM),
    "qwen3_moe": ({"norm_topk_prob": True}, dict(UNIFORM, accept_deviation=True)),
}


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_gguf_runs_in_llama_cpp_with_the_stock_models_probabilities(family, calibration, tokenizer, tmp_path):
    overrides, settings = FAMILIES[family]
    model = make_model(family, **overrides)
    stock, config = slicegpt.slice_model(model, tokenizer, calibration, progress=False, **settings)
    assert config.rotation == "uniform"
    if settings is DEFAULT:  # what the default recipe gives at this size: only neurons pruned
        assert config.mlp_neurons < config.mlp_neurons_dense and set(config.widths) == {config.hidden_size}
        assert config.allocation == "measured" and sum(config.mlp_neurons_per_layer) == (
            config.mlp_neurons * len(config.mlp_neurons_per_layer))
        assert config.standard == (len(set(config.mlp_neurons_per_layer)) == 1)
    else:
        assert config.standard
    # a neutral name: llama.cpp looks for Phi-3 chat tokens when the name says phi3, and the test tokenizer has none
    path = export_gguf(stock, tokenizer, tmp_path / f"{family}.gguf", dtype="f32", name="slicegpt test model")
    if family in ("llama", "phi3"):  # a uniform slice of the stream (48 of 64), padded back to a whole block
        assert config.sliced_hidden_size == 48 and embedding_length(path) == 64
    if settings is DEFAULT and not config.standard:  # each layer's MLP its own width
        from gguf import GGUFReader

        arch = GGUFReader(str(path)).fields["general.architecture"].contents()
        padded = [-(-n // BLOCK) * BLOCK for n in config.mlp_neurons_per_layer]  # zero neurons to whole blocks
        if family in ("mistral", "qwen2"):  # llama.cpp's deci: one feed_forward_length per layer
            assert arch == "deci" and feed_forward_length(path) == padded
        else:  # one width in the architecture: zero neurons pad the narrower MLPs
            assert arch != "deci" and feed_forward_length(path) == max(padded)
    if family == "phi3":
        from gguf import GGUFReader

        fields = GGUFReader(str(path)).fields
        assert fields["general.architecture"].contents() == "llama"
        assert fields["llama.context_length"].contents() == 32
    ids = calibration.input_ids[0, :24].tolist()
    prompt, continuation = ids[:16], ids[16:]
    with torch.no_grad():
        expected = torch.softmax(stock(torch.tensor([ids])).logits[0, 15:].double(), -1)
    got, tokens = llama_cpp_run(path, prompt, continuation, SAMPLE)
    assert got.shape == expected.shape
    assert (got - expected).abs().max() < 1e-4, family
    assert tokens == tokenizer(SAMPLE)["input_ids"]  # the tokenizer went in too (GPT-2 word splitting)


def _log_probability_gap(model, path: Path, calibration) -> float:
    """The largest difference between llama.cpp's next-token log-probabilities from the file at `path` and
    the model's, along 8 tokens after a 16-token prompt of the first calibration window."""
    ids = calibration.input_ids[0, :24].tolist()
    with torch.no_grad():
        expected = torch.softmax(model(torch.tensor([ids])).logits[0, 15:].double(), -1)
    got, _ = llama_cpp_run(path, ids[:16], ids[16:])
    return float((got.log() - expected.log()).abs().max())


PADDED_STREAMS = {  # family -> config overrides: a stream of 40, not whole 32-value blocks
    "qwen3": {},
    "qwen3 tied": {"tie_word_embeddings": True},  # the head reads the scaled embedding table
    "gemma": {},  # llama.cpp scales the embedding by sqrt(width) itself
    "gemma2": {},  # branch-output norms after the attention and the MLP
    "gemma3_text": GEMMA3_GLOBAL_EVERY_6,  # and per-head q/k norms sharing the epsilon
}


@pytest.mark.parametrize("case", sorted(PADDED_STREAMS))
def test_a_stream_padded_to_whole_blocks_runs_in_llama_cpp_with_the_models_probabilities(case, calibration,
                                                                                          tokenizer, tmp_path):
    """A stream 40 wide is written 64 wide (zero dimensions, the stream scaled by sqrt(64/40) where it is
    written and the norms' gains divided by it): llama.cpp's qwen3 and Gemma graphs, whose epsilon the per-head
    norms share and whose embedding scale follows the written width, compute what the model does."""
    family = case.split()[0]
    model = make_model(family, hidden_size=40, **PADDED_STREAMS[case])
    path = export_gguf(model, tokenizer, tmp_path / "padded.gguf", dtype="f32", name="slicegpt test model")
    assert embedding_length(path) == 64
    # in log space: a tiny random model's probabilities are all near 1/300 (the embedding scaled wrongly
    # moves them by 2-4e-2 here, llama.cpp's own float32 arithmetic by about 1e-3)
    assert _log_probability_gap(model, path, calibration) < 5e-3, case


def test_a_gemma2_stream_stays_unpadded_where_llama_cpp_scales_queries_by_the_width(calibration, tokenizer,
                                                                                     tmp_path):
    """llama.cpp takes a Gemma 2 of 46 layers for the 27B model and scales its queries by width / heads: a
    padded width would change that scale, so such a stream is written as it is (40 wide), and llama.cpp
    still computes the model's probabilities."""
    model = make_model("gemma2", hidden_size=40, head_dim=8, num_hidden_layers=46,
                       layer_types=["sliding_attention", "full_attention"] * 23)
    path = export_gguf(model, tokenizer, tmp_path / "big.gguf", dtype="f32", name="slicegpt test model")
    assert embedding_length(path) == 40
    assert _log_probability_gap(model, path, calibration) < 5e-3


def test_llama_cpp_perplexity_script_equals_pytorchs_on_the_same_windows(calibration, tokenizer, tmp_path):
    """bench/gguf_quant.py's measure: every window in one batch, only the next token's logit read back."""
    model = make_model("llama")
    path = export_gguf(model, tokenizer, tmp_path / "m.gguf", dtype="f32", name="slicegpt test model")
    windows = calibration.input_ids[:3, :20]
    with torch.no_grad():
        logits = model(windows).logits[:, :-1].double()
    nll = -torch.log_softmax(logits, -1).gather(-1, windows[:, 1:, None]).sum().item()
    [result] = run_node_script("llama_cpp_perplexity.mjs", {"files": [str(path)], "windows": windows.tolist(),
                                                             "threads": 1}, timeout=300)
    assert result["tokens"] == 3 * 19
    assert result["nll"] == pytest.approx(nll, rel=1e-4)


def _bpe_tokenizer(pre_tokenizer: str):
    """A byte-level BPE trained with one of the word splitters llama.cpp names, on text with digit runs."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    from slicegpt.formats.gguf import _LLAMA3_SPLIT

    byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=pre_tokenizer == "gpt-2")
    if pre_tokenizer != "gpt-2":
        pattern = _LLAMA3_SPLIT if pre_tokenizer == "llama-bpe" else _LLAMA3_SPLIT.replace(r"\p{N}{1,3}", r"\p{N}")
        byte_level = pre_tokenizers.Sequence([pre_tokenizers.Split(Regex(pattern), behavior="isolated"), byte_level])
    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer, tok.decoder = byte_level, decoders.ByteLevel()
    numbers = " ".join(str(n * 7919 % 100000) for n in range(3000))
    trainer = trainers.BpeTrainer(vocab_size=600, special_tokens=["<unk>", "<s>", "</s>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator([TEXT, TEXT.upper(), numbers], trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>")


def test_llama_cpp_splits_words_like_the_tokenizer_json_it_was_named_from(tmp_path):
    """gpt-2, llama-bpe (Llama 3: digits in threes, any-case contractions) and qwen2 (single digits)."""
    from gguf import GGUFReader

    text = SAMPLE + " 1234567 in 1599, 20245 MEN'S WORLD'S\n\n  x\t 42"
    seen = {}
    for pre in ("gpt-2", "llama-bpe", "qwen2"):
        tokenizer = _bpe_tokenizer(pre)
        model = make_model("llama", vocab_size=len(tokenizer))
        path = export_gguf(model, tokenizer, tmp_path / f"{pre}.gguf", dtype="f32", name="slicegpt test model")
        assert GGUFReader(str(path)).fields["tokenizer.ggml.pre"].contents() == pre
        _, tokens = llama_cpp_run(path, [1], [], text)
        expected = tokenizer(text)["input_ids"]
        assert tokens == expected, pre
        seen[pre] = [tokenizer.convert_ids_to_tokens(i) for i in expected]
    assert len({tuple(t) for t in seen.values()}) == 3  # the splitters really differ on this text


QUANTIZED_TYPES = ("bf16", "q8_0", "q4_0", "q4_k_m")
# Mean KL(stock model || llama.cpp file) per position, teacher-forced along 8 tokens. Largest over the
# families, measured 2026-12-03: bf16 1.7e-5, q8_0 9.0e-5, q4_0 1.6e-2, q4_k_m 2.5e-3 (two random tiny
# models of one family differ by 0.03-0.1, so the 4-bit bound alone is loose; hence DEQUANTIZED_KL).
KL_TOLERANCE = {"bf16": 1e-4, "q8_0": 5e-4, "q4_0": 5e-2, "q4_k_m": 1e-2}
# llama.cpp against transformers' dequantization of the same file: the weights agree, what is left is
# llama.cpp's arithmetic (activations rounded to q8 for block types). Measured up to 1.9e-5 (q4_k_m),
# against 1.6e-3 to 2.0e-3 for the same 4-bit files against the unquantized model.
DEQUANTIZED_KL = 1e-4
PRUNED = 77  # a neuron-pruned width, as the default recipe leaves it: not whole 32-value blocks


def llama_cpp_batch(jobs: list[dict]) -> list[dict]:
    """Run llama_cpp_batch.mjs on `jobs` in one llama.cpp process."""
    return run_node_script("llama_cpp_batch.mjs", jobs, timeout=600)


def _check_types(path: Path, dtype: str) -> None:
    """general.file_type names the type; matrices are quantized except where llama.cpp needs more."""
    from gguf import GGUFReader, LlamaFileType

    from slicegpt.formats.gguf import QUANTIZED, WRITTEN

    reader = GGUFReader(str(path))
    assert reader.fields["general.file_type"].contents() == LlamaFileType[{**WRITTEN, **QUANTIZED}[dtype]].value
    for t in reader.tensors:
        kind = t.tensor_type.name.lower()
        if len(t.shape) == 1 or t.name.endswith("_norm.weight") or ".ffn_gate_inp." in t.name:
            assert kind == "f32", t.name
        elif dtype == "bf16":
            assert kind == "bf16", t.name
        elif t.shape[0] % 32:  # GGUF shapes list the row length first; rows of part of a block
            assert kind == "f16", t.name
        elif dtype == "q8_0":
            assert kind == "q8_0", t.name
        else:
            assert kind.startswith(("q4", "q5", "q6", "q8")), t.name


def _stock_models(tokenizer, calibration) -> dict:
    """One stock model per family: the default recipe's (llama) and a uniform slice (phi3) really
    sliced, the others dense with the shape the default recipe leaves (fewer MLP neurons), a
    256-wide Llama whose rows are whole k-quant blocks, and a Llama with attention heads pruned."""
    models = {"llama-256": make_model("llama", hidden_size=256, intermediate_size=512, num_attention_heads=16,
                                      num_key_value_heads=8)}  # head size 16 = width / heads, as transformers reads it
    for family, (overrides, settings) in FAMILIES.items():
        if family in ("llama", "phi3"):
            settings = DEFAULT if family == "llama" else UNIFORM
            models[family] = slicegpt.slice_model(make_model(family, **overrides), tokenizer, calibration,
                                                  progress=False, **settings)[0]
        else:
            models[family] = make_model(family, **overrides, intermediate_size=PRUNED)
    models["llama-heads"] = slicegpt.slice_model(make_model("llama"), tokenizer, calibration, progress=False,
                                                 size=0.8, heads="1x2")[0]  # a key/value group pruned
    assert models["llama-heads"].config.num_key_value_heads == 1
    assert models["llama"].config.intermediate_size % 32  # the default recipe's neurons: padded to whole blocks
    return models


def _dequantized_log_probs(path: Path, ids: list[int]) -> torch.Tensor:
    """transformers' reading of a GGUF file (dequantized to float32): the model the file holds."""
    from transformers import AutoModelForCausalLM

    back = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=torch.float32)
    with torch.no_grad():
        return torch.log_softmax(back(torch.tensor([ids])).logits[0, 15:].double(), -1)


def test_quantized_gguf_files_of_every_family_load_and_generate_in_llama_cpp(calibration, tokenizer, tmp_path):
    """bf16, q8_0, q4_0 and q4_k_m files: types as llama.cpp wants them, close to the model, generating."""
    from slicegpt.formats.gguf import tensor_types

    ids = calibration.input_ids[0, :24].tolist()
    jobs, expected = [], {}
    for family, stock in _stock_models(tokenizer, calibration).items():
        with torch.no_grad():
            expected[family] = torch.log_softmax(stock(torch.tensor([ids])).logits[0, 15:].double(), -1)
        for dtype in QUANTIZED_TYPES:
            path = export_gguf(stock, tokenizer, tmp_path / f"{family}-{dtype}.gguf", dtype=dtype,
                               name="slicegpt test model")
            _check_types(path, dtype)
            if family == "llama-256":  # the same weights as the file: what is left is llama.cpp's arithmetic
                expected[path.name] = _dequantized_log_probs(path, ids)
            jobs.append(dict(file=str(path), prompt=ids[:16], continuation=ids[16:], generate=4,
                             family=family, dtype=dtype))
    assert {"q4_k", "q6_k"} <= set(tensor_types(tmp_path / "llama-256-q4_k_m.gguf"))
    for job, result in zip(jobs, llama_cpp_batch(jobs)):
        probs = torch.tensor(result["probs"], dtype=torch.float64)
        reference = expected[job["family"]]
        kl = (reference.exp() * (reference - probs.clamp_min(1e-30).log())).sum(-1).mean().item()
        assert kl < KL_TOLERANCE[job["dtype"]], (job["family"], job["dtype"], kl)
        if Path(job["file"]).name in expected:
            own = expected[Path(job["file"]).name]
            kl_own = (own.exp() * (own - probs.clamp_min(1e-30).log())).sum(-1).mean().item()
            assert kl_own < DEQUANTIZED_KL, (job["dtype"], kl_own)
        assert len(result["generated"]) == 4 and result["generated"][0] == int(probs[0].argmax())
