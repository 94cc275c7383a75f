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
    batches = windows.batches(batch_size)

    def logits():
        with tqdm(batches, desc="perplexity", unit="batch", disable=not progress) as bar:
            for input_ids, mask in bar:
                yield model(input_ids=input_ids.to(device), attention_mask=mask.to(device), use_cache=False).logits

    return _perplexity(batches, logits())


def streamed_perplexity(view, layers_path: str, batches, offload: str = "cpu", offload_dir=None,
                        progress: bool = True) -> float:
    """`perplexity` of a model too big to hold: computed one layer at a time (`core.forward`), the same number."""
    from slicegpt.core.forward import streamed_logits

    return _perplexity(batches, streamed_logits(view, layers_path, batches, offload, offload_dir, progress))


def _perplexity(batches, logits) -> float:
    """exp of the mean next-token NLL, padding excluded, from each batch's logits."""
    total_nll, total_tokens = 0.0, 0
    for (input_ids, mask), batch_logits in zip(batches, logits):
        input_ids, mask = input_ids.to(batch_logits.device), mask.to(batch_logits.device)
        targets = input_ids[:, 1:].masked_fill(mask[:, 1:] == 0, -100)
        nll = nn.functional.cross_entropy(
            batch_logits[:, :-1].float().reshape(-1, batch_logits.shape[-1]), targets.reshape(-1),
            ignore_index=-100, reduction="sum")
        total_nll += nll.item()
        total_tokens += int((targets != -100).sum())
    if total_tokens == 0:
        raise SliceGPTError("no tokens to evaluate")
    value = math.exp(total_nll / total_tokens)
    if not math.isfinite(value):
        raise SliceGPTError("perplexity is not finite: the model produces NaN/inf logits")
    return value
