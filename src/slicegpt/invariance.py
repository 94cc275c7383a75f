"""Computational invariance: make every norm a scale-free RMSNorm so Q can be inserted.

After `fuse_norms`, RMSNorm(x Q) Q^T = RMSNorm(x) for every orthogonal Q, because all the
per-coordinate gains that would break that identity now live in the linears that read
the norms' outputs.
"""

from __future__ import annotations

import torch
from torch import nn

from slicegpt.adapters import ModelAdapter
from slicegpt.sliced_modeling import get_path, set_parameter
from slicegpt.weights import scale_columns


def untie_head(model: nn.Module, adapter: ModelAdapter) -> bool:
    """Give the head its own weight if it shares the embedding matrix; True if it did."""
    head = get_path(model, adapter.head)
    embedding = get_path(model, adapter.embeddings[0])
    if head.weight is not embedding.weight:
        return False
    set_parameter(head, "weight", head.weight.detach().clone())
    for config in {id(c): c for c in (model.config, model.config.get_text_config())}.values():
        config.tie_word_embeddings = False
    return True


def _unit_norm(norm: nn.Module, adapter: ModelAdapter) -> torch.Tensor:
    """Return the norm's effective gain and reset the norm to gain 1."""
    gain = norm.weight.data.to(torch.float64) + adapter.norm_offset
    norm.weight.data.fill_(1.0 - adapter.norm_offset)
    return gain


def fuse_norms(model: nn.Module, adapter: ModelAdapter) -> None:
    """Fold every norm gain into the linears that read the normalised signal."""
    if adapter.norm_kind != "rmsnorm":
        raise NotImplementedError(f"norm kind {adapter.norm_kind} is not supported yet")
    for layer in get_path(model, adapter.layers):
        for branch in adapter.branches:
            gain = _unit_norm(get_path(layer, branch.norm), adapter)
            for name in branch.inputs:
                scale_columns(get_path(layer, name), gain)
    gain = _unit_norm(get_path(model, adapter.final_norm), adapter)
    if not torch.all(gain == 1.0):  # a unit gain needs no folding, so the head may stay tied
        untie_head(model, adapter)
        scale_columns(get_path(model, adapter.head), gain)
