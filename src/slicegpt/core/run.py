"""One slicing job's shared state: the model view, the calibration batches, where finished work goes.

`Run` is what every step needs and no step changes: the layers (onloaded and fused one at a
time), the model's ends, the settings of the stream. `Hooks` is the caller's side: finished
parts are handed over as they are done, and a `Progress` record after every layer lets an
interrupted job resume (`core.resume`).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Sequence

import torch
from torch import nn
from tqdm.auto import tqdm

from slicegpt.adapters import ModelAdapter
from slicegpt.adapters.base import branch_groups
from slicegpt.core.bases import Covariance
from slicegpt.core.cache import ActivationCache, LayerArguments
from slicegpt.core.compensation import FitRecord
from slicegpt.core.distributed import Ranks
from slicegpt.core.invariance import fuse_entry, fuse_layer
from slicegpt.core.onload import LayeredModel
from slicegpt.core.streams import Batch, Stream, capture, outside
from slicegpt.core.transform import ModuleAttributes
from slicegpt.errors import SliceGPTError
from slicegpt.modeling.runtime import get_path

POOLINGS = ("unit-trace", "tokens")  # how uniform rotation weighs the block boundaries
COMPENSATIONS = ("off", "writers", "all")  # "all": the readers are refitted too
ROTATIONS = ("per-layer", "uniform")


@dataclass
class SliceOutcome:
    """What the engine learned beyond the weights: the record a sliced model is saved with."""

    structure: dict = field(default_factory=dict)  # the layer structure the loader rebuilds
    module_attributes: ModuleAttributes = field(default_factory=dict)
    spectra: list[torch.Tensor] = field(default_factory=list)  # eigenvalues per boundary
    tied_head: bool = False
    fits: list[FitRecord] = field(default_factory=list)  # compensation: each fit's calibration error


@dataclass
class Progress:
    """Where a run stands after a finished layer: everything a resumed run needs but the activations."""

    phase: str  # "layers" (per-layer), "statistics" or "weights" (uniform)
    next_layer: int
    tensors: dict[str, torch.Tensor] = field(default_factory=dict)  # basis, running sums (float64)
    spectra: list[torch.Tensor] = field(default_factory=list)
    module_attributes: ModuleAttributes = field(default_factory=dict)
    fits: list[FitRecord] = field(default_factory=list)  # compensation's records so far


Snapshot = dict[str, list]  # per stream name ("sliced", "dense"): its activations, one entry per batch


class Hooks:
    """Where the engine hands finished work. The defaults keep everything in memory (no resume)."""

    def write(self, part: int, tensors: dict[str, torch.Tensor]) -> None:
        """Part 0: before the layers; 1..n: decoder layer part-1; n+1: final norm and head."""

    def checkpoint(self, progress: Progress, streams: dict[str, ActivationCache] | None) -> None:
        """A layer finished and its part is written: record how to continue from here.

        `streams`: the activations at this boundary per stream name (None: there are none)."""

    def resume(self) -> tuple[Progress, Snapshot | None] | None:
        """The last checkpoint of an interrupted run of the same job, or None."""
        return None


def part_tensors(model: nn.Module, prefixes: Sequence[str], skip: Sequence[str] = ()) -> dict[str, torch.Tensor]:
    """The state-dict entries under `prefixes` (each parameter once), for writing a finished part."""
    out: dict[str, torch.Tensor] = {}
    seen: set[int] = set()
    for name, tensor in model.state_dict(keep_vars=True).items():
        if name in skip or not any(name == p or name.startswith(p + ".") for p in prefixes):
            continue
        if tensor.device.type == "meta":
            raise SliceGPTError(f"internal error: {name} was not onloaded before it was written")
        if id(tensor) in seen:  # a tied parameter, written once (two equal bases may share storage)
            continue
        seen.add(id(tensor))
        out[name] = tensor.detach()
    return out


class Run:
    """One slicing job: the model view, the calibration batches and the settings, shared by the steps."""

    def __init__(self, view: LayeredModel, adapter: ModelAdapter, batches: Sequence[Batch], hooks: Hooks,
                 progress: bool, offload: str, offload_dir, ranks: Ranks | None = None, fold: bool = True) -> None:
        self.ranks = ranks or Ranks()  # `batches` is this rank's share of the calibration windows
        self.view, self.adapter, self.hooks = view, adapter, hooks
        self.progress = progress and self.ranks.writer
        self.model = view.model
        self.batches = batches
        self.masks = [mask for _, mask in batches]
        self.n = len(self.masks)
        self.layers = get_path(self.model, adapter.layers)
        self.groups = branch_groups(adapter.branches)
        self.embedding = adapter.embeddings[0]
        self.hidden = get_path(self.model, self.embedding).weight.shape[-1]
        self.dtype = get_path(self.model, self.embedding).weight.dtype
        self.ends = outside(self.model, (adapter.layers, adapter.final_norm, adapter.head))
        self.offload, self.offload_dir = offload, offload_dir
        self.resumed = hooks.resume()
        self.fused: set[int] = set()  # layers whose norms are folded in the copy now held
        # whether layer norms fold their gains into their readers (a rotated stream needs unit gains; an
        # unrotated one keeps the model's own gains, which quantize best: docs/outputs.md)
        self.fold = fold
        self.entry_fused = False

    @property
    def device(self) -> torch.device:
        return self.view.device

    @property
    def n_steps(self) -> int:
        return len(self.layers) * len(self.groups)

    def stream(self, name: str, arguments: LayerArguments | None = None) -> Stream:
        """A new, empty stream; its owner closes it."""
        return Stream(name, self.masks, self.device, self.offload, self.offload_dir, arguments)

    def cache(self) -> ActivationCache:
        """Scratch activations of one step; its owner closes it."""
        return ActivationCache(self.offload, self.offload_dir)

    def start(self, stream: Stream) -> None:
        """The layer inputs (fresh run) or the checkpointed activations (resumed run), and the layer arguments."""
        if self.resumed is None:
            capture(self.view, self.adapter, self.batches, stream.cache, stream.arguments)
            return
        capture(self.view, self.adapter, self.batches, None, stream.arguments)
        self.restore(stream)

    def restore(self, stream: Stream) -> None:
        """The stream's checkpointed activations, one snapshot file at a time."""
        for x in (self.resumed[1] or {}).get(stream.name, []):
            stream.append(x.load() if hasattr(x, "load") else x)

    def checkpoint(self, progress: Progress, streams: Sequence[Stream]) -> None:
        self.hooks.checkpoint(progress, {s.name: s.cache for s in streams} if streams else None)

    def onload_ends(self, tied_head: bool = False) -> None:
        """The model's ends (embeddings, entry linears), their LayerNorm entry made zero-mean once per copy."""
        for path in self.ends:
            self.view.onload(path)
        if not self.entry_fused:
            fuse_entry(self.model, self.adapter, tied_head=tied_head)
            self.entry_fused = True

    def offload_ends(self) -> None:
        for path in self.ends:
            self.view.offload(path)
        self.entry_fused = self.entry_fused and self.view.keeps_changes  # a fresh copy comes next time

    def write(self, part: int, prefixes: Sequence[str], skip: Sequence[str] = ()) -> None:
        self.hooks.write(part, part_tensors(self.model, prefixes, skip))

    def layer(self, li: int) -> nn.Module:
        """Decoder layer `li` on the device with its norms folded (once per copy of its weights; not at all
        without `fold`)."""
        layer = self.view.onload(f"{self.adapter.layers}.{li}")
        if self.fold and li not in self.fused:
            fuse_layer(layer, self.adapter)
            self.fused.add(li)
        return layer

    def release(self, li: int) -> None:
        self.view.offload(f"{self.adapter.layers}.{li}")
        if not self.view.keeps_changes:  # the next onload reads the source again
            self.fused.discard(li)

    def bar(self, total: int, desc: str, initial: int = 0) -> tqdm:
        return tqdm(total=total, initial=initial, desc=desc, unit="step", disable=not self.progress)

    def basis(self, cov: Covariance) -> tuple[torch.Tensor, torch.Tensor]:
        """Eigenvalues and eigenvectors of the covariance summed over every rank, the same on each."""
        values, vectors = cov.reduce(self.ranks).eigh()
        self.ranks.same(values, vectors)
        return values, vectors
