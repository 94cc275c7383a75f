"""The slicing algorithm, written once: a loop over onloaded layers, one step function per residual step.

Per-layer rotation (the paper's). For each residual step i (attention, MLP, or parallel
branches) the stream entering it is held sliced, ``z_i = x_i Q_i[:, :k_i]``. The step's readers
are rotated and sliced first and it runs once on ``z_i``, its writers still in the original
basis, which gives the full-width signal after it, ``x_{i+1} = z_i Q_i^T + branch(z_i)``,
exactly the function the sliced model computes (its norms act on k coordinates with
constants rescaled to match). Its covariance gives Q_{i+1}; then inputs and outputs are
rotated, the skip gets ``S_i = Q_i[:, :k_i]^T Q_{i+1}[:, :k_{i+1}]``, and
``z_{i+1} = x_{i+1} Q_{i+1}[:, :k_{i+1}]``. Each branch is evaluated once, and only one
boundary's activations are held (in an `ActivationCache`, on CPU or disk).

Uniform rotation: one Q for the whole stream (PCA of the pooled covariance of the dense
stream), so no skip matrices; the result is a stock model of the same family (`standard`).
It streams in two passes: statistics over the layers, then the weights.

Three concerns stay apart: statistics (`bases.Covariance`, plain sums that merge), the choice
of a basis from them (`bases`), and the weight changes (`transform`). Where the weights come
from (`onload`) and where finished parts go (`Hooks`: written as they finish, and a resume
checkpoint) are the caller's.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Sequence

import torch
from torch import nn
from tqdm.auto import tqdm

from slicegpt.adapters import ModelAdapter
from slicegpt.adapters.base import Branch, branch_groups
from slicegpt.core.bases import Covariance, fit_diagonal_gain, ordered_eigh, zero_mean_basis
from slicegpt.core.compensation import RIDGE, FitRecord, LeastSquares, prune
from slicegpt.core.cache import ActivationCache, LayerArguments
from slicegpt.core.distributed import Ranks
from slicegpt.core.onload import LayeredModel
from slicegpt.core.transform import (ModuleAttributes, check_finite, drop_neurons, resize_norm, rotate_reads, rotate_writes,
                                     targets)
from slicegpt.errors import SliceGPTError
from slicegpt.core.invariance import fuse_entry, fuse_exit, fuse_layer, tie_head
from slicegpt.modeling.runtime import (ENTRY, attach_structure, get_path, layer_arguments, record_structure,
                                              run_branch)
from slicegpt.core.weights import output_matrix, resolve, rotate_input, rotate_output, set_output_matrix

Batch = tuple[torch.Tensor, torch.Tensor]  # input_ids [b, L], attention_mask [b, L]
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


class Hooks:
    """Where the engine hands finished work. The defaults keep everything in memory (no resume)."""

    def write(self, part: int, tensors: dict[str, torch.Tensor]) -> None:
        """Part 0: before the layers; 1..n: decoder layer part-1; n+1: final norm and head."""

    def checkpoint(self, progress: Progress, cache: ActivationCache | None) -> None:
        """A layer finished and its part is written: record how to continue from here."""

    def resume(self) -> tuple[Progress, list[torch.Tensor] | None] | None:
        """The last checkpoint of an interrupted run of the same job, or None."""
        return None


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


def outside(model: nn.Module, excluded: Sequence[str]) -> list[str]:
    """Top-level parameter owners that are none of `excluded` (nor inside one): the model's ends."""
    names = []
    for name, _ in model.named_parameters(remove_duplicate=False):
        if not any(name == p or name.startswith(p + ".") for p in excluded):
            names.append(name.rpartition(".")[0])
    return list(dict.fromkeys(names))


def _tensors(model: nn.Module, prefixes: Sequence[str], skip: Sequence[str] = ()) -> dict[str, torch.Tensor]:
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


