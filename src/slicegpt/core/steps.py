"""One residual step of the sliced stream, of each kind: what per-layer and uniform rotation share.

The stream entering a step is held sliced, z = x Q[:, :k]. A step takes it to the full-width
signal after the step, in the original basis; the caller then picks the next basis and rotates
the writers and the stream into it. There are three kinds of step:

- `sliced`: the readers (norms, input linears) are rotated first and the branches run on z:
  ``h = z Q^T + branch(z)``, exactly what the sliced model computes;
- `kernels` (MoE kernels, which write as wide as they read): the branches run on z Q^T through
  the unrotated weights (the same function), whose readers are rotated afterwards;
- `refitted` (compensation, `core.refit`): the readers and writers are refitted against the
  dense stream, which advances beside the sliced one.
"""

from __future__ import annotations

import torch
from torch import nn

from slicegpt.adapters.base import Branch
from slicegpt.core.bases import Covariance
from slicegpt.core.refit import Compensation
from slicegpt.core.run import Run, SliceOutcome
from slicegpt.core.streams import Stream, residual, step_name
from slicegpt.core.transform import rotate_reads


def kernels(group: tuple[Branch, ...]) -> bool:
    """Whether the step's branches are MoE kernels (their widths are attributes, not weight shapes)."""
    return any(b.width_attrs for b in group)


def advance(run: Run, comp: Compensation | None, layer: nn.Module, li: int, group: tuple[Branch, ...], specs: dict,
            sliced: Stream, q: torch.Tensor, prefix: str, outcome: SliceOutcome, step: int,
            cov: Covariance | None = None, writers: bool = True) -> None:
    """The sliced stream through one step (it then holds the full-width stream after it), the step's
    readers rotated into q, and with `comp` the step refitted. `cov` gathers the new stream's statistics.
    `writers` False: compensation refits the readers alone."""
    if kernels(group):  # no fit for kernels, but the dense stream moves on
        if comp is not None:
            comp.advance_dense(layer, li, group, specs)
        kernels_step(run, layer, li, group, specs, sliced, q, prefix, outcome, cov)
    elif comp is None:
        rotate_reads(layer, prefix, group, run.adapter, q, run.hidden, outcome.module_attributes)
        sliced_step(run, layer, li, group, specs, sliced, q, cov)
    elif refitted_step(run, comp, layer, li, group, specs, sliced, q, prefix, outcome, step, writers):
        if cov is not None:
            for b in range(len(sliced)):
                cov.update(sliced.get(b), sliced.mask(b))
    else:  # readers refitted (and rotated): the branches run on z as they are
        sliced_step(run, layer, li, group, specs, sliced, q, cov)


def sliced_step(run: Run, layer: nn.Module, li: int, group: tuple[Branch, ...], specs: dict, sliced: Stream,
                q: torch.Tensor, cov: Covariance | None) -> None:
    """h = z Q^T + branch(z): the branches read z through their rotated readers, write the original basis."""
    q_t = q.T.to(run.dtype)
    sliced.advance(li, lambda z, kwargs: residual(layer, group, specs, z, kwargs, skip=z @ q_t),
                   f"of layer {li} ({step_name(group)})", cov)


def kernels_step(run: Run, layer: nn.Module, li: int, group: tuple[Branch, ...], specs: dict, sliced: Stream,
                 q: torch.Tensor, prefix: str, outcome: SliceOutcome, cov: Covariance | None) -> None:
    """h = x + branch(x), x = z Q^T, through the unrotated weights; then the readers are rotated."""
    q_t = q.T.to(run.dtype)
    sliced.advance(li, lambda z, kwargs: residual(layer, group, specs, z @ q_t, kwargs),
                   f"of layer {li} ({step_name(group)})", cov)
    rotate_reads(layer, prefix, group, run.adapter, q, run.hidden, outcome.module_attributes)


def refitted_step(run: Run, comp: Compensation, layer: nn.Module, li: int, group: tuple[Branch, ...], specs: dict,
                  sliced: Stream, q: torch.Tensor, prefix: str, outcome: SliceOutcome, step: int,
                  writers: bool = True) -> bool:
    """Compensation's step (`core.refit`): readers fitted and rotated, then (with `writers`) the writers
    fitted and the stream advanced from the fit's own inputs; returns whether the stream was advanced.
    An unrotated stream (`comp.identity`) keeps its readers' basis."""
    with comp.step(layer, li, group, specs, sliced, q, step, outcome, writers) as fit:
        fit.observe_dense()
        maps = fit.solve_readers()
        if not comp.identity:
            rotate_reads(layer, prefix, group, run.adapter, q, run.hidden, outcome.module_attributes, maps)
        if writers:
            fit.observe_sliced()
            fit.solve_writers()
    return writers
