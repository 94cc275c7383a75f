"""Perplexity (non-overlapping windows, mean token NLL, exp) and honest parameter counts."""

from __future__ import annotations

import math

import torch
from torch import nn
from tqdm.auto import tqdm

from slicegpt.data import Windows
from slicegpt.errors import SliceGPTError


def count_parameters(model: nn.Module) -> int:
    """Every parameter once: shared (tied) tensors once, skip-connection matrices included."""
    return sum(p.numel() for p in model.parameters())


@torch.no_grad()
def perplexity(model: nn.Module, windows: Windows, batch_size: int = 2, progress: bool = True) -> float:
    """exp of the mean next-token NLL over every predicted token of every window."""
    device = next(model.parameters()).device
    total_nll, total_tokens = 0.0, 0
    batches = windows.batches(batch_size)
    with tqdm(batches, desc="perplexity", unit="batch", disable=not progress) as bar:
        for input_ids, mask in bar:
            input_ids, mask = input_ids.to(device), mask.to(device)
            logits = model(input_ids=input_ids, attention_mask=mask, use_cache=False).logits
            targets = input_ids[:, 1:].masked_fill(mask[:, 1:] == 0, -100)
            nll = nn.functional.cross_entropy(
                logits[:, :-1].float().reshape(-1, logits.shape[-1]), targets.reshape(-1),
                ignore_index=-100, reduction="sum")
            total_nll += nll.item()
            total_tokens += int((targets != -100).sum())
    if total_tokens == 0:
        raise SliceGPTError("no tokens to evaluate")
    value = math.exp(total_nll / total_tokens)
    if not math.isfinite(value):
        raise SliceGPTError("perplexity is not finite: the model produces NaN/inf logits")
    return value
