"""Uniform rotation: one Q for the whole stream, so no skip matrices and a stock model of the family.

Q is the PCA basis of the pooled covariance of the dense stream over every block boundary
(`standard` writes the result as the family's own model). It streams in two passes over the
layers: the statistics (phase "statistics"), then the weights (phase "weights"), each layer
checkpointed for resuming. Without compensation the weights pass is a plain change of basis;
with it, the sliced and the dense stream run beside each other and every step is refitted in
the one basis (`core.steps`, `core.refit`).
"""

from __future__ import annotations

from contextlib import ExitStack
from typing import Sequence

import torch
from torch import nn

from slicegpt.adapters import ModelAdapter
from slicegpt.adapters.base import Branch
from slicegpt.core.bases import Covariance, fit_diagonal_gain, ordered_eigh, zero_mean_basis
from slicegpt.core.compensation import RIDGE
from slicegpt.core.distributed import Ranks
from slicegpt.core.invariance import fuse_exit, tie_head
from slicegpt.core.onload import LayeredModel
from slicegpt.core.refit import Compensation, compensation
from slicegpt.core.run import Hooks, Progress, Run, SliceOutcome
from slicegpt.core.steps import advance
from slicegpt.core.streams import Batch, Stream, capture, dense_step
from slicegpt.core.transform import check_finite, resize_norm, rotate_reads, rotate_writes
from slicegpt.core.weights import resolve, rotate_input, rotate_output
from slicegpt.errors import SliceGPTError
from slicegpt.modeling.runtime import attach_structure, get_path, record_structure


@torch.no_grad()
def slice_uniform(view: LayeredModel, adapter: ModelAdapter, batches: Sequence[Batch], width: int, *,
                  fit_tied_head: bool = False, unit_trace: bool = True, progress: bool = True,
                  hooks: Hooks | None = None, offload: str = "cpu", offload_dir=None, compensate: str = "off",
                  ridge: float = RIDGE, ranks: Ranks | None = None, neurons: int | None = None,
                  identity: bool = False, dense_batches: int | None = None,
                  heads: tuple[int, int] | None = None) -> SliceOutcome:
    """One rotation Q for the whole stream: no skip matrices, a stock model of the family.

    Two passes over the layers: statistics of the dense stream (the pooled covariance; see
    `_pooled_add`), then the weights. A tied head stays tied exactly when the final norm's
    gain is uniform; otherwise it is untied (its gain folds into it) unless `fit_tied_head`
    keeps it tied and gives the final norm the diagonal of Q^T diag(gain) Q, the least-squares
    diagonal in the rotated basis (in the PCA basis the signal covariance is diagonal, so
    weighting by it changes nothing).

    `compensate` makes the weights pass a forward pass too: the sliced and the dense stream
    run beside each other and every step is refitted (`core.refit`) in the one basis.

    `identity`: the stream keeps its full width and basis (only `neurons` are pruned), so there
    are no statistics to gather, the norms keep their own gains (nothing is folded), and a tied
    head stays tied whatever the final norm's gain.
    """
    # an unrotated stream keeps each norm's own gain (nothing needs unit gains), which is how the dense model
    # splits each coordinate's scale between the norm's output and its readers: quantized inputs need that
    run = Run(view, adapter, batches, hooks or Hooks(), progress, offload, offload_dir, ranks, fold=not identity)
    comp = compensation(run, compensate, ridge, neurons, dense_batches, identity, heads=heads)
    final_norm = view.onload(adapter.final_norm)
    final_gain = None
    if identity and (width != run.hidden or adapter.norm_kind != "rmsnorm"):
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

    run.onload_ends()
    tensors, first = _basis(run, width, unit_trace, identity, final_gain, outcome)
    _weights(run, comp, tensors, first, identity, outcome)
    _finish(run, tied, identity, width, tensors, final_gain, outcome)
    return outcome


def uniform_ties(view: LayeredModel, adapter: ModelAdapter, fit_tied_head: bool) -> bool:
    """Whether uniform rotation keeps a tied head tied: exact only with a unit final-norm gain
    (RMSNorm families), or approximately with `fit_tied_head`."""
    final = view.onload(adapter.final_norm)
    unit_gain = adapter.norm_kind == "rmsnorm" and bool(torch.all(final.weight.data + adapter.norm_offset == 1.0))
    return (view.ties_head(adapter.head, adapter.embeddings[0]) and adapter.norm_kind == "rmsnorm"
            and (unit_gain or fit_tied_head))


