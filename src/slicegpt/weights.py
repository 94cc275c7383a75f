"""Weight transforms done in float64, a block of rows at a time.

Embedding and head matrices are vocab x d (49152 x 576 for SmolLM2): a whole float64 copy
would add hundreds of MB to the peak memory for no gain in precision.
"""

from __future__ import annotations

from typing import Callable

import torch
from torch import nn

from slicegpt.sliced_modeling import set_parameter

ROWS_PER_BLOCK = 4096


def map_rows(w: torch.Tensor, fn: Callable[[torch.Tensor], torch.Tensor]) -> torch.Tensor:
    """fn applied in float64 to each block of rows of `w`; result in `w`'s dtype."""
    blocks = [fn(w[i:i + ROWS_PER_BLOCK].to(torch.float64)).to(w.dtype) for i in range(0, w.shape[0], ROWS_PER_BLOCK)]
    return torch.cat(blocks)


def scale_columns(linear: nn.Module, gain: torch.Tensor) -> None:
    """W diag(gain): folds a norm's gain into a linear that reads the norm's output."""
    linear.weight.data = map_rows(linear.weight.data, lambda w: w * gain)


def rotate_columns(linear: nn.Module, q: torch.Tensor) -> None:
    """For a module reading the residual (linear, embedding table): W [n, d] -> W Q [n, k]."""
    set_parameter(linear, "weight", map_rows(linear.weight.data, lambda w: w @ q))


def rotate_rows(linear: nn.Module, q: torch.Tensor) -> None:
    """For a linear writing the residual: W [d, in] -> Q^T W [k, in], bias b -> b Q."""
    w = linear.weight.data
    set_parameter(linear, "weight", (q.T @ w.to(torch.float64)).to(w.dtype))
    if getattr(linear, "bias", None) is not None:
        b = linear.bias.data
        set_parameter(linear, "bias", (b.to(torch.float64) @ q).to(b.dtype))