class _Run:
    """One slicing job: the model view, the calibration stream and the settings, shared by the steps."""

    def __init__(self, view: LayeredModel, adapter: ModelAdapter, batches: Sequence[Batch], hooks: Hooks,
                 progress: bool, offload: str, offload_dir, compensate: str = "off", ridge: float = RIDGE,
                 ranks: Ranks | None = None, neurons: int | None = None, identity: bool = False,
                 dense_batches: int | None = None) -> None:
        self.ranks = ranks or Ranks()  # `batches` is this rank's share of the calibration windows
        self.view, self.adapter, self.hooks = view, adapter, hooks
        self.progress = progress and self.ranks.writer
        self.model = view.model
        self.batches = batches
        self.masks = [mask for _, mask in batches]
        self.n = len(self.masks)  # cache entries [0, n): the sliced stream; [n, 2n): the dense one (compensation)
        if compensate not in COMPENSATIONS:
            raise SliceGPTError(f"compensate must be one of {', '.join(COMPENSATIONS)}, got {compensate!r}")
        self.compensate, self.fit_readers, self.ridge = compensate != "off", compensate == "all", ridge
        # compensation: the dense stream runs on the first `dense_batches` batches (None: all; cache
        # entries [n, n + that)); on the others a fit's target is the dense weights' output on the sliced input
        if dense_batches is not None and not 0 <= dense_batches <= self.n:
            raise SliceGPTError(f"internal error: {dense_batches} dense batches of {self.n}")
        self.partial_dense = self.compensate and dense_batches is not None  # the same on every rank
        self.dense_batches = 0 if not self.compensate else self.n if dense_batches is None else dense_batches
        # whether any rank has dense batches (if none, a fit without neurons to prune returns P)
        self.any_dense = self.compensate and (not self.partial_dense or self.ranks.sum_number(self.dense_batches) > 0)
        if neurons is not None and not self.compensate:
            raise SliceGPTError("pruning MLP neurons refits the down projection: it needs compensation "
                                "(--compensate writers or all)")
        self.neurons = neurons  # MLP neurons kept per layer (None: all)
        self.identity = identity  # the stream keeps its basis (only neurons pruned): nothing to rotate
        self.layers = get_path(self.model, adapter.layers)
        self.groups = branch_groups(adapter.branches)
        self.embedding = adapter.embeddings[0]
        self.hidden = get_path(self.model, self.embedding).weight.shape[-1]
        self.dtype = get_path(self.model, self.embedding).weight.dtype
        self.ends = outside(self.model, (adapter.layers, adapter.final_norm, adapter.head))
        self.offload, self.offload_dir = offload, offload_dir
        self.resumed = hooks.resume()
        self.fused: set[int] = set()  # layers whose norms are folded in the copy now held
        self.entry_fused = False

    @property
    def device(self) -> torch.device:
        return self.view.device

    def new_cache(self) -> ActivationCache:
        return ActivationCache(self.offload, self.offload_dir)

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

    def start(self, cache: ActivationCache, arguments: LayerArguments) -> None:
        """Layer inputs (fresh run) or the checkpointed activations (resumed run), and the layer arguments."""
        if self.resumed is None:
            capture(self.view, self.adapter, self.batches, cache, arguments)
            return
        capture(self.view, self.adapter, self.batches, None, arguments)
        for x in self.resumed[1] or []:  # one snapshot file at a time
            cache.append(x.load() if hasattr(x, "load") else x)

    def write(self, part: int, prefixes: Sequence[str], skip: Sequence[str] = ()) -> None:
        self.hooks.write(part, _tensors(self.model, prefixes, skip))

    def layer(self, li: int) -> nn.Module:
        """Decoder layer `li` on the device with its norms folded (once per copy of its weights)."""
        layer = self.view.onload(f"{self.adapter.layers}.{li}")
        if li not in self.fused:
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

    def solve(self, fit: LeastSquares, prior: torch.Tensor) -> tuple[torch.Tensor, float, float]:
        """Compensation's fit over every rank's tokens, the same on each."""
        w, error_prior, error_fit = fit.reduce(self.ranks).solve(prior, self.ridge)
        self.ranks.same(w)
        return w, error_prior, error_fit


def _specs(structure: dict) -> dict[str, dict]:
    return {b["name"]: b for b in structure["branches"]}


def _step_name(group: tuple[Branch, ...]) -> str:
    return "+".join(b.name for b in group)