def _basis(run: Run, width: int, unit_trace: bool, identity: bool, final_gain: torch.Tensor | None,
           outcome: SliceOutcome) -> tuple[dict[str, torch.Tensor], int]:
    """The statistics pass: Q (and the fitted final-norm gain) as `tensors`, and the layer the weights pass
    starts at (a resumed run may be past the statistics)."""
    state = run.resumed[0] if run.resumed is not None else None
    if identity and state is None:
        run.offload_ends()
        return {"basis": torch.eye(run.hidden, dtype=torch.float64, device=run.device)}, 0
    if state is not None and state.phase == "weights":
        outcome.spectra, outcome.module_attributes, outcome.fits = state.spectra, state.module_attributes, state.fits
        run.offload_ends()
        return {k: v.to(run.device) for k, v in state.tensors.items()}, state.next_layer
    with run.stream("dense") as stream:
        run.start(stream)
        if state is None:
            first = 0
            pooled = torch.zeros(run.hidden, run.hidden, dtype=torch.float64, device=run.device)
            for b in range(len(stream)):
                check_finite(stream.get(b), "after the embeddings")
            _pooled_add(run, stream, pooled, unit_trace)
        else:
            first, pooled = state.next_layer, state.tensors["pooled"].to(run.device)
        run.offload_ends()
        _pool_layers(run, stream, pooled, first, unit_trace, outcome)
        final = Covariance(run.hidden, run.device)  # what the final norm reads
        for b in range(len(stream)):
            x = stream.get(b).to(torch.float64)
            final.update(x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True)), stream.mask(b))
        final.reduce(run.ranks)
    pooled = pooled / (run.n_steps + 1)
    values, vectors = ordered_eigh(pooled)
    outcome.spectra.append(values)
    q = zero_mean_basis(pooled, width) if run.adapter.norm_kind == "layernorm" else vectors[:, :width].contiguous()
    run.ranks.same(values, q)
    tensors = {"basis": q}
    if final_gain is not None:  # the embeddings before they are rotated
        embedding = run.view.original(f"{run.embedding}.weight")
        tensors["fit"] = fit_diagonal_gain(q, final_gain, final.matrix / final.tokens, embedding)
        run.ranks.same(tensors["fit"])
    return tensors, 0


def _pool_layers(run: Run, stream: Stream, pooled: torch.Tensor, first: int, unit_trace: bool,
                 outcome: SliceOutcome) -> None:
    """The dense stream through the layers from `first` on, each boundary's covariance added to the pool."""
    specs = {b["name"]: b for b in outcome.structure["branches"]}
    with run.bar(run.n_steps, "pooled PCA", first * len(run.groups)) as bar:
        for li in range(first, len(run.layers)):
            layer = run.layer(li)
            for group in run.groups:
                dense_step(stream, layer, li, group, specs)
                _pooled_add(run, stream, pooled, unit_trace)
                bar.update()
            run.release(li)  # onloaded again for the weights
            run.checkpoint(Progress("statistics", li + 1, {"pooled": pooled}), [stream])


def _pooled_add(run: Run, stream: Stream, pooled: torch.Tensor, unit_trace: bool) -> None:
    """Add the covariance of the stream to the pool of every block boundary.

    Each boundary's covariance is scaled to unit trace before pooling: the norms that read
    the stream divide by its RMS, so what matters at each boundary is the *share* of energy
    a direction carries, and the growing later boundaries must not drown the early ones
    (SmolLM2 at 25%: perplexity 76 against 98 unscaled). Gemma 3 270M is the opposite case
    (10%: 72.6 unscaled, 1.3e5 at unit trace), hence `unit_trace=False` ("tokens" pooling);
    bench/uniform_pooling.py measures both.
    """
    cov = Covariance(run.hidden, pooled.device)
    for b in range(len(stream)):
        cov.update(stream.get(b), stream.mask(b))
    cov.reduce(run.ranks)  # the boundary's covariance over every rank's tokens, before it is scaled
    matrix = cov.matrix / cov.tokens
    pooled.add_(matrix / matrix.trace() if unit_trace else matrix)


