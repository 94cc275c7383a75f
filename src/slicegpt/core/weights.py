"""Weight transforms done in float64, a block of rows at a time.

A *target* is (owner module, parameter name), resolved from an adapter path. Every weight
is handled as ``[..., out, in]``: transformers' GPT-2 `Conv1D` stores ``[in, out]`` and is
transposed on the way in and out; fused MoE experts are stacked ``[experts, out, in]``.
Embedding and head matrices are vocab x d (49152 x 576 for SmolLM2): a whole float64 copy
would add hundreds of MB to the peak memory for no gain in precision, hence the blocks.
"""

from __future__ import annotations

from typing import Callable

import torch
from torch import nn

from slicegpt.adapters import ModelAdapter
from slicegpt.errors import SliceGPTError
from slicegpt.modeling.runtime import get_path, set_parameter

ROWS_PER_BLOCK = 4096
Target = tuple[nn.Module, str]


def map_rows(w: torch.Tensor, fn: Callable[[torch.Tensor], torch.Tensor]) -> torch.Tensor:
    """fn applied in float64 to each block of rows of `w`; result in `w`'s dtype."""
    if w.dim() != 2:
        return fn(w.to(torch.float64)).to(w.dtype)
    blocks = [fn(w[i:i + ROWS_PER_BLOCK].to(torch.float64)).to(w.dtype) for i in range(0, w.shape[0], ROWS_PER_BLOCK)]
    return torch.cat(blocks)


def resolve(root: nn.Module, path: str) -> Target | None:
    """The weight an adapter path names; None for an optional path (``name?``) a layer lacks."""
    optional = path.endswith("?")
    path = path.rstrip("?")
    try:
        obj = get_path(root, path)
    except AttributeError:
        if optional:
            return None
        raise
    if obj is None and optional:
        return None
    if isinstance(obj, nn.Module):
        return obj, "weight"
    parent, _, leaf = path.rpartition(".")
    return (get_path(root, parent) if parent else root), leaf


def resolve_all(root: nn.Module, paths: tuple[str, ...]) -> list[Target]:
    return [t for t in (resolve(root, p) for p in paths) if t is not None]


def _transposed(target: Target) -> bool:
    owner, name = target
    return name == "weight" and type(owner).__name__ == "Conv1D"


def weight_of(target: Target) -> torch.Tensor:
    w = getattr(target[0], target[1]).data
    return w.transpose(-1, -2) if _transposed(target) else w


def put_weight(target: Target, w: torch.Tensor) -> None:
    set_parameter(target[0], target[1], (w.transpose(-1, -2) if _transposed(target) else w).contiguous())


def bias_of(target: Target) -> torch.Tensor | None:
    owner, name = target
    return getattr(owner, "bias", None) if name == "weight" else None


# --- modules that read the residual stream: its coordinates are the last axis ("in") ---

def scale_input(target: Target, gain: torch.Tensor) -> None:
    """W diag(gain): folds a norm's gain into a weight that reads the norm's output."""
    put_weight(target, map_rows(weight_of(target), lambda w: w * gain))


def add_input_bias(target: Target, beta: torch.Tensor) -> None:
    """b + W beta: folds a LayerNorm's bias into a linear that reads the norm's output."""
    owner, name = target
    if name != "weight" or not hasattr(owner, "bias"):
        raise NotImplementedError(f"cannot fold a norm bias into {type(owner).__name__}.{name}")
    w = weight_of(target)
    shift = (w.to(torch.float64) @ beta).to(w.dtype)
    bias = owner.bias
    set_parameter(owner, "bias", shift if bias is None else (bias.data.to(torch.float64) + shift).to(w.dtype))


def rotate_input(target: Target, q: torch.Tensor) -> None:
    """W [.., n, d] -> W Q [.., n, k] (linears, embedding tables, routers, stacked experts)."""
    put_weight(target, map_rows(weight_of(target), lambda w: w @ q))


# --- modules that write the residual stream: its coordinates are the "out" axis ---

def rotate_output(target: Target, q: torch.Tensor) -> None:
    """W [.., d, m] -> Q^T W [.., k, m], bias b -> b Q."""
    w = weight_of(target)
    put_weight(target, (q.T @ w.to(torch.float64)).to(w.dtype))
    bias = bias_of(target)
    if bias is not None:
        set_parameter(target[0], "bias", (bias.data.to(torch.float64) @ q).to(bias.dtype))


def center_output(target: Target) -> None:
    """(I - 11^T/d) W: the written vector loses its mean, so the stream stays zero-mean."""
    w = weight_of(target).to(torch.float64)
    put_weight(target, (w - w.mean(dim=-2, keepdim=True)).to(getattr(target[0], target[1]).dtype))
    bias = bias_of(target)
    if bias is not None:
        b = bias.data.to(torch.float64)
        set_parameter(target[0], "bias", (b - b.mean()).to(bias.dtype))


def center_embedding(target: Target) -> None:
    """Each embedding row (a vector written into the stream) minus its mean."""
    put_weight(target, map_rows(weight_of(target), lambda w: w - w.mean(dim=-1, keepdim=True)))


def output_matrix(target: Target) -> tuple[torch.Tensor, torch.Tensor | None]:
    """A writer's weight as [d, m] and its bias [d] (None without one), as stored."""
    bias = bias_of(target)
    return weight_of(target), (bias.data if bias is not None else None)


def set_output_matrix(target: Target, w: torch.Tensor, bias: torch.Tensor | None = None) -> None:
    """Replace a writer's weight ([d, m], float64 or not) and bias, keeping their dtypes."""
    old, old_bias = output_matrix(target)
    put_weight(target, w.to(old.dtype))
    if bias is not None and old_bias is not None:
        set_parameter(target[0], "bias", bias.to(old_bias.dtype))

def layer_mlp_neurons(model: nn.Module, adapter: ModelAdapter) -> list[int] | None:
    """The MLP width of each layer now (pruned neurons), None where the family describes none."""
    branch = next((b for b in adapter.branches if b.neurons), None)
    if branch is None:
        return None
    return [weight_of(resolve_all(layer, branch.outputs)[0]).shape[-1] for layer in get_path(model, adapter.layers)]


def mlp_neurons(model: nn.Module, adapter: ModelAdapter, widest: bool = False) -> int | None:
    """The MLP width every layer has now (pruned neurons), None where the family describes none.
    A stock config has one width for all layers; `widest`: the largest where they differ."""
    widths = layer_mlp_neurons(model, adapter)
    if widths is None:
        return None
    if len(set(widths)) != 1 and not widest:
        raise SliceGPTError(f"a stock model has one MLP width for every layer; these differ: {sorted(set(widths))}")
    return max(widths)


def attention_heads(model: nn.Module, adapter: ModelAdapter) -> tuple[int, int] | None:
    """(key/value heads, query heads per key/value head) every layer has now (pruned heads), None where
    the family describes no heads. A stock config has one count of each for every layer."""
    branch = next((b for b in adapter.branches if b.heads), None)
    if branch is None:
        return None
    counts = set()
    for layer in get_path(model, adapter.layers):
        heads = branch.heads
        size = get_path(layer, heads.head_dim)
        query = weight_of(resolve(layer, heads.query)).shape[-2] // size
        kv = weight_of(resolve(layer, heads.key)).shape[-2] // size
        counts.add((kv, query // kv))
    if len(counts) != 1:
        raise SliceGPTError(f"a stock model has one count of attention heads for every layer; these differ: "
                            f"{sorted(counts)}")
    return counts.pop()