@torch.no_grad()
def slice_layers(view: LayeredModel, adapter: ModelAdapter, batches: Sequence[Batch], widths: Sequence[int], *,
                 slice_head: bool = False, keep_tied_head: bool = True, progress: bool = True,
                 hooks: Hooks | None = None, offload: str = "cpu", offload_dir=None, compensate: str = "off",
                 ridge: float = RIDGE, ranks: Ranks | None = None, neurons: int | None = None,
                 dense_batches: int | None = None) -> SliceOutcome:
    """Per-layer rotation: each block boundary b gets its own basis of width `widths[b]`.

    `compensate` ("writers", or "all" for the readers too) refits every step against the dense
    model (see `core.compensation`); the dense stream then travels beside the sliced one, on
    the first `dense_batches` batches (None: all; the fits' targets on the others are the
    dense weights' output on the sliced input, `compensation.dense_first_batches`).
    `neurons` (with compensation): each MLP keeps that many neurons, pruned in its writers' fit.

    `widths` has one entry per boundary: after the embeddings, then after every residual step
    (the last one is used only when the head is sliced). A head tied to the embeddings stays
    tied (`keep_tied_head`, when the head is not sliced): the embedding table keeps its d
    columns and the first layer multiplies the stream by Q_0[:, :k] (d x k). That is the same
    function as slicing the embedding columns, and costs d*k parameters instead of an untied
    vocab x d head (the paper's way).
    """
    hooks = hooks or Hooks()
    run = _Run(view, adapter, batches, hooks, progress, offload, offload_dir, compensate, ridge, ranks, neurons,
               dense_batches=dense_batches)
    model, hidden, dtype, layers = run.model, run.hidden, run.dtype, run.layers
    n_steps = len(layers) * len(run.groups)
    if len(widths) != n_steps + 1:
        raise SliceGPTError(f"per-layer rotation needs {n_steps + 1} widths (one per boundary), got {len(widths)}")
    tied = per_layer_ties(view, adapter, keep_tied_head, slice_head)
    outcome = SliceOutcome(structure=adapter.structure(tied_head=tied), tied_head=tied)
    specs = _specs(outcome.structure)

    if not tied:  # embeddings and head end up in different bases; the head keeps the source's weights
        view.untie_head(adapter)
    run.onload_ends(tied_head=tied)
    with run.new_cache() as cache:
        arguments = LayerArguments(cache)
        run.cache, run.arguments = cache, arguments
        run.start(cache, arguments)
        if run.resumed is None:
            first = 0
            cov = Covariance(hidden, run.device)
            for b in range(run.n):
                x = cache.get(b, run.device)
                if tied and adapter.norm_kind == "layernorm":  # the stream's mean, which every LayerNorm drops
                    x = x - x.mean(dim=-1, keepdim=True)
                    cache.put(b, x)
                check_finite(x, "after the embeddings")
                cov.update(x, run.masks[b].to(run.device))
            values, q = run.basis(cov)
            outcome.spectra.append(values)
            q = q[:, :widths[0]]
            if not tied:
                for path in adapter.embeddings:
                    rotate_input(resolve(model, path), q)
                for path in adapter.entry_writers:
                    rotate_output(resolve(model, path), q)
            q_dtype = q.to(dtype)
            for b in range(run.n):
                if b < run.dense_batches:
                    cache.append(cache.get(b, run.device))  # the dense stream, entry n + b
                cache.put(b, cache.get(b, run.device) @ q_dtype)
            run.write(0, run.ends)
            entry = (q - q.mean(dim=0, keepdim=True) if adapter.norm_kind == "layernorm" else q) if tied else None
        else:
            state = run.resumed[0]
            first, q = state.next_layer, state.tensors["basis"].to(run.device)
            outcome.spectra, outcome.module_attributes, outcome.fits = state.spectra, state.module_attributes, state.fits
            entry = None  # only layer 0 takes it, and a checkpoint comes after a whole layer
        run.offload_ends()

        with run.bar(n_steps, "slicing", first * len(run.groups)) as bar:
            for li in range(first, len(layers)):
                layer = run.layer(li)
                prefix = f"{adapter.layers}.{li}"
                if li == 0 and entry is not None:  # (I - 11^T/d) Q for LayerNorm families
                    layer.register_parameter(ENTRY, nn.Parameter(entry.to(device=run.device, dtype=dtype)))
                for gi, group in enumerate(run.groups):
                    step = li * len(run.groups) + gi
                    last = step == n_steps - 1
                    q = _per_layer_step(run, layer, li, group, specs, q, widths[step + 1],
                                        exit_basis=last and not slice_head, outcome=outcome, prefix=prefix,
                                        step=step)
                    bar.update()
                run.write(li + 1, [prefix])
                run.release(li)
                hooks.checkpoint(Progress("layers", li + 1, {"basis": q}, outcome.spectra,
                                          outcome.module_attributes, outcome.fits), cache)

    view.onload(adapter.final_norm)
    if not tied:
        view.onload(adapter.head)
        fuse_exit(model, adapter)
        eps = resize_norm(get_path(model, adapter.final_norm), adapter, q.shape[1], hidden)
        if eps is not None:
            outcome.module_attributes[adapter.final_norm] = {adapter.norm_eps_attr: eps}
        rotate_input(resolve(model, adapter.head), q)
    run.write(len(layers) + 1, [adapter.final_norm, adapter.head],
              skip=[f"{adapter.head}.weight"] if tied else [])
    if view.keeps_changes:
        attach_structure(model, outcome.structure)
        record_structure(model, outcome.structure, outcome.module_attributes)
    return outcome


