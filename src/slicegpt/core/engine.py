"""The slicing algorithm, written once: a loop over onloaded layers, one step at a time.

Per-layer rotation (the paper's). For each residual step i (attention, MLP, or parallel
branches) the stream entering it is held sliced, ``z_i = x_i Q_i[:, :k_i]``. The step's readers
are rotated and sliced first and it runs once on ``z_i``, its writers still in the original
basis, which gives the full-width signal after it, ``x_{i+1} = z_i Q_i^T + branch(z_i)``,
exactly the function the sliced model computes (its norms act on k coordinates with
constants rescaled to match). Its covariance gives Q_{i+1}; then inputs and outputs are
rotated, the skip gets ``S_i = Q_i[:, :k_i]^T Q_{i+1}[:, :k_{i+1}]``, and
``z_{i+1} = x_{i+1} Q_{i+1}[:, :k_{i+1}]``. Each branch is evaluated once, and only one
boundary's activations are held (a `streams.Stream`, on CPU or disk). The kinds of step
(sliced, MoE kernels, refitted by compensation) are `core.steps`; compensation, which keeps
the dense model's stream beside the sliced one, is `core.refit`.

Uniform rotation (`core.uniform`, its names re-exported here): one Q for the whole stream (PCA
of the pooled covariance of the dense stream), so no skip matrices; the result is a stock
model of the same family (`standard`). It streams in two passes: statistics, then the weights.

Three concerns stay apart: statistics (`bases.Covariance`, plain sums that merge), the choice
of a basis from them (`bases`), and the weight changes (`transform`). Where the weights come
from (`onload`) and where finished parts go (`run.Hooks`: written as they finish, and a resume
checkpoint of every stream) are the caller's.
"""

from __future__ import annotations

from contextlib import nullcontext
from typing import Sequence

import torch
from torch import nn

from slicegpt.adapters import ModelAdapter
from slicegpt.core.bases import Covariance
from slicegpt.core.compensation import RIDGE
from slicegpt.core.distributed import Ranks
from slicegpt.core.invariance import fuse_exit
from slicegpt.core.onload import LayeredModel
from slicegpt.core.refit import Compensation, compensation
from slicegpt.core.run import COMPENSATIONS, POOLINGS, ROTATIONS, Hooks, Progress, Run, SliceOutcome
from slicegpt.core.steps import advance
from slicegpt.core.streams import Batch, Stream, capture, outside
from slicegpt.core.transform import check_finite, resize_norm, rotate_writes
from slicegpt.core.uniform import slice_uniform, uniform_ties
from slicegpt.core.weights import resolve, rotate_input, rotate_output
from slicegpt.errors import SliceGPTError
from slicegpt.modeling.runtime import ENTRY, attach_structure, get_path, record_structure

# the engine's public names, wherever they are defined (uniform rotation is `core.uniform`)
__all__ = ["Batch", "COMPENSATIONS", "Hooks", "POOLINGS", "Progress", "ROTATIONS", "SliceOutcome", "capture",
           "outside", "per_layer_ties", "slice_layers", "slice_uniform", "uniform_ties"]


