"""Write a standard (uniformly sliced) model as a GGUF file for llama.cpp.

Only a stock architecture has a GGUF layout, so per-layer sliced models are refused. The
layout follows llama.cpp's own converter: tensor names from the `gguf` package's name map
(`blk.N.attn_q.weight`, ...), for `llama` the q/k rows permuted from the Hugging Face rotary
layout to llama.cpp's interleaved one, for Gemma the norm weights stored as 1 + w (llama.cpp
multiplies by the stored weight), 1-D tensors kept in float32, and the head dimension written
out (`attention.key_length`, `rope.dimension_count`) because llama.cpp would otherwise
derive it from the (now sliced) embedding width.

The tokenizer goes in too: copied field for field from the source GGUF when the model came
from one (the embedded default does), otherwise built from the Hugging Face tokenizer's
byte-level BPE vocabulary and merges.
"""

from __future__ import annotations

import json
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

from slicegpt.errors import SliceGPTError

DTYPES = ("f16", "f32")


@dataclass(frozen=True)
class Layout:
    """How one family's stock model maps onto a llama.cpp architecture."""

    arch: str  # GGUF architecture name (gguf.MODEL_ARCH member, lower case)
    permute_qk: bool = False  # llama.cpp's llama rotary pairs adjacent rows
    norm_offset: float = 0.0  # Gemma computes x * (1 + w); llama.cpp stores 1 + w
    sliding_window: bool = False  # write attention.sliding_window


LAYOUTS = {
    "llama": Layout("llama", permute_qk=True),
    "mistral": Layout("llama", permute_qk=True),
    "gemma2": Layout("gemma2", norm_offset=1.0, sliding_window=True),
    "gemma3_text": Layout("gemma3", norm_offset=1.0, sliding_window=True),
}
ARCHITECTURES = tuple(LAYOUTS)