def per_layer_ties(view: LayeredModel, adapter: ModelAdapter, keep_tied_head: bool, slice_head: bool) -> bool:
    """Whether per-layer rotation keeps a tied head tied (with an entry matrix instead of sliced embeddings)."""
    return (keep_tied_head and not slice_head and not adapter.entry_writers
            and view.ties_head(adapter.head, adapter.embeddings[0]))


def _per_layer_step(run: _Run, layer: nn.Module, li: int, group: tuple[Branch, ...], specs: dict,
                    q: torch.Tensor, width: int, exit_basis: bool, outcome: SliceOutcome, prefix: str,
                    step: int, fixed_basis: torch.Tensor | None = None) -> torch.Tensor:
    """One residual step: statistics of its output, the next basis, the weight changes; returns the basis.

    With `fixed_basis` (uniform rotation with compensation) the stream keeps that basis: no
    statistics, no skip matrix."""
    adapter, cache, device, dtype = run.adapter, run.cache, run.device, run.dtype
    # The branch runs on the stream as the sliced model will hold it: its norms and input
    # linears already read z (k wide), its outputs still write the original basis, so
    # z Q^T + branch(z) is the full-width signal after the step. MoE kernels write as wide
    # as they read, so there the branch runs on z Q^T through the unrotated weights instead
    # (the same function) and is rotated afterwards.
    on_sliced = not any(b.width_attrs for b in group)
    done = False  # whether the cache already holds the stream after the step
    if run.compensate and on_sliced:  # reads rotated (fitted), writers refitted in the original basis
        done = _refit(run, layer, li, group, specs, q, prefix, outcome, step,
                      writers=not (exit_basis and any(b.post_norm for b in group)))
    elif run.compensate:  # MoE kernels: no fit, but the dense stream moves on
        _dense_step(run, layer, li, group, specs, offset=run.n, count=run.dense_batches)
    if on_sliced and not run.compensate:
        rotate_reads(layer, prefix, group, adapter, q, run.hidden, outcome.module_attributes)
    q_t = q.T.to(dtype)
    cov = Covariance(run.hidden, q.device)
    for b in range(run.n):
        if done:
            if fixed_basis is None:
                cov.update(cache.get(b, device), run.masks[b].to(device))
            continue
        zb = cache.get(b, device)
        kwargs = run.arguments.get(li, b, device)
        normed: dict = {}
        x = zb if on_sliced else zb @ q_t
        h = zb @ q_t if on_sliced else x
        for branch in group:
            h = h + run_branch(layer, specs[branch.name], x, kwargs, normed)
        check_finite(h, f"of layer {li} ({_step_name(group)})")
        if fixed_basis is None:
            cov.update(h, run.masks[b].to(device))
        cache.put(b, h)
    if not on_sliced:
        rotate_reads(layer, prefix, group, adapter, q, run.hidden, outcome.module_attributes)
    if fixed_basis is not None:
        q_next = fixed_basis
    elif exit_basis:  # the head reads the original basis
        q_next = torch.eye(run.hidden, dtype=torch.float64, device=q.device)
    else:
        values, q_next = run.basis(cov)
        outcome.spectra.append(values)
        q_next = q_next[:, :width]
    if run.identity:  # the stream keeps its basis: nothing to rotate
        return q_next
    if fixed_basis is None:
        layer.register_parameter(group[0].shortcut, nn.Parameter((q.T @ q_next).to(dtype)))
    rotate_writes(layer, group, q_next, rotate_normed=not exit_basis)
    q_next_t = q_next.to(dtype)
    for b in range(run.n):
        cache.put(b, cache.get(b, device) @ q_next_t)
    return q_next


