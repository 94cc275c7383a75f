"""GGUF tensor types without llama.cpp: what stays f32/f16 in a quantized file, and f16 overflow refused.

tests/test_llama_cpp.py runs the same files in llama.cpp itself."""

import numpy as np
import pytest
import torch

from slicegpt.errors import SliceGPTError
from slicegpt.formats.gguf import export_gguf, tensor_types
from conftest import make_model


def _tensors(path) -> dict:
    from gguf import GGUFReader

    return {t.name: t for t in GGUFReader(str(path)).tensors}


def test_q8_0_file_keeps_norms_f32_and_partial_block_rows_f16_and_reads_back(tokenizer, tmp_path):
    """Rows of 77 (a neuron-pruned down projection) are not whole 32-value blocks: f16, as llama.cpp's converter."""
    from gguf import GGUFReader, LlamaFileType
    from transformers import AutoModelForCausalLM

    model = make_model("llama", intermediate_size=77)
    path = export_gguf(model, tokenizer, tmp_path / "m.gguf", dtype="q8_0", pad_neurons=0)
    tensors = _tensors(path)
    assert tensors["blk.0.ffn_down.weight"].tensor_type.name == "F16"
    assert tensors["blk.0.ffn_up.weight"].tensor_type.name == "Q8_0"
    assert tensors["blk.0.attn_norm.weight"].tensor_type.name == "F32"
    assert tensor_types(path) == {"q8_0": 19, "f32": 7, "f16": 3}
    fields = GGUFReader(str(path)).fields
    assert fields["general.file_type"].contents() == LlamaFileType.MOSTLY_Q8_0.value
    assert fields["general.quantization_version"].contents() == 2
    back = AutoModelForCausalLM.from_pretrained(tmp_path, gguf_file=path.name, dtype=torch.float32)
    ids = torch.tensor([[5, 17, 42, 99, 123, 7]])
    with torch.no_grad():
        expected, got = model(ids).logits, back(ids).logits
    assert 0 < (got - expected).abs().max() < 0.01 * expected.abs().max()  # quantized, and close


def test_f16_export_refuses_a_weight_beyond_float16_and_bf16_keeps_it(tokenizer, tmp_path):
    model = make_model("llama", intermediate_size=77)
    with torch.no_grad():
        model.model.layers[1].mlp.down_proj.weight[3, 5] = 1e5
    for dtype in ("f16", "q8_0", "q4_k_m"):  # the block types store these rows of 77 as f16
        with pytest.raises(SliceGPTError, match=r"^blk\.1\.ffn_down\.weight has values up to 1e\+05, beyond .*"
                                                r"\(±65504\).*--dtype bf16 or f32$"):
            export_gguf(model, tokenizer, tmp_path / f"{dtype}.gguf", dtype=dtype, pad_neurons=0)
        assert list(tmp_path.iterdir()) == []
    for dtype in ("bf16", "f32"):
        path = export_gguf(model, tokenizer, tmp_path / f"{dtype}.gguf", dtype=dtype)
        from gguf.quants import dequantize

        t = _tensors(path)["blk.1.ffn_down.weight"]
        values = dequantize(t.data, t.tensor_type) if dtype == "bf16" else np.asarray(t.data)
        assert np.isfinite(values).all() and values.max() == pytest.approx(1e5, rel=4e-3)


def test_neurons_padded_to_whole_blocks_change_nothing(tokenizer, tmp_path):
    """77 neurons are written as 96 (the 19 zero neurons add exactly nothing): the down projections
    quantize, llama.cpp is told 96, and the file computes what the model does (transformers reads
    it back here; tests/test_llama_cpp.py runs every family's padded files in llama.cpp)."""
    from transformers import AutoModelForCausalLM

    from slicegpt.formats.gguf import feed_forward_length

    model = make_model("llama", intermediate_size=77)
    path = export_gguf(model, tokenizer, tmp_path / "q8.gguf", dtype="q8_0")
    assert "f16" not in tensor_types(path)  # unpadded, the down projections stay f16 (the test above)
    assert feed_forward_length(path) == 96
    path = export_gguf(model, tokenizer, tmp_path / "f32.gguf", dtype="f32")
    down = _tensors(path)["blk.0.ffn_down.weight"]
    assert tuple(down.shape) == (96, model.config.hidden_size) and not np.asarray(down.data)[:, 77:].any()
    back = AutoModelForCausalLM.from_pretrained(tmp_path, gguf_file=path.name, dtype=torch.float32)
    assert back.config.intermediate_size == 96
    ids = torch.tensor([[5, 17, 42, 99, 123, 7]])
    with torch.no_grad():
        torch.testing.assert_close(back(ids).logits, model(ids).logits, rtol=1e-5, atol=1e-5)
    assert feed_forward_length(export_gguf(model, tokenizer, tmp_path / "off.gguf", pad_neurons=0)) == 77
    with pytest.raises(SliceGPTError, match="--pad-neurons must be 0 .off. or a positive number"):
        export_gguf(model, tokenizer, tmp_path / "bad.gguf", pad_neurons=-1)