def _permute(w: torch.Tensor, heads: int) -> torch.Tensor:
    """Hugging Face's half-split rotary rows -> llama.cpp's interleaved pairs (its converter's permute)."""
    return w.reshape(heads, 2, w.shape[0] // heads // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def _rope_theta(config) -> float:
    theta = getattr(config, "rope_theta", None)
    params = getattr(config, "rope_parameters", None) or {}
    params = params.get("full_attention", params)  # Gemma 3: per attention type
    return float(theta if theta is not None else params.get("rope_theta", 10000.0))


def _tensors(model: nn.Module, layout: Layout) -> dict[str, torch.Tensor]:
    """GGUF name -> tensor, transformed the way llama.cpp's converter does."""
    from gguf import MODEL_ARCH, get_tensor_name_map

    config = model.config
    heads, kv_heads = config.num_attention_heads, config.num_key_value_heads or config.num_attention_heads
    names = get_tensor_name_map(MODEL_ARCH[layout.arch.upper()], config.num_hidden_layers)
    tied = getattr(config, "tie_word_embeddings", False)
    out = {}
    for key, t in model.state_dict().items():
        prefix, _, kind = key.rpartition(".")
        if tied and prefix == "lm_head":
            continue
        name = names.get_name(prefix)
        if name is None and prefix == "lm_head":
            raise SliceGPTError(f"llama.cpp's {layout.arch} has no separate head matrix (the head is the embedding "
                                "table), and this model's head is untied; slice it with --fit-tied-head")
        if name is None:
            raise SliceGPTError(f"no GGUF name for {key} in llama.cpp's {layout.arch} layout")
        if layout.permute_qk and prefix.endswith("self_attn.q_proj"):
            t = _permute(t, heads)
        elif layout.permute_qk and prefix.endswith("self_attn.k_proj"):
            t = _permute(t, kv_heads)
        if layout.norm_offset and t.dim() == 1 and prefix.endswith("norm") and kind == "weight":
            t = t + layout.norm_offset
        out[f"{name}.{kind}"] = t
    return out


def _source_tokenizer_fields(source_gguf: Path | None) -> list | None:
    """The tokenizer.* fields of the GGUF the model was converted from, if it is at hand."""
    if source_gguf is None or not source_gguf.is_file():
        return None
    from gguf import GGUFReader

    reader = GGUFReader(str(source_gguf))
    return [f for name, f in reader.fields.items() if name.startswith("tokenizer.")]


def _copy_field(writer, field) -> None:
    from gguf import GGUFValueType

    value = field.contents()
    kind = field.types[0]
    if kind == GGUFValueType.ARRAY:
        writer.add_key_value(field.name, value, kind, sub_type=field.types[-1])
    else:
        writer.add_key_value(field.name, value, kind)


def _write_tokenizer(writer, tokenizer, vocab_size: int) -> None:
    """Byte-level BPE vocabulary, merges and special ids from a Hugging Face fast tokenizer."""
    from gguf import TokenType

    backend = getattr(tokenizer, "backend_tokenizer", None)
    data = json.loads(backend.to_str()) if backend is not None else {}
    model = data.get("model", {})
    if model.get("type") != "BPE":
        raise SliceGPTError("GGUF export needs a byte-level BPE tokenizer (tokenizer.json) or the source GGUF")
    id_to_token = {i: t for t, i in model["vocab"].items()}
    added = {t["id"]: t for t in data.get("added_tokens", [])}
    for i, t in added.items():
        id_to_token[i] = t["content"]
    tokens, types = [], []
    for i in range(vocab_size):
        if i in added:
            tokens.append(added[i]["content"])
            types.append(TokenType.CONTROL if added[i].get("special") else TokenType.USER_DEFINED)
        elif i in id_to_token:
            tokens.append(id_to_token[i])
            types.append(TokenType.NORMAL)
        else:  # embedding rows beyond the tokenizer's vocabulary
            tokens.append(f"[PAD{i}]")
            types.append(TokenType.UNUSED)
    merges = [m if isinstance(m, str) else " ".join(m) for m in model.get("merges", [])]
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre("default")
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    writer.add_token_merges(merges)
    for name in ("bos", "eos", "unk", "pad"):
        token_id = getattr(tokenizer, f"{name}_token_id", None)
        if token_id is not None:
            getattr(writer, f"add_{name}_token_id")(token_id)
    writer.add_add_bos_token(bool(getattr(tokenizer, "add_bos_token", False)))
    template = getattr(tokenizer, "chat_template", None)
    if isinstance(template, str):
        writer.add_chat_template(template)


def export_gguf(model: nn.Module, tokenizer, out: str | os.PathLike, dtype: str = "f16",
                source_gguf: str | os.PathLike | None = None, force: bool = False, name: str = "") -> Path:
    """Write `model` (a stock model, e.g. from a uniform slice) as a GGUF file, atomically."""
    from gguf import GGMLQuantizationType, GGUFWriter, LlamaFileType

    if getattr(model, "slicegpt_structure", None) is not None:
        raise SliceGPTError("GGUF export needs a standard model, and this one has per-layer rotations "
                            "(skip-connection matrices); slice it with --rotation uniform")
    model_type = model.config.model_type
    if model_type not in LAYOUTS:
        raise SliceGPTError(f"GGUF export supports model types {', '.join(ARCHITECTURES)}; not {model_type}")
    layout = LAYOUTS[model_type]
    if dtype not in DTYPES:
        raise SliceGPTError(f"GGUF dtype must be one of {', '.join(DTYPES)}, got {dtype!r}")
    out = Path(out)
    if out.exists() and not force:
        raise SliceGPTError(f"{out} already exists; pass --force to overwrite it")
    config = model.config
    heads = config.num_attention_heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
    tensors = _tensors(model, layout)
    vocab_size = tensors["token_embd.weight"].shape[0]
    tokenizer_fields = _source_tokenizer_fields(Path(source_gguf) if source_gguf else None)

    out.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{out.name}.tmp-", dir=out.parent)
    os.close(fd)
    try:
        writer = GGUFWriter(tmp, layout.arch)
        writer.add_name(name or f"{model_type} sliced to {config.hidden_size}")
        writer.add_file_type(LlamaFileType.MOSTLY_F16 if dtype == "f16" else LlamaFileType.ALL_F32)
        writer.add_context_length(config.max_position_embeddings)
        writer.add_embedding_length(config.hidden_size)
        writer.add_block_count(config.num_hidden_layers)
        writer.add_feed_forward_length(config.intermediate_size)
        writer.add_head_count(heads)
        writer.add_head_count_kv(config.num_key_value_heads or heads)
        writer.add_key_length(head_dim)
        writer.add_value_length(head_dim)
        writer.add_rope_dimension_count(head_dim)
        writer.add_rope_freq_base(_rope_theta(config))
        writer.add_layer_norm_rms_eps(float(config.rms_norm_eps))
        if layout.sliding_window and getattr(config, "sliding_window", None):
            writer.add_sliding_window(int(config.sliding_window))
        for key in ("attn_logit_softcapping", "final_logit_softcapping"):  # Gemma 2
            if getattr(config, key, None):
                getattr(writer, f"add_{key}")(float(getattr(config, key)))
        writer.add_vocab_size(vocab_size)
        if tokenizer_fields:
            for field in tokenizer_fields:
                _copy_field(writer, field)
        else:
            _write_tokenizer(writer, tokenizer, vocab_size)
        for key, t in tensors.items():
            half = dtype == "f16" and t.dim() > 1
            array = t.detach().to(torch.float16 if half else torch.float32).cpu().numpy()
            writer.add_tensor(key, np.ascontiguousarray(array),
                              raw_dtype=GGMLQuantizationType.F16 if half else GGMLQuantizationType.F32)
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
        writer.close()
        os.chmod(tmp, 0o644)  # mkstemp makes it private
        os.replace(tmp, out)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return out