def _refit(run: _Run, layer: nn.Module, li: int, group: tuple[Branch, ...], specs: dict, q: torch.Tensor,
           prefix: str, outcome: SliceOutcome, step: int, writers: bool = True) -> bool:
    """Compensation for one step (`core.compensation`): two passes over the calibration batches.

    First the dense step runs on the dense stream (which it advances); with readers fitted
    (compensate="all") their fit pairs the dense normalised input with the sliced one,
    ``norm(z Q^T) Q`` (what the sliced norm computes), and the readers take the fitted map
    instead of Q. Then the sliced step runs with them,
    and the writers' fit pairs the inputs of its output linears (or the output of a post-norm,
    whose d x d matrix is fitted) with ``h_dense - z Q^T``. Leaves the writers in the original
    basis, for the caller to rotate. With `writers`, the stream after the step (full width)
    replaces the sliced input in the cache, computed from the fit's own inputs (no third
    pass); returns whether it did. (Refitting the skip matrix beside the writers was tried:
    SmolLM2 at 25% went from 50.1 to 54.6 held-out perplexity, so the skip stays Q_i^T Q_{i+1}.)
    """
    adapter, cache, device, dtype, n, d = run.adapter, run.cache, run.device, run.dtype, run.n, run.hidden
    k = q.shape[1]
    q_d, q_t = q.to(dtype), q.T.to(dtype)
    norms = list(dict.fromkeys(b.norm for b in group)) if run.fit_readers else []
    reads = {name: LeastSquares(k, d, device) for name in norms}
    # unrotated: a branch-output norm stays stock, so its writer is fitted before the norm, to
    # the dense writer's output (what that norm reads in the dense model)
    post = [b for b in group if b.post_norm] if run.identity and writers else []
    if post and len(group) > 1:
        raise SliceGPTError("internal error: an unrotated branch-output norm is refitted alone in its step")
    dense_out = run.new_cache() if post else None
    seen: list[torch.Tensor] = []
    handles = [get_path(layer, b.post_norm).register_forward_pre_hook(
        lambda module, args: seen.append(args[0])) for b in post]
    try:
        for b in range(run.dense_batches):
            xd = cache.get(n + b, device)
            kwargs = run.arguments.get(li, b, device)
            normed: dict = {}
            hd = xd
            for branch in group:
                hd = hd + run_branch(layer, specs[branch.name], xd, kwargs, normed)
            check_finite(hd, f"of the dense layer {li} ({_step_name(group)})")
            cache.put(n + b, hd)
            if dense_out is not None:
                dense_out.append(seen.pop())
            if norms:
                z_full = cache.get(b, device) @ q_t
                mask = run.masks[b].to(device)
                for name in norms:
                    reads[name].update(get_path(layer, name)(z_full) @ q_d, normed[name], mask)
        while handles:  # the dense pass alone is captured (and `finally` finds none left)
            handles.pop().remove()
        maps = {}
        for name, fit in reads.items():
            m, error_prior, error_fit = run.solve(fit, q.T.to(torch.float64))
            outcome.fits.append(FitRecord(step, f"readers:{name}", error_prior, error_fit))
            maps[name] = m.T
        if not run.identity:  # the readers keep the stream's own basis
            rotate_reads(layer, prefix, group, adapter, q, d, outcome.module_attributes, maps)
        if writers:
            _refit_writers(run, layer, li, group, specs, q, outcome, step, dense_out)
    finally:
        for handle in handles:
            handle.remove()
        if dense_out is not None:
            dense_out.close()
    return writers


