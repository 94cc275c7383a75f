"""The calibration streams: the activations at one block boundary, per batch, and how a step advances them.

Slicing holds up to two streams at the current boundary: the sliced model's (always) and the
dense model's (only with compensation, on a share of the batches). Each `Stream` owns its
`ActivationCache`, so each is created, checkpointed and closed by whoever owns it. The
keyword arguments the family's forward gives each layer (`LayerArguments`) are per batch,
the same for both streams: the stream that captured them keeps them, and the other shares them.
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Callable, Iterator, Sequence

import torch
from torch import nn

from slicegpt.adapters import ModelAdapter
from slicegpt.adapters.base import Branch
from slicegpt.core.bases import Covariance
from slicegpt.core.cache import ActivationCache, LayerArguments
from slicegpt.core.onload import LayeredModel
from slicegpt.core.transform import check_finite
from slicegpt.modeling.runtime import get_path, layer_arguments, run_branch

Batch = tuple[torch.Tensor, torch.Tensor]  # input_ids [b, L], attention_mask [b, L]


class _StopForward(Exception):
    pass


@torch.no_grad()
def capture(view: LayeredModel, adapter: ModelAdapter, batches: Sequence[Batch], cache: ActivationCache | None,
            arguments: LayerArguments) -> None:
    """Run the model's own forward with every decoder layer stubbed out.

    Stores the first layer's input per batch in `cache` (unless None) and, per batch and
    layer, the keyword arguments the family's forward gives that layer (masks, rotary
    embeddings, position ids). They differ between layers in some families (Gemma 2/3
    alternate sliding-window and global attention), so each layer gets its own. Only the
    embeddings are computed; the layers' weights need not be onloaded.
    """
    model = view.model
    layers = list(get_path(model, adapter.layers))
    current: list[dict] = []

    def stub(index: int):
        def forward(*args, **kw):
            hidden = args[0] if args else kw.pop("hidden_states")
            if index == 0 and cache is not None:
                cache.append(hidden)
            current.append(layer_arguments(type(layers[index]), args[1:], kw))
            if index == len(layers) - 1:
                raise _StopForward
            return hidden
        return forward

    for i, layer in enumerate(layers):
        layer.forward = stub(i)
    try:
        for input_ids, mask in batches:
            current = []
            try:
                model(input_ids=input_ids.to(view.device), attention_mask=mask.to(view.device), use_cache=False)
            except _StopForward:
                pass
            arguments.add(current)
    finally:
        for layer in layers:
            del layer.forward


@contextmanager
def dense_entry(view: LayeredModel, adapter: ModelAdapter, batches: Sequence[Batch], offload: str = "cpu",
                offload_dir=None) -> Iterator[tuple[ActivationCache, LayerArguments]]:
    """The dense model's first-layer inputs per batch (a cache) and every layer's arguments, for a probe
    that then runs the layers itself; the model's ends are on the device only while they are captured."""
    ends = outside(view.model, (adapter.layers, adapter.final_norm, adapter.head))
    for path in ends:
        view.onload(path)
    with ActivationCache(offload, offload_dir) as cache:
        arguments = LayerArguments(cache)
        capture(view, adapter, batches, cache, arguments)
        for path in ends:
            view.offload(path)
        yield cache, arguments


def outside(model: nn.Module, excluded: Sequence[str]) -> list[str]:
    """Top-level parameter owners that are none of `excluded` (nor inside one): the model's ends."""
    names = []
    for name, _ in model.named_parameters(remove_duplicate=False):
        if not any(name == p or name.startswith(p + ".") for p in excluded):
            names.append(name.rpartition(".")[0])
    return list(dict.fromkeys(names))


def residual(layer: nn.Module, group: tuple[Branch, ...], specs: dict[str, dict], x: torch.Tensor, kwargs: dict,
             skip: torch.Tensor | None = None, normed: dict | None = None) -> torch.Tensor:
    """The stream after one residual step: ``skip + sum of branch(x)`` over the step's branches.

    `skip` is what the step passes on unchanged, x itself by default (the dense model); the
    sliced model passes on ``z Q^T`` while its branches read z. Parallel branches share
    their normalised input (`normed`, filled in per norm: compensation reads it)."""
    normed = {} if normed is None else normed
    h = x if skip is None else skip
    for branch in group:
        h = h + run_branch(layer, specs[branch.name], x, kwargs, normed)
    return h


def dense_step(stream: "Stream", layer: nn.Module, li: int, group: tuple[Branch, ...], specs: dict[str, dict],
               cov: Covariance | None = None) -> None:
    """The dense model's step on `stream` (h = x + branch(x)); `cov` gathers the new stream's statistics."""
    stream.advance(li, lambda x, kwargs: residual(layer, group, specs, x, kwargs), f"of layer {li} ({step_name(group)})",
                   cov)


def step_name(group: tuple[Branch, ...]) -> str:
    return "+".join(b.name for b in group)


class Stream:
    """One calibration stream at the current boundary: its own cache of per-batch activations.

    `name` ("sliced" or "dense") names its snapshot in a resume checkpoint. `arguments` are
    the per-layer keyword arguments of each batch; a stream created without them keeps its
    own (filled by `capture`), in its cache."""

    def __init__(self, name: str, masks: Sequence[torch.Tensor], device: torch.device, offload: str = "cpu",
                 offload_dir=None, arguments: LayerArguments | None = None) -> None:
        self.name = name
        self.cache = ActivationCache(offload, offload_dir)
        self.arguments = arguments if arguments is not None else LayerArguments(self.cache)
        self.masks, self.device = masks, device

    def __len__(self) -> int:
        return len(self.cache)

    def get(self, b: int) -> torch.Tensor:
        return self.cache.get(b, self.device)

    def put(self, b: int, x: torch.Tensor) -> None:
        self.cache.put(b, x)

    def append(self, x: torch.Tensor) -> None:
        self.cache.append(x)

    def mask(self, b: int) -> torch.Tensor:
        return self.masks[b].to(self.device)

    def kwargs(self, li: int, b: int) -> dict:
        """Layer `li`'s keyword arguments for batch `b`."""
        return self.arguments.get(li, b, self.device)

    def advance(self, li: int, step: Callable[[torch.Tensor, dict], torch.Tensor], where: str,
                cov: Covariance | None = None) -> None:
        """Replace each batch x by ``step(x, kwargs)``, checked finite; `cov` gathers the new stream's statistics."""
        for b in range(len(self)):
            h = step(self.get(b), self.kwargs(li, b))
            check_finite(h, where)
            if cov is not None:
                cov.update(h, self.mask(b))
            self.put(b, h)

    def transform(self, matrix: torch.Tensor) -> None:
        """Every batch times `matrix` (a change of basis)."""
        for b in range(len(self)):
            self.put(b, self.get(b) @ matrix)

    def close(self) -> None:
        self.cache.close()

    def __enter__(self) -> "Stream":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