@torch.no_grad()
def slice_layers(view: LayeredModel, adapter: ModelAdapter, batches: Sequence[Batch], widths: Sequence[int], *,
                 slice_head: bool = False, keep_tied_head: bool = True, progress: bool = True,
                 hooks: Hooks | None = None, offload: str = "cpu", offload_dir=None, compensate: str = "off",
                 ridge: float = RIDGE, ranks: Ranks | None = None, neurons: int | None = None,
                 dense_batches: int | None = None,
                 heads: tuple[int, int] | None = None) -> SliceOutcome:
    """Per-layer rotation: each block boundary b gets its own basis of width `widths[b]`.

    `compensate` ("writers", or "all" for the readers too) refits every step against the dense
    model (see `core.compensation`); the dense stream then travels beside the sliced one, on
    the first `dense_batches` batches (None: all; the fits' targets on the others are the
    dense weights' output on the sliced input, `compensation.dense_first_batches`).
    `neurons` (with compensation): each MLP keeps that many neurons, pruned in its writers' fit.
    `heads` (with compensation): each attention keeps that many (key/value heads, query heads per
    key/value head), pruned in its writers' fit (`compensation.prune_heads`).

    `widths` has one entry per boundary: after the embeddings, then after every residual step
    (the last one is used only when the head is sliced). A head tied to the embeddings stays
    tied (`keep_tied_head`, when the head is not sliced): the embedding table keeps its d
    columns and the first layer multiplies the stream by Q_0[:, :k] (d x k). That is the same
    function as slicing the embedding columns, and costs d*k parameters instead of an untied
    vocab x d head (the paper's way).
    """
    hooks = hooks or Hooks()
    run = Run(view, adapter, batches, hooks, progress, offload, offload_dir, ranks)
    comp = compensation(run, compensate, ridge, neurons, dense_batches, heads=heads)
    if len(widths) != run.n_steps + 1:
        raise SliceGPTError(f"per-layer rotation needs {run.n_steps + 1} widths (one per boundary), got {len(widths)}")
    tied = per_layer_ties(view, adapter, keep_tied_head, slice_head)
    outcome = SliceOutcome(structure=adapter.structure(tied_head=tied), tied_head=tied)
    if not tied:  # embeddings and head end up in different bases; the head keeps the source's weights
        view.untie_head(adapter)
    run.onload_ends(tied_head=tied)
    with run.stream("sliced") as sliced, comp if comp is not None else nullcontext():
        run.start(sliced)
        entry = None  # only layer 0 takes it, and a checkpoint comes after a whole layer
        if run.resumed is None:
            first, q = 0, _entry_basis(run, sliced, widths[0], tied, outcome)
            if comp is not None:
                comp.open_dense(sliced)  # the dense stream: the stream before the first cut
            sliced.transform(q.to(run.dtype))
            run.write(0, run.ends)
            if tied:  # (I - 11^T/d) Q for LayerNorm families
                entry = q - q.mean(dim=0, keepdim=True) if adapter.norm_kind == "layernorm" else q
        else:
            state = run.resumed[0]
            first, q = state.next_layer, state.tensors["basis"].to(run.device)
            outcome.spectra, outcome.module_attributes, outcome.fits = state.spectra, state.module_attributes, state.fits
            if comp is not None:
                comp.open_dense(sliced, restore=True)
        run.offload_ends()
        q = _slice_layers(run, comp, sliced, q, widths, slice_head, first, entry, outcome)
    _finish_per_layer(run, tied, q, outcome)
    return outcome


def _entry_basis(run: Run, sliced: Stream, width: int, tied: bool, outcome: SliceOutcome) -> torch.Tensor:
    """Q_0 from the covariance after the embeddings, which are rotated into it unless the head is tied
    (for LayerNorm families with a tied head, the stream loses its mean first: every LayerNorm drops it)."""
    cov = Covariance(run.hidden, run.device)
    for b in range(len(sliced)):
        x = sliced.get(b)
        if tied and run.adapter.norm_kind == "layernorm":
            x = x - x.mean(dim=-1, keepdim=True)
            sliced.put(b, x)
        check_finite(x, "after the embeddings")
        cov.update(x, sliced.mask(b))
    values, q = run.basis(cov)
    outcome.spectra.append(values)
    q = q[:, :width]
    if not tied:
        for path in run.adapter.embeddings:
            rotate_input(resolve(run.model, path), q)
        for path in run.adapter.entry_writers:
            rotate_output(resolve(run.model, path), q)
    return q


