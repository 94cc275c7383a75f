"""A forward pass over many windows with one layer onloaded at a time (for the perplexity of big models).

The same onloading as slicing: the embeddings (and the per-layer arguments the family's
forward computes) by the model's own forward with the layers stubbed out, then each layer
over every batch, the activations in an `ActivationCache`; at the end the model's own
forward again, its last layer returning the cached stream, so the final norm, the head and
whatever the family does after them (logit soft-capping) are the family's own code.
"""

from __future__ import annotations

from typing import Iterator, Sequence

import torch
from torch import nn
from tqdm.auto import tqdm

from slicegpt.core.cache import ActivationCache, LayerArguments
from slicegpt.core.streams import Batch, capture
from slicegpt.core.onload import LayeredModel
from slicegpt.modeling.runtime import get_path


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
