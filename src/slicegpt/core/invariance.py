"""Computational invariance: make every norm a scale-free RMSNorm so Q can be inserted.

After `fuse_norms`, RMSNorm(x Q) Q^T = RMSNorm(x) for every orthogonal Q, because all the
per-coordinate gains (and LayerNorm biases) that would break that identity now live in the
linears that read the norms' outputs.

LayerNorm families first get a zero-mean residual stream: every vector written into it
(embedding rows, branch outputs) has its mean removed, which a LayerNorm would subtract
anyway. On a zero-mean stream LayerNorm *is* RMSNorm (with a gain and a bias), so the
LayerNorm modules are swapped for `RMSNorm` ones once their gain and bias are folded.
"""

from __future__ import annotations

import torch
from torch import nn

from slicegpt.adapters import ModelAdapter
from slicegpt.modeling.runtime import get_path, set_parameter, swap_rms_norm
from slicegpt.core.weights import Target, add_input_bias, center_embedding, center_output, resolve, resolve_all, scale_input


def ties_head(model: nn.Module, adapter: ModelAdapter) -> bool:
    """Whether the head shares its weight with the (first) embedding table."""
    head = get_path(model, adapter.head)
    return getattr(head, "weight", None) is get_path(model, adapter.embeddings[0]).weight


def untie_head(model: nn.Module, adapter: ModelAdapter) -> bool:
    """Give the head its own weight if it shares the embedding matrix; True if it did."""
    if not ties_head(model, adapter):
        return False
    head = get_path(model, adapter.head)
    set_parameter(head, "weight", head.weight.detach().clone())
    record_tie(model, False)
    return True


def tie_head(model: nn.Module, adapter: ModelAdapter) -> None:
    """Make the head share the (first) embedding table's weight, and say so in the config."""
    get_path(model, adapter.head).weight = get_path(model, adapter.embeddings[0]).weight
    record_tie(model, True)


def record_tie(model: nn.Module, tied: bool) -> None:
    for config in {id(c): c for c in (model.config, model.config.get_text_config())}.values():
        config.tie_word_embeddings = tied


def center_entry(model: nn.Module, adapter: ModelAdapter) -> None:
    """Remove the mean of the embedding rows and of what entry linears write."""
    for path in adapter.embeddings:
        center_embedding(resolve(model, path))
    for path in adapter.entry_writers:
        center_output(resolve(model, path))


def _fold_norm(norm: nn.Module, readers: list[Target], adapter: ModelAdapter) -> torch.Tensor:
    """Fold a norm's gain (and LayerNorm bias) into its readers; return the gain folded."""
    weight = getattr(norm, "weight", None)
    hidden = _norm_size(norm)
    gain = (torch.ones(hidden, dtype=torch.float64) if weight is None
            else weight.data.to(torch.float64) + adapter.norm_offset)
    bias = getattr(norm, "bias", None) if adapter.norm_kind == "layernorm" else None
    for target in readers:
        if bias is not None and torch.any(bias != 0):
            add_input_bias(target, bias.data.to(torch.float64))  # uses W before it is scaled
        scale_input(target, gain)
    if weight is not None and adapter.norm_kind == "rmsnorm":
        weight.data.fill_(1.0 - adapter.norm_offset)
    return gain


def _norm_size(norm: nn.Module) -> int:
    shape = getattr(norm, "normalized_shape", None)
    return int(shape[-1]) if shape else norm.weight.shape[-1]


def fuse_entry(model: nn.Module, adapter: ModelAdapter, tied_head: bool = False) -> None:
    """The part of `fuse_norms` before the first layer: a LayerNorm family's zero-mean entry."""
    if adapter.norm_kind == "layernorm" and not tied_head:
        untie_head(model, adapter)  # the embeddings change below; the head must not follow them
        center_entry(model, adapter)


def fuse_layer(layer: nn.Module, adapter: ModelAdapter) -> None:
    """The part of `fuse_norms` for one decoder layer: its norms' gains move into their readers."""
    if adapter.norm_kind == "layernorm":
        for branch in adapter.branches:
            if branch.post_norm:
                raise NotImplementedError("a LayerNorm model with branch-output norms is not supported")
            for target in resolve_all(layer, branch.outputs):
                center_output(target)
    for norm_name in adapter.norm_names():  # a shared norm (Phi-2) folds into all its readers
        readers = [t for b in adapter.branches if b.norm == norm_name for t in resolve_all(layer, b.inputs)]
        _fold_norm(get_path(layer, norm_name), readers, adapter)
    if adapter.norm_kind == "layernorm":
        for norm_name in adapter.norm_names():
            swap_rms_norm(layer, norm_name)


def fuse_exit(model: nn.Module, adapter: ModelAdapter, tied_head: bool = False) -> None:
    """The part of `fuse_norms` after the last layer: the final norm's gain moves into the head."""
    if tied_head:
        return
    final = get_path(model, adapter.final_norm)
    uniform = adapter.norm_kind == "rmsnorm" and torch.all(final.weight.data + adapter.norm_offset == 1.0)
    if not uniform:  # a unit gain needs no folding, so the head may stay tied
        untie_head(model, adapter)
        _fold_norm(final, [resolve(model, adapter.head)], adapter)
    if adapter.norm_kind == "layernorm":
        swap_rms_norm(model, adapter.final_norm)


def fuse_norms(model: nn.Module, adapter: ModelAdapter, tied_head: bool = False) -> None:
    """Fold every norm gain into the linears that read the normalised signal.

    With `tied_head` the embeddings, the final norm and the head are left as they are (the
    first layer will take the stream's mean out and rotate it; see the engine).
    """
    fuse_entry(model, adapter, tied_head)
    for layer in get_path(model, adapter.layers):
        fuse_layer(layer, adapter)
    fuse_exit(model, adapter, tied_head)