def _refit_writers(run: _Run, layer: nn.Module, li: int, group: tuple[Branch, ...], specs: dict,
                   q: torch.Tensor, outcome: SliceOutcome, step: int, dense_out: ActivationCache | None = None
                   ) -> None:
    """Fit the step's output linears (or a post-norm's d x d output matrix) to land on the dense stream.

    The fit's inputs X are kept per batch, so the stream after the step is z Q^T + X W
    without running the branch again. With `dense_out` (the dense writer's output before its
    branch-output norm, one batch per entry) the writer is fitted to that instead, and the
    stream after the step is z + norm(X W). Batches beyond the dense stream's share
    (`run.dense_batches`) have the paper's weights' own output X P as their target; with
    none in the share and no neurons to prune the fit would return P, so it is not made."""
    cache, device, dtype, n, d = run.cache, run.device, run.dtype, run.n, run.hidden
    # per fitted output: (branch, target, has a bias); target None: a post-norm's d x d matrix
    blocks: list[tuple[Branch, object, bool]] = []
    priors = []
    neurons: tuple[Branch, range] | None = None  # the MLP whose neurons are pruned, and their rows
    for branch in group:
        if branch.post_norm and dense_out is None:
            blocks.append((branch, None, False))
            priors.append(torch.eye(d, dtype=torch.float64, device=device))
            continue
        for target in targets(layer, branch, "outputs"):
            w, bias = output_matrix(target)
            start = sum(p.shape[0] for p in priors)
            if run.neurons is not None and branch.neurons and w.shape[-1] > run.neurons:
                neurons = branch, range(start, start + w.shape[-1])
            blocks.append((branch, target, bias is not None))
            priors.append(w.T.to(torch.float64))
            if bias is not None:
                priors.append(bias.to(torch.float64)[None, :])
    prior = torch.cat(priors)
    fitting = neurons is not None or run.any_dense
    fit = LeastSquares(prior.shape[0], d, device, prior=prior if run.partial_dense else None)
    # The writers' inputs are all the fit needs of this pass: each writer only records its input
    # and returns zeros (the stream after the step is X W with the fitted W, below), which saves
    # an output matmul per branch over every batch
    captured: dict[int, torch.Tensor] = {}
    stubbed: list[nn.Module] = []
    q_t = q.T.to(dtype)

    def full(z: torch.Tensor) -> torch.Tensor:  # the sliced stream in the original basis
        return z if run.identity else z @ q_t

    inputs = run.new_cache()
    try:
        for i, (_, target, _) in enumerate(blocks):
            if target is not None:
                target[0].forward = _recording(captured, i, output_matrix(target)[0].shape[0])
                stubbed.append(target[0])
        for b in range(n):
            z = cache.get(b, device)
            kwargs, mask = run.arguments.get(li, b, device), run.masks[b].to(device)
            normed: dict = {}
            outputs = {branch.name: run_branch(layer, specs[branch.name], z, kwargs, normed) for branch in group}
            columns = []
            for i, (branch, target, has_bias) in enumerate(blocks):
                if target is None:
                    columns.append(outputs[branch.name])
                    continue
                columns.append(captured[i])
                if has_bias:
                    columns.append(torch.ones_like(captured[i][..., :1]))
            x = columns[0] if len(columns) == 1 else torch.cat(columns, dim=-1)
            if b < run.dense_batches:
                fit.update(x, cache.get(n + b, device) - full(z) if dense_out is None else dense_out.get(b, device),
                           mask)
            elif fitting:
                fit.update(x, None, mask)  # the target X P
            inputs.append(x)
        kept = None
        if neurons is not None:
            w, kept, error_prior, error_fit = prune(fit.reduce(run.ranks), prior, run.ridge, neurons[1], run.neurons,
                                                        work=torch.float64 if dtype == torch.float64 else torch.float32)
            run.ranks.same(w, kept)
        elif fitting:
            w, error_prior, error_fit = run.solve(fit, prior)
        else:  # every target is X P: the fit is P, exactly
            w, error_prior, error_fit = prior, 0.0, 0.0
        del fit, prior
        w_d = w.to(dtype)
        post_norm = get_path(layer, group[0].post_norm) if dense_out is not None else None
        for b in range(n):
            x = inputs.get(b, device)
            y = (x if kept is None else x[..., kept]) @ w_d
            h = full(cache.get(b, device)) + (post_norm(y) if post_norm is not None else y)
            check_finite(h, f"of layer {li} ({_step_name(group)})")
            cache.put(b, h)
    finally:
        for module in stubbed:
            del module.forward
        inputs.close()
    outcome.fits.append(FitRecord(step, "writers", error_prior, error_fit))
    if neurons is not None:
        branch, rows = neurons
        drop_neurons(layer, branch, (kept[(kept >= rows.start) & (kept < rows.stop)] - rows.start).cpu())
    row = 0
    for branch, target, has_bias in blocks:
        if target is None:
            layer.register_parameter(branch.out_rotation, nn.Parameter(w[row:row + d].to(dtype)))
            row += d
            continue
        width = output_matrix(target)[0].shape[-1]
        block = w[row:row + width].T
        row += width
        set_output_matrix(target, block, w[row] if has_bias else None)
        row += int(has_bias)