def _weights(run: Run, comp: Compensation | None, tensors: dict[str, torch.Tensor], first: int, identity: bool,
             outcome: SliceOutcome) -> None:
    """The weights pass from layer `first` on: a change of basis, or with `comp` every step refitted
    on the sliced stream (created here) beside the dense one (the compensation's)."""
    q = tensors["basis"]
    specs = {b["name"]: b for b in outcome.structure["branches"]}
    with ExitStack() as owned:
        sliced = owned.enter_context(run.stream("sliced")) if comp is not None else None
        if comp is not None:
            owned.enter_context(comp)
        if first == 0:
            _enter(run, comp, sliced, tensors, identity, outcome)
        elif comp is not None:
            run.onload_ends()  # the layer arguments come from the model's own forward
            run.start(sliced)
            comp.open_dense(sliced, restore=True)
            run.offload_ends()
        streams = [sliced, comp.dense] if comp is not None else []
        label = "rotating" if comp is None else "refitting" if identity else "rotating and refitting"
        with run.bar(len(run.layers), label, first) as bar:
            for li in range(first, len(run.layers)):
                layer = run.layer(li)
                prefix = f"{run.adapter.layers}.{li}"
                for gi, group in enumerate(run.groups):
                    if comp is None:
                        rotate_reads(layer, prefix, group, run.adapter, q, run.hidden, outcome.module_attributes)
                        rotate_writes(layer, group, q)
                    else:
                        _refitted_step(run, comp, layer, li, group, specs, sliced, q, prefix, outcome,
                                       li * len(run.groups) + gi)
                run.write(li + 1, [prefix])
                run.release(li)
                run.checkpoint(Progress("weights", li + 1, tensors, outcome.spectra, outcome.module_attributes,
                                        outcome.fits), streams)
                bar.update()


def _enter(run: Run, comp: Compensation | None, sliced: Stream | None, tensors: dict[str, torch.Tensor],
           identity: bool, outcome: SliceOutcome) -> None:
    """The embeddings (and entry linears) rotated, written and checkpointed; with `comp`, both streams start."""
    model, adapter, q = run.model, run.adapter, tensors["basis"]
    run.onload_ends()  # a fresh copy of the source is fused again (same numbers)
    if comp is not None:
        capture(run.view, adapter, run.batches, sliced.cache, sliced.arguments)
        comp.open_dense(sliced)
        if not identity:
            sliced.transform(q.to(run.dtype))
    for path in adapter.embeddings if not identity else ():
        rotate_input(resolve(model, path), q)
    for path in adapter.entry_writers if not identity else ():
        rotate_output(resolve(model, path), q)
    run.write(0, run.ends)
    run.offload_ends()
    run.checkpoint(Progress("weights", 0, tensors, outcome.spectra, outcome.module_attributes),
                   [sliced, comp.dense] if comp is not None else [])


def _refitted_step(run: Run, comp: Compensation, layer: nn.Module, li: int, group: tuple[Branch, ...],
                   specs: dict, sliced: Stream, q: torch.Tensor, prefix: str, outcome: SliceOutcome,
                   step: int) -> None:
    """One compensated step in the fixed basis: the stream after it, then the writers and the stream
    rotated into q again (an unrotated stream stays as it is)."""
    advance(run, comp, layer, li, group, specs, sliced, q, prefix, outcome, step)
    if not comp.identity:
        rotate_writes(layer, group, q)
        sliced.transform(q.to(run.dtype))


def _finish(run: Run, tied: bool, identity: bool, width: int, tensors: dict[str, torch.Tensor],
            final_gain: torch.Tensor | None, outcome: SliceOutcome) -> None:
    """The final norm and the head in the basis, then the last part written."""
    view, adapter, model = run.view, run.adapter, run.model
    view.onload(adapter.final_norm)
    if not tied:
        view.onload(adapter.head)
        fuse_exit(model, adapter)
    final_norm = get_path(model, adapter.final_norm)  # LayerNorm families: now an RMSNorm module
    # an unrotated tied head reads the stock final norm, gain and all (nothing was folded into it)
    eps = None if identity and tied else resize_norm(final_norm, adapter, width, run.hidden)
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
        rotate_input(resolve(model, adapter.head), tensors["basis"])
    run.write(len(run.layers) + 1, [adapter.final_norm, adapter.head], skip=[f"{adapter.head}.weight"] if tied else [])
    if view.keeps_changes:
        attach_structure(model, outcome.structure)
        record_structure(model, outcome.structure, outcome.module_attributes)