def _slice_layers(run: Run, comp: Compensation | None, sliced: Stream, q: torch.Tensor, widths: Sequence[int],
                  slice_head: bool, first: int, entry: torch.Tensor | None, outcome: SliceOutcome) -> torch.Tensor:
    """Every layer from `first` on, step by step, each written and checkpointed when done; returns the last basis.

    `entry`: layer 0's entry matrix (a tied head keeps the embeddings unrotated)."""
    specs = {b["name"]: b for b in outcome.structure["branches"]}
    with run.bar(run.n_steps, "slicing", first * len(run.groups)) as bar:
        for li in range(first, len(run.layers)):
            layer = run.layer(li)
            prefix = f"{run.adapter.layers}.{li}"
            if li == 0 and entry is not None:
                layer.register_parameter(ENTRY, nn.Parameter(entry.to(device=run.device, dtype=run.dtype)))
            for gi, group in enumerate(run.groups):
                step = li * len(run.groups) + gi
                exit_basis = step == run.n_steps - 1 and not slice_head
                q = _per_layer_step(run, comp, layer, li, group, specs, sliced, q, widths[step + 1], exit_basis,
                                    outcome, prefix, step)
                bar.update()
            run.write(li + 1, [prefix])
            run.release(li)
            run.checkpoint(Progress("layers", li + 1, {"basis": q}, outcome.spectra, outcome.module_attributes,
                                    outcome.fits), [sliced] + ([comp.dense] if comp is not None else []))
    return q


def _per_layer_step(run: Run, comp: Compensation | None, layer: nn.Module, li: int, group: tuple, specs: dict,
                    sliced: Stream, q: torch.Tensor, width: int, exit_basis: bool, outcome: SliceOutcome,
                    prefix: str, step: int) -> torch.Tensor:
    """One step of per-layer rotation: the stream after it (`steps.advance`), its basis Q_{i+1} (the
    identity at the exit, for the head), the skip S_i = Q_i^T Q_{i+1}, and the writers and the stream
    rotated into Q_{i+1}, which it returns."""
    cov = Covariance(run.hidden, q.device)
    # compensation refits the readers alone in the exit step of a post-normed family
    writers = not (exit_basis and any(b.post_norm for b in group))
    advance(run, comp, layer, li, group, specs, sliced, q, prefix, outcome, step, cov, writers)
    if exit_basis:
        q_next = torch.eye(run.hidden, dtype=torch.float64, device=q.device)
    else:
        values, vectors = run.basis(cov)
        outcome.spectra.append(values)
        q_next = vectors[:, :width]
    layer.register_parameter(group[0].shortcut, nn.Parameter((q.T @ q_next).to(run.dtype)))
    rotate_writes(layer, group, q_next, rotate_normed=not exit_basis)
    sliced.transform(q_next.to(run.dtype))
    return q_next


def _finish_per_layer(run: Run, tied: bool, q: torch.Tensor, outcome: SliceOutcome) -> None:
    """The final norm and the head: an untied head reads the last basis; then the last part is written."""
    view, adapter, model = run.view, run.adapter, run.model
    view.onload(adapter.final_norm)
    if not tied:
        view.onload(adapter.head)
        fuse_exit(model, adapter)
        eps = resize_norm(get_path(model, adapter.final_norm), adapter, q.shape[1], run.hidden)
        if eps is not None:
            outcome.module_attributes[adapter.final_norm] = {adapter.norm_eps_attr: eps}
        rotate_input(resolve(model, adapter.head), q)
    run.write(len(run.layers) + 1, [adapter.final_norm, adapter.head],
              skip=[f"{adapter.head}.weight"] if tied else [])
    if view.keeps_changes:
        attach_structure(model, outcome.structure)
        record_structure(model, outcome.structure, outcome.module_attributes)


def per_layer_ties(view: LayeredModel, adapter: ModelAdapter, keep_tied_head: bool, slice_head: bool) -> bool:
    """Whether per-layer rotation keeps a tied head tied (with an entry matrix instead of sliced embeddings)."""
    return (keep_tied_head and not slice_head and not adapter.entry_writers
            and view.ties_head(adapter.head, adapter.embeddings[0]))