def _recording(captured: dict[int, torch.Tensor], index: int, width: int):
    """A writer's forward for compensation's sliced pass: keep the input, skip the product."""
    def forward(x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        captured[index] = x
        return x.new_zeros(*x.shape[:-1], width)
    return forward


@torch.no_grad()
def slice_uniform(view: LayeredModel, adapter: ModelAdapter, batches: Sequence[Batch], width: int, *,
                  fit_tied_head: bool = False, unit_trace: bool = True, progress: bool = True,
                  hooks: Hooks | None = None, offload: str = "cpu", offload_dir=None, compensate: str = "off",
                  ridge: float = RIDGE, ranks: Ranks | None = None, neurons: int | None = None,
                  identity: bool = False, dense_batches: int | None = None) -> SliceOutcome:
    """One rotation Q for the whole stream: no skip matrices, a stock model of the family.

    Two passes over the layers: statistics of the dense stream (the pooled covariance; see
    `_pooled_add`), then the weights. A tied head stays tied exactly when the final norm's
    gain is uniform; otherwise it is untied (its gain folds into it) unless `fit_tied_head`
    keeps it tied and gives the final norm the diagonal of Q^T diag(gain) Q, the least-squares
    diagonal in the rotated basis (in the PCA basis the signal covariance is diagonal, so
    weighting by it changes nothing).

    `compensate` makes the weights pass a forward pass too: the sliced and the dense stream
    run beside each other and every step is refitted (`_refit`) in the one basis.

    `identity`: the stream keeps its full width and basis (only `neurons` are pruned), so there
    are no statistics to gather, and a tied head stays tied whatever the final norm's gain.
    """
    hooks = hooks or Hooks()
    run = _Run(view, adapter, batches, hooks, progress, offload, offload_dir, compensate, ridge, ranks, neurons,
               identity, dense_batches)
    model, hidden, layers = run.model, run.hidden, run.layers
    final_norm = view.onload(adapter.final_norm)
    final_gain = None
    if identity and (width != hidden or adapter.norm_kind != "rmsnorm"):
        raise SliceGPTError("internal error: an unrotated stream keeps its width, in RMSNorm families")
    if fit_tied_head and not identity:
        if adapter.norm_kind != "rmsnorm":
            raise SliceGPTError(f"fitting a tied head's gain is for RMSNorm families, not {adapter.family}")
        if not view.ties_head(adapter.head, run.embedding):
            raise SliceGPTError("this model's head is not tied to its embeddings; there is no tied head to fit")
        final_gain = final_norm.weight.data.to(torch.float64) + adapter.norm_offset
    tied = view.ties_head(adapter.head, run.embedding) if identity else uniform_ties(view, adapter, fit_tied_head)
    if not tied:
        view.untie_head(adapter)  # before the embeddings change: the head keeps the source's weights
    outcome = SliceOutcome(structure=adapter.structure(rotation="uniform"), tied_head=tied)
    specs = _specs(outcome.structure)
    n_steps = len(layers) * len(run.groups)

    run.onload_ends()
    state = run.resumed[0] if run.resumed is not None else None
    with run.new_cache() as cache:
        arguments = LayerArguments(cache)
        run.cache, run.arguments = cache, arguments
        if identity and state is None:
            q, first = torch.eye(hidden, dtype=torch.float64, device=run.device), 0
            tensors = {"basis": q}
            run.offload_ends()
        elif state is None or state.phase == "statistics":
            run.start(cache, arguments)
            if state is None:
                first = 0
                pooled = torch.zeros(hidden, hidden, dtype=torch.float64, device=run.device)
                for b in range(run.n):
                    check_finite(cache.get(b, run.device), "after the embeddings")
                _pooled_add(run, pooled, unit_trace)
            else:
                first, pooled = state.next_layer, state.tensors["pooled"].to(run.device)
            run.offload_ends()
            with run.bar(n_steps, "pooled PCA", first * len(run.groups)) as bar:
                for li in range(first, len(layers)):
                    layer = run.layer(li)
                    for group in run.groups:
                        _dense_step(run, layer, li, group, specs)
                        _pooled_add(run, pooled, unit_trace)
                        bar.update()
                    run.release(li)  # onloaded again for the weights
                    hooks.checkpoint(Progress("statistics", li + 1, {"pooled": pooled}), cache)
            final = Covariance(hidden, run.device)
            for b in range(run.n):
                x = cache.get(b, run.device).to(torch.float64)
                final.update(x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True)), run.masks[b].to(run.device))
            final.reduce(run.ranks)
            pooled = pooled / (n_steps + 1)
            values, vectors = ordered_eigh(pooled)
            outcome.spectra.append(values)
            q = zero_mean_basis(pooled, width) if adapter.norm_kind == "layernorm" else vectors[:, :width].contiguous()
            run.ranks.same(values, q)
            tensors = {"basis": q}
            if final_gain is not None:  # the embeddings before they are rotated
                embedding = view.original(f"{run.embedding}.weight")
                tensors["fit"] = fit_diagonal_gain(q, final_gain, final.matrix / final.tokens, embedding)
                run.ranks.same(tensors["fit"])
                del embedding
            first = 0
        else:
            tensors = {k: v.to(run.device) for k, v in state.tensors.items()}
            q, first = tensors["basis"], state.next_layer
            outcome.spectra, outcome.module_attributes, outcome.fits = state.spectra, state.module_attributes, state.fits
            run.offload_ends()

    cache = run.new_cache() if run.compensate else None
    try:
        if cache is not None:
            run.cache, run.arguments = cache, LayerArguments(cache)
        if first == 0:
            run.onload_ends()  # a fresh copy of the source is fused again (same numbers)
            if cache is not None:  # the dense stream [n, 2n) and the sliced one [0, n)
                capture(view, adapter, batches, cache, run.arguments)
                q_dtype = q.to(run.dtype)
                for b in range(run.n):
                    x = cache.get(b, run.device)
                    if b < run.dense_batches:
                        cache.append(x)
                    if not identity:
                        cache.put(b, x @ q_dtype)
            for path in adapter.embeddings if not identity else ():
                rotate_input(resolve(model, path), q)
            for path in adapter.entry_writers if not identity else ():
                rotate_output(resolve(model, path), q)
            run.write(0, run.ends)
            run.offload_ends()
            hooks.checkpoint(Progress("weights", 0, tensors, outcome.spectra, outcome.module_attributes), cache)
        elif cache is not None:
            run.onload_ends()  # the layer arguments come from the model's own forward
            run.start(cache, run.arguments)
            run.offload_ends()
        with run.bar(len(layers), "rotating" if cache is None else "refitting" if identity else "rotating and refitting",
                     first) as bar:
            for li in range(first, len(layers)):
                layer = run.layer(li)
                prefix = f"{adapter.layers}.{li}"
                for gi, group in enumerate(run.groups):
                    if cache is None:
                        rotate_reads(layer, prefix, group, adapter, q, hidden, outcome.module_attributes)
                        rotate_writes(layer, group, q)
                    else:
                        _per_layer_step(run, layer, li, group, specs, q, width, exit_basis=False, outcome=outcome,
                                        prefix=prefix, step=li * len(run.groups) + gi, fixed_basis=q)
                run.write(li + 1, [prefix])
                run.release(li)
                hooks.checkpoint(Progress("weights", li + 1, tensors, outcome.spectra, outcome.module_attributes,
                                          outcome.fits), cache)
                bar.update()
    finally:
        if cache is not None:
            cache.close()

    view.onload(adapter.final_norm)
    if not tied:
        view.onload(adapter.head)
        fuse_exit(model, adapter)
    final_norm = get_path(model, adapter.final_norm)  # LayerNorm families: now an RMSNorm module
    # an unrotated tied head reads the stock final norm, gain and all (nothing was folded into it)
    eps = None if identity and tied else resize_norm(final_norm, adapter, width, hidden)
    if eps is not None:
        outcome.module_attributes[adapter.final_norm] = {adapter.norm_eps_attr: eps}
    if final_gain is not None:
        w = final_norm.weight.data
        fit = tensors["fit"]
        final_norm.weight.data = ((w.to(torch.float64) + adapter.norm_offset) * fit - adapter.norm_offset).to(w.dtype)
    if tied:
        if view.keeps_changes:
            tie_head(model, adapter)
    else:
        rotate_input(resolve(model, adapter.head), q)
    run.write(len(layers) + 1, [adapter.final_norm, adapter.head], skip=[f"{adapter.head}.weight"] if tied else [])
    if view.keeps_changes:
        attach_structure(model, outcome.structure)
        record_structure(model, outcome.structure, outcome.module_attributes)
    return outcome


