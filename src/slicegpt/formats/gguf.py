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

Tensor types follow llama.cpp. f32, f16, bf16 and q8_0 are written here, as its converter
(convert_hf_to_gguf.py) writes them: 1-D tensors, norms, biases and MoE routers stay float32,
and a matrix whose rows are not a multiple of q8_0's 32-value blocks falls back to f16. The
k-quant mixes and q4_0 come from llama.cpp's own quantizer (`formats.llama_cpp`), which makes its
per-tensor choices itself. Before that, MLP neurons are padded with zero neurons to whole blocks
(`pad_mlp`, exact), so neuron-pruned down projections quantize too, and a sliced residual stream is
padded with zero dimensions (`pad_stream`, exact: the stream is scaled so that every RMSNorm's mean over
the longer width is the dense one; llama, mistral, qwen2, phi3, qwen3 and Gemma 1-3 files). A value that the stored type
cannot hold (beyond float16's ±65504) is refused, naming the tensor, instead of becoming inf.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import torch
from torch import nn

from slicegpt.version import __version__
from slicegpt.errors import SliceGPTError
from slicegpt.formats.standard import head_dim

# --dtype -> llama.cpp file type (general.file_type); the first four written here, the rest by llama.cpp
WRITTEN = {"f32": "ALL_F32", "f16": "MOSTLY_F16", "bf16": "MOSTLY_BF16", "q8_0": "MOSTLY_Q8_0"}
QUANTIZED = {"q4_0": "MOSTLY_Q4_0", "q4_k_m": "MOSTLY_Q4_K_M", "q5_k_m": "MOSTLY_Q5_K_M", "q6_k": "MOSTLY_Q6_K"}
DTYPES = (*WRITTEN, *QUANTIZED)
F16_MAX = 65504.0
BLOCK = 32  # values per block of q8_0, q4_0, q5_0 (k-quants: 256)
# Largest |value| each stored type holds: block types keep one float16 scale per block, the
# value over 127 (q8_0) or over 8 (q4_0, the smallest divisor of the types llama.cpp may choose).
_LIMITS = {"F16": F16_MAX, "Q8_0": F16_MAX * 127, "QUANTIZED": F16_MAX * 8}


@dataclass(frozen=True)
class Layout:
    """How one family's stock model maps onto a llama.cpp architecture."""

    arch: str  # GGUF architecture name (gguf.MODEL_ARCH member, lower case)
    permute_qk: bool = False  # llama.cpp's llama rotary pairs adjacent rows
    norm_offset: float = 0.0  # Gemma computes x * (1 + w); llama.cpp stores 1 + w
    sliding_window: bool = False  # write attention.sliding_window
    swa_period: int = 0  # llama.cpp's fixed pattern: every swa_period-th layer attends globally
    big_layers: int = 0  # layer count llama.cpp takes for the 27B model (attention scale from the width)
    layer_norm: bool = False  # LayerNorm (eps key attention.layer_norm_epsilon) instead of RMSNorm
    moe_norm_topk: bool | None = None  # llama.cpp renormalises the top-k routing weights (fixed per arch)
    split_fused: bool = False  # write fused qkv / gate_up projections as separate q, k, v / gate, up
    window_as_context: bool = False  # no sliding window in the arch: cap the context at the window instead
    blocker: str = ""  # why llama.cpp cannot run this family once it is sliced


_TIED_WIDTH = ("llama.cpp's {arch} sizes the attention projections by the embedding width, which slicing "
               "shrinks, so no GGUF file of a sliced {family} runs there; use the standard directory with transformers")
LAYOUTS = {
    "llama": Layout("llama", permute_qk=True),
    "mistral": Layout("llama", permute_qk=True),
    "mixtral": Layout("llama", permute_qk=True, moe_norm_topk=True),
    # llama.cpp's qwen2 and phi3 size the query projection by the embedding width, which slicing
    # shrinks; its llama architecture does not, and computes the same function (q/k/v biases included).
    "qwen2": Layout("llama", permute_qk=True),
    "qwen2_moe": Layout("qwen2moe", blocker=_TIED_WIDTH),
    "qwen3": Layout("qwen3"),
    "qwen3_moe": Layout("qwen3moe", moe_norm_topk=True),
    "phi3": Layout("llama", permute_qk=True, split_fused=True, window_as_context=True),
    "phi": Layout("phi2", layer_norm=True, blocker=_TIED_WIDTH),
    "gemma": Layout("gemma", norm_offset=1.0),
    "gemma2": Layout("gemma2", norm_offset=1.0, sliding_window=True, swa_period=2, big_layers=46),
    "gemma3_text": Layout("gemma3", norm_offset=1.0, sliding_window=True, swa_period=6, big_layers=62),
}
ARCHITECTURES = tuple(LAYOUTS)


def _permute(w: torch.Tensor, heads: int) -> torch.Tensor:
    """Hugging Face's half-split rotary rows -> llama.cpp's interleaved pairs (its converter's permute)."""
    return w.reshape(heads, 2, w.shape[0] // heads // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def _rope(config) -> dict:
    """The rotary parameters of the global-attention layers (Gemma 3 keeps one set per attention type)."""
    params = dict(getattr(config, "rope_parameters", None) or {})
    params = dict(params.get("full_attention", params))
    if getattr(config, "rope_theta", None) is not None:
        params.setdefault("rope_theta", config.rope_theta)
    params.setdefault("partial_rotary_factor", getattr(config, "partial_rotary_factor", 1.0) or 1.0)
    return params


def _width_sets_attention_scale(config, layout: Layout) -> bool:
    """Whether llama.cpp scales this model's queries by its width (Gemma's 27B models, recognised by their layer
    count) rather than by the head size; a padded width would change that scale, so such streams stay unpadded."""
    return bool(layout.big_layers and config.num_hidden_layers == layout.big_layers)


def _query_scale(config, layout: Layout) -> float:
    """Factor that makes llama.cpp's fixed Gemma attention scale equal the model's query_pre_attn_scalar.

    llama.cpp scales queries by 1/sqrt(head_dim), or 1/sqrt(width/heads) for the 27B models
    (recognised by their layer count). Slicing changes the width, and small configs may set
    query_pre_attn_scalar freely, so the difference is folded into the query projection.
    """
    scalar = getattr(config, "query_pre_attn_scalar", None)
    if not scalar:
        return 1.0
    dim = config.hidden_size // config.num_attention_heads if _width_sets_attention_scale(config, layout) \
        else head_dim(config)
    return (dim / scalar) ** 0.5


def _check_supported(config, layout: Layout) -> None:
    """Refuse what llama.cpp's architecture hard-codes differently, instead of writing a wrong file."""
    model_type = config.model_type
    if layout.blocker:
        raise SliceGPTError(layout.blocker.format(arch=layout.arch, family=model_type))
    if layout.permute_qk and _rope(config)["partial_rotary_factor"] != 1.0:
        raise SliceGPTError(f"llama.cpp's {layout.arch} rotates whole heads; this {model_type} model rotates only "
                            "part of each head (partial_rotary_factor < 1)")
    params = getattr(config, "rope_parameters", None) or {}
    for p in (params.values() if "full_attention" in params else [params]):
        kind = p.get("rope_type", "default") if isinstance(p, dict) else "default"
        if kind != "default":
            raise SliceGPTError(f"GGUF export does not write rotary scaling of type {kind!r} yet ({model_type})")
    if layout.swa_period and getattr(config, "layer_types", None):
        expected = ["full_attention" if (i + 1) % layout.swa_period == 0 else "sliding_attention"
                    for i in range(config.num_hidden_layers)]
        if list(config.layer_types) != expected:
            raise SliceGPTError(f"llama.cpp's {layout.arch} makes every {layout.swa_period}th layer global; this "
                                f"model's layer pattern differs, so its GGUF file would compute something else")
    if layout.moe_norm_topk is not None:
        if getattr(config, "mlp_only_layers", None) or (getattr(config, "decoder_sparse_step", 1) or 1) != 1:
            raise SliceGPTError(f"llama.cpp's {layout.arch} needs experts in every layer; this model mixes in "
                                "dense layers (mlp_only_layers / decoder_sparse_step)")
        norm = getattr(config, "norm_topk_prob", True)  # Mixtral always renormalises
        if bool(norm) != layout.moe_norm_topk:
            raise SliceGPTError(f"llama.cpp's {layout.arch} {'renormalises' if layout.moe_norm_topk else 'does not renormalise'} "
                                f"the top-k routing weights, and this model's norm_topk_prob is {norm}")
    if getattr(config, "qk_layernorm", False):
        raise SliceGPTError("llama.cpp's phi2 has no query/key LayerNorms (qk_layernorm=True)")


def _name(template, layer: int) -> str:
    from gguf import TENSOR_NAMES

    return TENSOR_NAMES[template].format(bid=layer) + ".weight"


def _split_fused(model: nn.Module, layout: Layout):
    """State-dict items, with Phi-3's fused qkv and gate_up projections cut into llama's separate ones."""
    config = model.config
    head_width = head_dim(config)
    q = config.num_attention_heads * head_width
    kv = (config.num_key_value_heads or config.num_attention_heads) * head_width
    for key, t in model.state_dict().items():
        if layout.split_fused and ".self_attn.qkv_proj." in key:
            for name, part in zip(("q_proj", "k_proj", "v_proj"), t.split([q, kv, kv])):
                yield key.replace("qkv_proj", name), part
        elif layout.split_fused and ".mlp.gate_up_proj." in key:
            for name, part in zip(("gate_proj", "up_proj"), t.chunk(2)):
                yield key.replace("gate_up_proj", name), part
        else:
            yield key, t


def _tensors(model: nn.Module, layout: Layout) -> dict[str, torch.Tensor]:
    """GGUF name -> tensor, transformed the way llama.cpp's converter does."""
    from gguf import MODEL_ARCH, MODEL_TENSOR, get_tensor_name_map

    config = model.config
    heads, kv_heads = config.num_attention_heads, config.num_key_value_heads or config.num_attention_heads
    names = get_tensor_name_map(MODEL_ARCH[layout.arch.upper()], config.num_hidden_layers)
    tied = getattr(config, "tie_word_embeddings", False)
    query_scale = _query_scale(config, layout)
    out = {}
    for key, t in _split_fused(model, layout):
        prefix, _, kind = key.rpartition(".")
        if tied and prefix == "lm_head":
            continue
        if prefix.endswith("mlp.experts"):  # stacked experts [E, out, in]: gate and up are one tensor
            layer = int(prefix.split(".layers.")[1].split(".")[0])
            if kind == "gate_up_proj":
                gate, up = t.chunk(2, dim=1)
                out[_name(MODEL_TENSOR.FFN_GATE_EXP, layer)] = gate
                out[_name(MODEL_TENSOR.FFN_UP_EXP, layer)] = up
            elif kind == "down_proj":
                out[_name(MODEL_TENSOR.FFN_DOWN_EXP, layer)] = t
            else:
                raise SliceGPTError(f"no GGUF name for {key} in llama.cpp's {layout.arch} layout")
            continue
        name = names.get_name(prefix)
        if name is None and prefix == "lm_head":
            raise SliceGPTError(f"llama.cpp's {layout.arch} has no separate head matrix (the head is the embedding "
                                "table), and this model's head is untied; slice it with --head fit")
        if name is None:
            raise SliceGPTError(f"no GGUF name for {key} in llama.cpp's {layout.arch} layout")
        if layout.permute_qk and prefix.endswith("self_attn.q_proj"):
            t = _permute(t, heads)
        elif layout.permute_qk and prefix.endswith("self_attn.k_proj"):
            t = _permute(t, kv_heads)
        if layout.norm_offset and t.dim() == 1 and prefix.endswith("norm") and kind == "weight":
            t = t + layout.norm_offset
        if query_scale != 1.0 and prefix.endswith("self_attn.q_norm"):  # after the norm: scale its gain
            t = t * query_scale
        elif query_scale != 1.0 and prefix.endswith("self_attn.q_proj") and not hasattr(model.get_submodule(
                prefix.rsplit(".", 1)[0]), "q_norm"):
            t = t * query_scale
        if prefix.endswith("shared_expert_gate"):  # llama.cpp wants a vector
            t = t.reshape(-1)
        out[f"{name}.{kind}"] = t
    return out


def check_pad_neurons(pad_neurons: int, option: str = "--pad-neurons") -> None:
    """Refuse a padding multiple that is not 0 (off) or a positive count, before any work."""
    if not isinstance(pad_neurons, int) or pad_neurons < 0:
        what = "neurons" if option == "--pad-neurons" else "dimensions"
        raise SliceGPTError(f"{option} must be 0 (off) or a positive number of {what}, got {pad_neurons}")


_MLP_INPUTS = (".ffn_gate.weight", ".ffn_up.weight", ".ffn_up.bias")  # one row (entry) per neuron
_MLP_OUTPUT = ".ffn_down.weight"  # one column per neuron


def pad_mlp(tensors: dict[str, torch.Tensor], multiple: int, widest: bool = False) -> dict[str, torch.Tensor]:
    """The dense MLPs' neurons padded with zero neurons to a multiple of `multiple` (MoE experts unchanged);
    `widest`: every MLP to the widest one's count (an architecture with one MLP width)."""
    widths = [t.shape[1] for key, t in tensors.items() if key.startswith("blk.") and key.endswith(_MLP_OUTPUT)]
    target = max(widths, default=0)

    def missing(n: int) -> int:
        return target - n if widest else -n % multiple

    out = {}
    for key, t in tensors.items():
        if key.startswith("blk.") and key.endswith(_MLP_INPUTS) and (m := missing(t.shape[0])):
            t = torch.cat([t, t.new_zeros(m, *t.shape[1:])])
        elif key.startswith("blk.") and key.endswith(_MLP_OUTPUT) and (m := missing(t.shape[1])):
            t = torch.cat([t, t.new_zeros(t.shape[0], m)], dim=1)
        out[key] = t
    return out


# The stream's tensors in llama.cpp's layouts, by what they do with it
_STREAM_NORMS = (".attn_norm.weight", ".ffn_norm.weight")  # normalise the stream for its readers
_BRANCH_NORMS = (".post_attention_norm.weight", ".post_ffw_norm.weight")  # Gemma 2/3: a writer's output
_STREAM_IN = (".attn_q.weight", ".attn_k.weight", ".attn_v.weight", ".ffn_gate.weight", ".ffn_up.weight")
_STREAM_OUT = (".attn_output.weight", ".attn_output.bias", ".ffn_down.weight", ".ffn_down.bias")
_HEAD_NORMS = (".attn_q_norm.weight", ".attn_k_norm.weight")  # qwen3, Gemma 3: per head, not the stream
# architectures whose stream pad_stream knows: RMSNorm over the stream, dense MLPs; Gemma's llama.cpp
# graphs multiply the embedding by sqrt(width) themselves (SCALED_EMBEDDING)
STREAM_ARCHS = ("llama", "qwen3", "gemma", "gemma2", "gemma3")
SCALED_EMBEDDING = ("gemma", "gemma2", "gemma3")


def pad_stream(tensors: dict[str, torch.Tensor], multiple: int,
               scaled_embedding: bool = False) -> dict[str, torch.Tensor] | None:
    """The residual stream widened with zero dimensions to a multiple of `multiple`, or None where the width
    is whole already or a tensor has a stream axis this does not know (nothing is padded then).

    A zero dimension stays zero through every block (the embedding and every writer put nothing there),
    and the matrices that read the stream ignore it. Only each RMSNorm's mean changes, from sum / d to
    sum / d' = r * sum / d. So the whole stream is also multiplied by a = sqrt(d' / d): its mean of squares,
    and with it every norm's denominator, epsilon included, is then the dense one, and each norm's gain
    times 1 / a gives the dense output back. Epsilon stays as it is (qwen3's and Gemma 3's per-head q/k
    norms share it). The stream is scaled where it is written: the embedding (`scaled_embedding`: Gemma's
    llama.cpp graphs multiply it by sqrt(d') in place of sqrt(d), which is a already), and every writer
    (attention output, down projection). Gemma 2/3's branch-output norms then see their input times a
    over the longer mean, i.e. their dense denominator, and give their output times a with their gains
    unchanged. A tied head that reads the scaled embedding table makes logits times a, which the final
    norm's gain absorbs as well.
    """
    width = tensors["token_embd.weight"].shape[1]
    missing = -width % multiple
    if not missing:
        return None
    a = ((width + missing) / width) ** 0.5
    scale_table = not scaled_embedding
    tied = "output.weight" not in tensors
    out = {}
    for key, t in tensors.items():
        if key == "output_norm.weight":
            t = torch.cat([t / (a * a if tied and scale_table else a), t.new_zeros(missing)])
        elif key.endswith(_STREAM_NORMS):
            t = torch.cat([t / a, t.new_zeros(missing)])
        elif key.endswith(_BRANCH_NORMS):
            t = torch.cat([t, t.new_zeros(missing)])
        elif key == "token_embd.weight":
            t = torch.cat([t * a if scale_table else t, t.new_zeros(t.shape[0], missing)], dim=1)
        elif key == "output.weight" or key.endswith(_STREAM_IN):
            t = torch.cat([t, t.new_zeros(t.shape[0], missing)], dim=1)
        elif key.endswith(_STREAM_OUT):
            t = torch.cat([t * a, t.new_zeros(missing, *t.shape[1:])])
        elif key.endswith(_HEAD_NORMS):
            pass
        elif width in t.shape:  # an axis that may be the stream, of a kind not listed: leave the width alone
            return None
        out[key] = t
    return out


def _zero_at_zero(config) -> bool:
    """Whether the MLP's activation maps 0 to 0, so that a zero neuron adds nothing (true of every
    family slicegpt exports; checked, not assumed)."""
    from transformers.activations import ACT2FN

    name = next((getattr(config, key) for key in ("hidden_activation", "hidden_act", "activation_function")
                 if isinstance(getattr(config, key, None), str)), None)
    if name not in ACT2FN:
        return False
    return float(ACT2FN[name](torch.zeros(1))[0]) == 0.0


def _feed_forward(tensors: dict[str, torch.Tensor], config) -> int | list[int]:
    """llama.cpp's feed_forward_length: the dense MLP's neurons as written (padded or not); one per
    layer where the layers' MLPs differ (llama.cpp reads an array there)."""
    downs = {int(key.split(".")[1]): int(t.shape[1]) for key, t in tensors.items()
             if key.startswith("blk.") and key.endswith(_MLP_OUTPUT)}
    if not downs:
        return int(config.intermediate_size)
    widths = [downs[i] for i in sorted(downs)]
    return widths[0] if len(set(widths)) == 1 else widths


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


# How text is split into words before BPE: llama.cpp names the splitting rules it implements.
_LLAMA3_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
                 r"|\s*[\r\n]+|\s+(?!\S)|\s+")
_PRE_TOKENIZERS = {_LLAMA3_SPLIT: "llama-bpe", _LLAMA3_SPLIT.replace(r"\p{N}{1,3}", r"\p{N}"): "qwen2"}


def _pre_tokenizer(spec: dict) -> str:
    """llama.cpp's name for a tokenizer.json pre-tokenizer ('default' where none is known to match)."""
    steps = spec.get("pretokenizers", [spec]) if spec.get("type") == "Sequence" else [spec]
    kinds = [step.get("type") for step in steps]
    if kinds == ["ByteLevel"] and steps[0].get("use_regex", True):
        return "gpt-2"  # byte-level BPE with GPT-2's own word regex
    if kinds == ["Split", "ByteLevel"] and not steps[1].get("use_regex", True):
        return _PRE_TOKENIZERS.get(steps[0].get("pattern", {}).get("Regex", ""), "default")
    return "default"


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
    writer.add_tokenizer_pre(_pre_tokenizer(data.get("pre_tokenizer") or {}))
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


def storage_type(name: str, t: torch.Tensor, dtype: str) -> str:
    """The GGML type llama.cpp's converter gives tensor `name` in a `dtype` file (q4/k-quants: "QUANTIZED")."""
    if (dtype == "f32" or t.dim() <= 1 or name.endswith("_norm.weight") or not name.endswith(".weight")
            or ".ffn_gate_inp." in name):  # llama.cpp reads these as float32 only
        return "F32"
    if dtype in QUANTIZED:
        return "F16" if t.shape[-1] % BLOCK else "QUANTIZED"  # llama.cpp's last fallback is f16
    if dtype == "q8_0" and t.shape[-1] % BLOCK:
        return "F16"  # as the converter does when a row is not whole blocks
    return dtype.upper()


def _check_range(name: str, t: torch.Tensor, kind: str, dtype: str) -> None:
    """Refuse a tensor whose values the stored type would turn into inf."""
    limit = _LIMITS.get(kind)
    if limit is None or t.numel() == 0:
        return
    peak = float(t.detach().abs().max())
    if peak > limit:
        stored = "f16" if kind == "F16" else f"{dtype}'s float16 block scales"
        raise SliceGPTError(f"{name} has values up to {peak:.4g}, beyond what {stored} can hold "
                            f"(±{limit:.6g}), so they would become inf; export with --dtype bf16 or f32")


def _array(t: torch.Tensor, kind: str) -> tuple[np.ndarray, object]:
    """The tensor as the bytes of its GGML type (block types quantized by the gguf package)."""
    from gguf import GGMLQuantizationType, quants

    qtype = GGMLQuantizationType[kind]
    data = t.detach().to(torch.float32).cpu().numpy()
    if qtype == GGMLQuantizationType.F16:
        return data.astype(np.float16), qtype
    if qtype != GGMLQuantizationType.F32:
        data = quants.quantize(data, qtype)
    return np.ascontiguousarray(data), qtype


def tensor_types(path: str | os.PathLike) -> dict[str, int]:
    """How many tensors of each GGML type a GGUF file holds (what fell back to f16/f32 shows here)."""
    from gguf import GGUFReader

    counts: dict[str, int] = {}
    for tensor in GGUFReader(str(path)).tensors:
        counts[tensor.tensor_type.name.lower()] = counts.get(tensor.tensor_type.name.lower(), 0) + 1
    return dict(sorted(counts.items(), key=lambda kv: -kv[1]))


def embedding_length(path: str | os.PathLike) -> int | None:
    """The stream width a GGUF file declares (None for a file without the key)."""
    from gguf import GGUFReader

    fields = GGUFReader(str(path)).fields
    key = next((k for k in fields if k.endswith(".embedding_length")), None)
    return int(fields[key].parts[-1][0]) if key else None


def feed_forward_length(path: str | os.PathLike) -> int | list[int] | None:
    """The MLP neurons per layer a GGUF file declares: one count, one per layer where they differ, or None
    for a file without the key."""
    from gguf import GGUFReader

    fields = GGUFReader(str(path)).fields
    key = next((k for k in fields if k.endswith(".feed_forward_length")), None)
    if key is None:
        return None
    values = [int(fields[key].parts[i][0]) for i in fields[key].data]
    return values[0] if len(values) == 1 else values


def _check_written(path: Path) -> None:
    """After llama.cpp's quantizer: no f16 tensor it chose may hold inf."""
    from gguf import GGMLQuantizationType, GGUFReader

    for tensor in GGUFReader(str(path)).tensors:
        if tensor.tensor_type == GGMLQuantizationType.F16 and not np.isfinite(tensor.data).all():
            raise SliceGPTError(f"{tensor.name} overflowed float16 in llama.cpp's quantizer; export with --dtype bf16 or f32")


def export_gguf(model: nn.Module, tokenizer, out: str | os.PathLike, dtype: str = "f16",
                source_gguf: str | os.PathLike | None = None, force: bool = False, name: str = "",
                pad_neurons: int = BLOCK, pad_stream_to: int = BLOCK) -> Path:
    """Write `model` (a stock model: dense, or from a uniform slice) as a GGUF file, atomically.

    MLP neuron counts are padded with zero neurons to a multiple of `pad_neurons` (0 or 1: not
    padded). A zero neuron adds exactly nothing (its activation of 0 is 0), and whole blocks let
    llama.cpp quantize the down projections and run its faster kernels; see docs/outputs.md.
    A sliced stream width is padded to a multiple of `pad_stream_to` the same way (`pad_stream`; not MoE
    files), so that every matrix that reads it quantizes too.
    """
    import tempfile

    from slicegpt.atomic import atomic_file, refuse_existing
    from slicegpt.modeling.runtime import sliced_structure

    if (sliced_structure(model) or {"structure": {"stock": True}})["structure"].get("stock") is not True:
        raise SliceGPTError("GGUF export needs a standard model, and this one has per-layer rotations "
                            "(skip-connection matrices); slice it with --rotation uniform")
    model_type = model.config.model_type
    if model_type not in LAYOUTS:
        raise SliceGPTError(f"GGUF export supports model types {', '.join(ARCHITECTURES)}; not {model_type}")
    layout = LAYOUTS[model_type]
    if dtype not in DTYPES:
        raise SliceGPTError(f"GGUF dtype must be one of {', '.join(DTYPES)}, got {dtype!r}")
    out = Path(out)
    refuse_existing(out, force, ours=b"GGUF")  # before the checks and the writing; --force replaces only GGUF
    _check_supported(model.config, layout)
    check_pad_neurons(pad_neurons)
    check_pad_neurons(pad_stream_to, "--pad-stream")
    tensors = _tensors(model, layout)
    if pad_neurons > 1 and _zero_at_zero(model.config):
        tensors = pad_mlp(tensors, pad_neurons)
    if (pad_stream_to > 1 and layout.arch in STREAM_ARCHS and not _width_sets_attention_scale(model.config, layout)
            and (padded := pad_stream(tensors, pad_stream_to, layout.arch in SCALED_EMBEDDING))):
        tensors = padded
    if isinstance(_feed_forward(tensors, model.config), list):  # each layer's MLP its own width
        if layout.arch == "llama":  # llama.cpp's deci: the llama graph with a width per layer
            layout = replace(layout, arch="deci")
        elif _zero_at_zero(model.config):  # one width in the architecture: the narrower MLPs get zero neurons
            tensors = pad_mlp(tensors, 1, widest=True)
        else:
            raise SliceGPTError(f"llama.cpp's {layout.arch} has one MLP width, and this model's layers differ")
    for key, t in tensors.items():
        _check_range(key, t, storage_type(key, t, dtype), dtype)
    tokenizer_fields = _source_tokenizer_fields(Path(source_gguf) if source_gguf else None)
    header = dict(model=model, layout=layout, tokenizer=tokenizer, tokenizer_fields=tokenizer_fields,
                  name=name or f"{model_type} sliced to {model.config.hidden_size}",
                  feed_forward=_feed_forward(tensors, model.config))

    with atomic_file(out, force=True) as tmp:  # existence checked above
        if dtype in WRITTEN:
            _write(tmp, tensors, dtype, **header)
        else:
            from gguf import LlamaFileType

            from slicegpt.formats.llama_cpp import quantize_file

            fd, name32 = tempfile.mkstemp(prefix=f".{out.name}.f32-", suffix=".gguf", dir=out.parent)
            os.close(fd)
            try:  # llama.cpp quantizes from float32, as llama-quantize does from the converter's output
                _write(Path(name32), tensors, "f32", **header)
                quantize_file(Path(name32), tmp, LlamaFileType[QUANTIZED[dtype]].value)
            finally:
                Path(name32).unlink(missing_ok=True)
            _check_written(tmp)
    return out


def _write(path: Path, tensors: dict[str, torch.Tensor], dtype: str, model: nn.Module, layout: Layout,
           tokenizer, tokenizer_fields: list | None, name: str, feed_forward: int | list[int]) -> None:
    """One GGUF file: llama.cpp's metadata for the architecture, the tokenizer, the tensors in `dtype`."""
    from gguf import GGML_QUANT_VERSION, GGUFWriter, LlamaFileType

    config = model.config
    heads = config.num_attention_heads
    head_width = head_dim(config)
    rope = _rope(config)
    vocab_size = tensors["token_embd.weight"].shape[0]
    writer = GGUFWriter(str(path), layout.arch)
    writer.add_name(name)
    writer.add_string("slicegpt.version", __version__)  # which code wrote it (llama.cpp ignores the key)
    writer.add_file_type(LlamaFileType[WRITTEN[dtype]].value)
    writer.add_quantization_version(GGML_QUANT_VERSION)
    context = config.max_position_embeddings
    if layout.window_as_context and getattr(config, "sliding_window", None):
        context = min(context, int(config.sliding_window))  # inside the window, sliding = full attention
    writer.add_context_length(context)
    writer.add_embedding_length(int(tensors["token_embd.weight"].shape[1]))  # padded or not
    writer.add_block_count(config.num_hidden_layers)
    writer.add_feed_forward_length(feed_forward)
    writer.add_head_count(heads)
    writer.add_head_count_kv(config.num_key_value_heads or heads)
    writer.add_key_length(head_width)
    writer.add_value_length(head_width)
    writer.add_rope_dimension_count(int(head_width * rope["partial_rotary_factor"]))
    writer.add_rope_freq_base(float(rope.get("rope_theta", 10000.0)))
    if layout.layer_norm:
        writer.add_layer_norm_eps(float(config.layer_norm_eps))
    else:
        writer.add_layer_norm_rms_eps(float(config.rms_norm_eps))
    if layout.sliding_window and getattr(config, "sliding_window", None):
        writer.add_sliding_window(int(config.sliding_window))
    for key in ("attn_logit_softcapping", "final_logit_softcapping"):  # Gemma 2
        if getattr(config, key, None):
            getattr(writer, f"add_{key}")(float(getattr(config, key)))
    experts = getattr(config, "num_local_experts", None) or getattr(config, "num_experts", None)
    if layout.moe_norm_topk is not None and experts:
        writer.add_expert_count(int(experts))
        writer.add_expert_used_count(int(config.num_experts_per_tok))
        if getattr(config, "moe_intermediate_size", None):
            writer.add_expert_feed_forward_length(int(config.moe_intermediate_size))
        if getattr(config, "shared_expert_intermediate_size", None):
            writer.add_expert_shared_feed_forward_length(int(config.shared_expert_intermediate_size))
    writer.add_vocab_size(vocab_size)
    if tokenizer_fields:
        for field in tokenizer_fields:
            _copy_field(writer, field)
    else:
        _write_tokenizer(writer, tokenizer, vocab_size)
    for key, t in tensors.items():
        array, qtype = _array(t, storage_type(key, t, dtype))
        writer.add_tensor(key, array, raw_dtype=qtype)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
