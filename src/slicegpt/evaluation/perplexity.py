"""Perplexity (non-overlapping windows, mean token NLL, exp) and honest parameter counts."""

from __future__ import annotations

import math

import torch
from torch import nn
from tqdm.auto import tqdm

from slicegpt.core.distributed import Ranks
from slicegpt.data import Windows
from slicegpt.errors import SliceGPTError


def count_parameters(model: nn.Module) -> int:
    """Every parameter once: shared (tied) tensors once, skip-connection matrices included."""
    return sum(p.numel() for p in model.parameters())


@torch.no_grad()
def perplexity(model: nn.Module, windows: Windows, batch_size: int = 2, progress: bool = True,
               ranks: Ranks | None = None) -> float:
    """exp of the mean next-token NLL over every predicted token of every window.

    With `ranks` (a distributed job) each rank evaluates its share of the windows and the sums
    are added, so every rank returns the number one process would."""
    ranks = ranks or Ranks()
    device = next(model.parameters()).device
    batches = ranks.part(windows).batches(batch_size)
    progress = progress and ranks.writer

    def logits():
        with tqdm(batches, desc="perplexity", unit="batch", disable=not progress) as bar:
            for input_ids, mask in bar:
                yield model(input_ids=input_ids.to(device), attention_mask=mask.to(device), use_cache=False).logits

    return _perplexity(batches, logits(), ranks)


def streamed_perplexity(view, layers_path: str, batches, offload: str = "cpu", offload_dir=None,
                        progress: bool = True, ranks: Ranks | None = None) -> float:
    """`perplexity` of a model too big to hold: computed one layer at a time (`core.forward`), the same number.

    In a distributed job `batches` are this rank's share of the windows."""
    from slicegpt.core.forward import streamed_logits

    ranks = ranks or Ranks()
    logits = streamed_logits(view, layers_path, batches, offload, offload_dir, progress and ranks.writer)
    return _perplexity(batches, logits, ranks)


def _perplexity(batches, logits, ranks: Ranks) -> float:
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
    total_nll, total_tokens = ranks.sum_number(total_nll), int(ranks.sum_number(total_tokens))
    if total_tokens == 0:
        raise SliceGPTError("no tokens to evaluate")
    value = math.exp(total_nll / total_tokens)
    if not math.isfinite(value):
        raise SliceGPTError("perplexity is not finite: the model produces NaN/inf logits")
    return value