def test_q8_0_holds_large_values_in_whole_blocks(tokenizer, tmp_path):
    """q8_0 keeps value / 127 as its float16 block scale, so 1e5 fits (in rows of whole blocks)."""
    from gguf.quants import dequantize

    model = make_model("llama")
    with torch.no_grad():
        model.model.layers[0].mlp.up_proj.weight[0, 0] = 1e5
    t = _tensors(export_gguf(model, tokenizer, tmp_path / "m.gguf", dtype="q8_0"))["blk.0.ffn_up.weight"]
    assert t.tensor_type.name == "Q8_0" and dequantize(t.data, t.tensor_type).max() == pytest.approx(1e5, rel=1e-3)


def test_llama_cpp_types_without_its_quantizer_are_refused_in_one_line(tokenizer, tmp_path, monkeypatch):
    monkeypatch.setenv("SLICEGPT_LIBLLAMA", str(tmp_path / "missing" / "libllama.so"))
    with pytest.raises(SliceGPTError, match="needs llama.cpp's quantizer: run scripts/llama_cpp_setup.sh"):
        export_gguf(make_model("llama"), tokenizer, tmp_path / "m.gguf", dtype="q4_k_m")
    assert list(tmp_path.iterdir()) == []


def test_a_sliced_stream_padded_to_whole_blocks_changes_nothing(tokenizer, tmp_path):
    """A stream of 40 (a uniform slice) is written as 64 zero-padded dimensions, scaled by a = sqrt(64/40) where
    it is written (embedding, attention output, down projection) and read through norm gains divided by a:
    every matrix quantizes, epsilon is unchanged, and the file computes what the model does (transformers reads
    it back here; tests/test_llama_cpp.py runs padded qwen3 and Gemma files in llama.cpp)."""
    from gguf import GGUFReader
    from transformers import AutoModelForCausalLM

    from slicegpt.formats.gguf import embedding_length

    model = make_model("llama", hidden_size=40, head_dim=16)  # 4 heads of 16: the attention keeps its width
    assert "f16" in tensor_types(export_gguf(model, tokenizer, tmp_path / "off.gguf", dtype="q8_0", pad_stream_to=0))
    assert "f16" not in tensor_types(export_gguf(model, tokenizer, tmp_path / "q8.gguf", dtype="q8_0"))
    path = export_gguf(model, tokenizer, tmp_path / "f32.gguf", dtype="f32")
    assert embedding_length(path) == 64 and embedding_length(tmp_path / "off.gguf") == 40
    tensors = {name: np.asarray(t.data) for name, t in _tensors(path).items()}
    assert tensors["token_embd.weight"].shape == (model.config.vocab_size, 64)
    assert not tensors["token_embd.weight"][:, 40:].any() and not tensors["blk.0.attn_output.weight"][40:].any()
    a = (64 / 40) ** 0.5
    gain = model.model.layers[0].input_layernorm.weight.detach().numpy()
    np.testing.assert_allclose(tensors["blk.0.attn_norm.weight"][:40], gain / a, rtol=1e-6)
    down = model.model.layers[0].mlp.down_proj.weight.detach().numpy()
    np.testing.assert_allclose(tensors["blk.0.ffn_down.weight"][:40], down * a, rtol=1e-6)
    eps = GGUFReader(str(path)).fields["llama.attention.layer_norm_rms_epsilon"].contents()
    assert eps == pytest.approx(model.config.rms_norm_eps, rel=1e-6)
    back = AutoModelForCausalLM.from_pretrained(tmp_path, gguf_file=path.name, dtype=torch.float32)
    ids = torch.tensor([[5, 17, 42, 99, 123, 7]])
    with torch.no_grad():
        torch.testing.assert_close(back(ids).logits, model(ids).logits, rtol=1e-5, atol=1e-5)
    with pytest.raises(SliceGPTError, match=r"^--pad-stream must be 0 \(off\) or a positive number of dimensions"):
        export_gguf(model, tokenizer, tmp_path / "bad.gguf", pad_stream_to=-1)
