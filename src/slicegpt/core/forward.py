"""A forward pass over many windows with one layer onloaded at a time (perplexity of big models).

The same onloading as slicing: the embeddings (and the per-layer arguments the family's
forward computes) by the model's own forward with the layers stubbed out, then each layer
over every batch, the activations in an `ActivationCache`; at the end the model's own
forward again, its last layer returning the cached stream, so the final norm, the head and
whatever the family does after them (logit soft-capping) are the family's own code.
"""

from __future__ import annotations

import math
from typing import Iterator, Sequence

import torch
from torch import nn
from tqdm.auto import tqdm

from slicegpt.core.cache import ActivationCache, LayerArguments
from slicegpt.core.engine import Batch, capture
from slicegpt.core.onload import LayeredModel
from slicegpt.errors import SliceGPTError
from slicegpt.formats.sliced_modeling import get_path


class _Adapterless:
    """What `capture` needs of an adapter: where the layers are."""

    def __init__(self, layers: str) -> None:
        self.layers = layers


@torch.no_grad()
def streamed_logits(view: LayeredModel, layers_path: str, batches: Sequence[Batch], offload: str = "cpu",
                    offload_dir=None, progress: bool = True) -> Iterator[torch.Tensor]:
    """The model's logits per batch, computed one layer at a time over all the batches."""
    model = view.model
    layers = get_path(model, layers_path)
    ends = sorted({n.rpartition(".")[0] for n, _ in model.named_parameters(remove_duplicate=False)
                   if not n.startswith(layers_path + ".")})
    for path in ends:
        view.onload(path)
    try:
        with ActivationCache(offload, offload_dir) as cache:
            arguments = LayerArguments(cache)
            capture(view, _Adapterless(layers_path), batches, cache, arguments)
            with tqdm(total=len(layers), desc="forward", unit="layer", disable=not progress) as bar:
                for li in range(len(layers)):
                    layer = view.onload(f"{layers_path}.{li}")
                    for b in range(len(cache)):
                        out = layer(cache.get(b, view.device), **arguments.get(li, b, view.device))
                        cache.put(b, out[0] if isinstance(out, tuple) else out)
                    view.offload(f"{layers_path}.{li}")
                    bar.update()
            for b, (input_ids, mask) in enumerate(batches):
                yield _logits(model, layers, input_ids.to(view.device), mask.to(view.device), cache.get(b, view.device))
    finally:
        for path in ends:
            view.offload(path)


def streamed_perplexity(view: LayeredModel, layers_path: str, batches: Sequence[Batch], offload: str = "cpu",
                        offload_dir=None, progress: bool = True) -> float:
    """exp of the mean next-token NLL, computed layer by layer (equal to `evaluation.perplexity`)."""
    total_nll, total_tokens = 0.0, 0
    for (input_ids, mask), logits in zip(batches, streamed_logits(view, layers_path, batches, offload, offload_dir,
                                                                  progress)):
        targets = input_ids[:, 1:].to(logits.device).masked_fill(mask[:, 1:].to(logits.device) == 0, -100)
        nll = nn.functional.cross_entropy(logits[:, :-1].float().reshape(-1, logits.shape[-1]),
                                          targets.reshape(-1), ignore_index=-100, reduction="sum")
        total_nll += nll.item()
        total_tokens += int((targets != -100).sum())
    if total_tokens == 0:
        raise SliceGPTError("no tokens to evaluate")
    value = math.exp(total_nll / total_tokens)
    if not math.isfinite(value):
        raise SliceGPTError("perplexity is not finite: the model produces NaN/inf logits")
    return value


def _logits(model: nn.Module, layers, input_ids: torch.Tensor, mask: torch.Tensor, final: torch.Tensor) -> torch.Tensor:
    """The model's own forward with every layer passing its input on and the last one returning `final`."""
    def passthrough(*args, **kw):
        return args[0] if args else kw["hidden_states"]

    def last(*args, **kw):
        return final

    for layer in layers:
        layer.forward = passthrough
    layers[len(layers) - 1].forward = last
    try:
        return model(input_ids=input_ids, attention_mask=mask, use_cache=False).logits
    finally:
        for layer in layers:
            del layer.forward