def _dense_step(run: _Run, layer: nn.Module, li: int, group: tuple[Branch, ...], specs: dict,
                offset: int = 0, count: int | None = None) -> None:
    """One residual step of the dense model over every batch: the stream after it replaces the one before.

    The dense stream is cache entries [offset, offset + count) (count: every batch by default)."""
    for b in range(offset, offset + (run.n if count is None else count)):
        x = run.cache.get(b, run.device)
        kwargs = run.arguments.get(li, b - offset, run.device)
        normed: dict = {}
        h = x
        for branch in group:
            h = h + run_branch(layer, specs[branch.name], x, kwargs, normed)
        check_finite(h, f"of layer {li} ({_step_name(group)})")
        run.cache.put(b, h)


def uniform_ties(view: LayeredModel, adapter: ModelAdapter, fit_tied_head: bool) -> bool:
    """Whether uniform rotation keeps a tied head tied: exact only with a unit final-norm gain
    (RMSNorm families), or approximately with `fit_tied_head`."""
    final = view.onload(adapter.final_norm)
    unit_gain = adapter.norm_kind == "rmsnorm" and bool(torch.all(final.weight.data + adapter.norm_offset == 1.0))
    return (view.ties_head(adapter.head, adapter.embeddings[0]) and adapter.norm_kind == "rmsnorm"
            and (unit_gain or fit_tied_head))


def _pooled_add(run: _Run, pooled: torch.Tensor, unit_trace: bool) -> None:
    """Add the covariance of the stream now in the cache to the pool of every block boundary.

    Each boundary's covariance is scaled to unit trace before pooling: the norms that read
    the stream divide by its RMS, so what matters at each boundary is the *share* of energy
    a direction carries, and the growing later boundaries must not drown the early ones
    (SmolLM2 at 25%: perplexity 76 against 98 unscaled). Gemma 3 270M is the opposite case
    (10%: 72.6 unscaled, 1.3e5 at unit trace), hence `unit_trace=False` ("tokens" pooling);
    bench/uniform_pooling.py measures both.
    """
    cov = Covariance(run.hidden, pooled.device)
    for b in range(run.n):
        cov.update(run.cache.get(b, run.device), run.masks[b].to(run.device))
    cov.reduce(run.ranks)  # the boundary's covariance over every rank's tokens, before it is scaled
    matrix = cov.matrix / cov.tokens
    pooled.add_(matrix / matrix.trace() if unit_trace else matrix)
