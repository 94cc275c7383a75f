"""Compensation as the engine runs it: the dense stream beside the sliced one, and each step refitted.

`core.compensation` has the statistics and the fits; this module feeds them. A `Compensation`
owns the dense model's stream (on the first `dense_batches` batches) for the whole job. Each
compensated step is a `StepFit`, used in the order of its life cycle:

1. `observe_dense`: the dense step runs on the dense stream, which it advances; with the
   readers fitted (compensate="all") their fit pairs the dense normalised input n with the
   sliced one, ``norm(z Q^T) Q`` (what the sliced norm computes);
2. `solve_readers`: the map each norm's readers take instead of Q;
3. `observe_sliced`: the sliced step runs with the fitted readers; the inputs X of its output
   linears (or the output of a post-norm, whose d x d matrix is fitted) are paired with
   ``h_dense - z Q^T``;
4. `solve_writers`: the writers' fit W (pruning MLP neurons or attention heads on the way), the
   stream after the step ``z Q^T + X W`` from the kept inputs (no third pass), and the new
   weights, which stay in the original basis for the caller to rotate.

Batches beyond the dense share have the paper's weights' own output X P as their target.
(Refitting the skip matrix beside the writers was tried: SmolLM2 at 25% went from 50.1 to 54.6
held-out perplexity, so the skip stays Q_i^T Q_{i+1}.)
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from slicegpt.adapters.base import Branch
from slicegpt.core.cache import ActivationCache
from slicegpt.core.compensation import FitRecord, LeastSquares, prune, prune_heads
from slicegpt.core.run import COMPENSATIONS, Run, SliceOutcome
from slicegpt.core.streams import Stream, dense_step, residual, step_name
from slicegpt.core.transform import check_finite, drop_heads, drop_neurons, targets
from slicegpt.core.weights import output_matrix, set_output_matrix
from slicegpt.errors import SliceGPTError
from slicegpt.modeling.runtime import get_path, run_branch


def compensation(run: Run, compensate: str, ridge: float, neurons: int | tuple[int, ...] | None,
                 dense_batches: int | None,
                 identity: bool = False, heads: tuple[int, int] | None = None) -> "Compensation | None":
    """The job's compensation for the `compensate` setting, or None when it is off."""
    if compensate not in COMPENSATIONS:
        raise SliceGPTError(f"compensate must be one of {', '.join(COMPENSATIONS)}, got {compensate!r}")
    if dense_batches is not None and not 0 <= dense_batches <= run.n:
        raise SliceGPTError(f"internal error: {dense_batches} dense batches of {run.n}")
    if compensate == "off":
        if neurons is not None:
            raise SliceGPTError("pruning MLP neurons refits the down projection: it needs compensation "
                                "(--compensate writers or all)")
        if heads is not None:
            raise SliceGPTError("pruning attention heads refits the output projection: it needs compensation "
                                "(--compensate writers or all)")
        return None
    return Compensation(run, compensate == "all", ridge, neurons, dense_batches, identity, heads)


class Compensation:
    """Compensation for one job: the settings, and the dense stream it owns (`open_dense`, `close`)."""

    def __init__(self, run: Run, fit_readers: bool, ridge: float, neurons: int | tuple[int, ...] | None,
                 dense_batches: int | None,
                 identity: bool = False, heads: tuple[int, int] | None = None) -> None:
        self.run, self.fit_readers, self.ridge = run, fit_readers, ridge
        self.neurons = neurons  # MLP neurons kept per layer: one count, one per layer, or None (all)
        self.heads = heads  # attention heads kept per layer: (key/value heads, query heads each); None: all
        self.identity = identity  # the sliced stream keeps the original basis (only neurons pruned)
        # the dense stream runs on the first `dense_batches` batches (None: all, the same on every rank)
        self.partial = dense_batches is not None
        self.batches = run.n if dense_batches is None else dense_batches
        # whether any rank has dense batches (if none, a fit without neurons to prune returns P)
        self.any_dense = not self.partial or run.ranks.sum_number(self.batches) > 0
        self.dense: Stream | None = None

    def neurons_at(self, li: int) -> int | None:
        """MLP neurons layer `li` keeps (None: all)."""
        return self.neurons[li] if isinstance(self.neurons, (tuple, list)) else self.neurons

    def open_dense(self, sliced: Stream, restore: bool = False) -> None:
        """The dense stream: a copy of the sliced stream's first batches before the first cut, or
        (`restore`, a resumed run) the checkpointed one. It shares the sliced stream's layer arguments."""
        self.dense = self.run.stream("dense", sliced.arguments)
        if restore:
            self.run.restore(self.dense)
            return
        for b in range(self.batches):
            self.dense.append(sliced.get(b))

    def close(self) -> None:
        if self.dense is not None:
            self.dense.close()
            self.dense = None

    def __enter__(self) -> "Compensation":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def advance_dense(self, layer: nn.Module, li: int, group: tuple[Branch, ...], specs: dict) -> None:
        """The dense step on the dense stream alone (a step that is not refitted: MoE kernels)."""
        dense_step(self.dense, layer, li, group, specs)

    def step(self, layer: nn.Module, li: int, group: tuple[Branch, ...], specs: dict, sliced: Stream,
             q: torch.Tensor, step: int, outcome: SliceOutcome, writers: bool = True) -> "StepFit":
        return StepFit(self, layer, li, group, specs, sliced, q, step, outcome, writers)

    def solve(self, fit: LeastSquares, prior: torch.Tensor) -> tuple[torch.Tensor, float, float]:
        """A fit over every rank's tokens, the same on each."""
        w, error_prior, error_fit = fit.reduce(self.run.ranks).solve(prior, self.ridge)
        self.run.ranks.same(w)
        return w, error_prior, error_fit


@dataclass
class Writers:
    """A step's outputs as one fit X W ≈ Y: per block (branch, output linear or None for a post-norm's
    d x d matrix, whether it has a bias), the paper's weights P stacked, and the MLP whose neurons
    are pruned with their rows in P, or the attention whose heads are."""

    blocks: list[tuple[Branch, object, bool]]
    prior: torch.Tensor
    neurons: tuple[Branch, range] | None
    heads: tuple[Branch, range] | None = None


def writers_of(layer: nn.Module, group: tuple[Branch, ...], hidden: int, device: torch.device,
               neurons: int | None, post_norm_matrix: bool, heads: tuple[int, int] | None = None) -> Writers:
    """The step's writers and their prior; `post_norm_matrix`: a post-normed branch is fitted after its norm."""
    blocks: list[tuple[Branch, object, bool]] = []
    priors = []
    pruned = pruned_heads = None
    for branch in group:
        if branch.post_norm and post_norm_matrix:
            blocks.append((branch, None, False))
            priors.append(torch.eye(hidden, dtype=torch.float64, device=device))  # (torch.cat promotes the others)
            continue
        for target in targets(layer, branch, "outputs"):
            w, bias = output_matrix(target)
            start = sum(p.shape[0] for p in priors)
            if neurons is not None and branch.neurons and w.shape[-1] > neurons:
                pruned = branch, range(start, start + w.shape[-1])
            if heads is not None and branch.heads:
                pruned_heads = branch, range(start, start + w.shape[-1])
            blocks.append((branch, target, bias is not None))
            priors.append(w.T)  # in the weights' own dtype, exact: the fits read it in float64
            if bias is not None:
                priors.append(bias[None, :])
    if pruned is not None and pruned_heads is not None:
        raise SliceGPTError("internal error: MLP neurons and attention heads pruned in one fit")
    return Writers(blocks, torch.cat(priors), pruned, pruned_heads)


def set_writers(layer: nn.Module, writers: Writers, w: torch.Tensor, hidden: int, dtype: torch.dtype) -> None:
    """The fitted W, block by block, into the output linears (or a post-norm's output matrix)."""
    row = 0
    for branch, target, has_bias in writers.blocks:
        if target is None:
            layer.register_parameter(branch.out_rotation, nn.Parameter(w[row:row + hidden].to(dtype)))
            row += hidden
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


class StepFit:
    """Compensation of one residual step; see the module docstring for its four moves. `writers` False:
    the readers alone are refitted (the exit step of a post-normed family, whose writers the head reads)."""

    def __init__(self, comp: Compensation, layer: nn.Module, li: int, group: tuple[Branch, ...], specs: dict,
                 sliced: Stream, q: torch.Tensor, step: int, outcome: SliceOutcome, writers: bool) -> None:
        self.comp, self.layer, self.li, self.group, self.specs = comp, layer, li, group, specs
        self.sliced, self.q, self.step, self.outcome, self.fit_writers = sliced, q, step, outcome, writers
        run = comp.run
        self.device, self.dtype, self.hidden = run.device, run.dtype, run.hidden
        self.q_t = q.T.to(run.dtype)
        self.reads: dict[str, LeastSquares] = {}
        self.dense_out: ActivationCache | None = None  # see `observe_dense`
        self.inputs: ActivationCache | None = None  # the writers' inputs X per batch (`observe_sliced`)
        self.fit: LeastSquares | None = None
        self.writers: Writers | None = None

    def __enter__(self) -> "StepFit":
        return self

    def __exit__(self, *exc) -> None:
        for cache in (self.dense_out, self.inputs):
            if cache is not None:
                cache.close()

    def full(self, z: torch.Tensor) -> torch.Tensor:
        """The sliced stream in the original basis, z Q^T."""
        return z if self.comp.identity else z @ self.q_t

    def observe_dense(self) -> None:
        """The dense step on the dense stream (advancing it), and the readers' statistics.

        Unrotated, a branch-output norm stays stock, so its writer is fitted before the norm, to
        the dense writer's output (what that norm reads in the dense model): kept in `dense_out`."""
        comp, layer, group, li = self.comp, self.layer, self.group, self.li
        norms = list(dict.fromkeys(b.norm for b in group)) if comp.fit_readers else []
        k = self.q.shape[1]
        self.reads = {name: LeastSquares(k, self.hidden, self.device) for name in norms}
        post = [b for b in group if b.post_norm] if comp.identity and self.fit_writers else []
        if post and len(group) > 1:
            raise SliceGPTError("internal error: an unrotated branch-output norm is refitted alone in its step")
        self.dense_out = comp.run.cache() if post else None
        seen: list[torch.Tensor] = []
        handles = [get_path(layer, b.post_norm).register_forward_pre_hook(
            lambda module, args: seen.append(args[0])) for b in post]
        q_d = self.q.to(self.dtype)
        try:
            for b in range(comp.batches):
                normed: dict = {}
                hd = residual(layer, group, self.specs, comp.dense.get(b), comp.dense.kwargs(li, b), normed=normed)
                check_finite(hd, f"of the dense layer {li} ({step_name(group)})")
                comp.dense.put(b, hd)
                if self.dense_out is not None:
                    self.dense_out.append(seen.pop())
                z_full = self.sliced.get(b) @ self.q_t if norms else None
                for name in norms:
                    self.reads[name].update(get_path(layer, name)(z_full) @ q_d, normed[name], self.sliced.mask(b))
        finally:
            for handle in handles:
                handle.remove()

    def solve_readers(self) -> dict[str, torch.Tensor]:
        """Per norm, the d x k map its readers take instead of Q."""
        maps = {}
        for name, fit in self.reads.items():
            m, error_prior, error_fit = self.comp.solve(fit, self.q.T.to(torch.float64))
            self.outcome.fits.append(FitRecord(self.step, f"readers:{name}", error_prior, error_fit))
            maps[name] = m.T
        self.reads = {}
        return maps

    def observe_sliced(self) -> None:
        """The sliced step's writer inputs X, paired with the dense stream's targets.

        Each writer only records its input and returns zeros: the stream after the step is
        X W with the fitted W (`solve_writers`), which saves an output matmul per branch."""
        comp, layer = self.comp, self.layer
        self.writers = writers = writers_of(layer, self.group, self.hidden, self.device, comp.neurons_at(self.li),
                                            post_norm_matrix=self.dense_out is None, heads=comp.heads)
        self.fit = LeastSquares(writers.prior.shape[0], self.hidden, self.device,
                                prior=writers.prior if comp.partial else None)
        fitting = writers.neurons is not None or writers.heads is not None or comp.any_dense
        captured: dict[int, torch.Tensor] = {}
        stubbed: list[nn.Module] = []
        self.inputs = comp.run.cache()
        try:
            for i, (_, target, _) in enumerate(writers.blocks):
                if target is not None:
                    target[0].forward = _recording(captured, i, output_matrix(target)[0].shape[0])
                    stubbed.append(target[0])
            for b in range(len(self.sliced)):
                x = self._inputs(self.sliced.get(b), self.sliced.kwargs(self.li, b), captured)
                if b < comp.batches:
                    self.fit.update(x, self._target(b), self.sliced.mask(b))
                elif fitting:
                    self.fit.update(x, None, self.sliced.mask(b))  # the target X P
                self.inputs.append(x)
        finally:
            for module in stubbed:
                del module.forward

    def _inputs(self, z: torch.Tensor, kwargs: dict, captured: dict[int, torch.Tensor]) -> torch.Tensor:
        """One batch's fit inputs: the writers' inputs (and a column of ones per bias), or a post-norm's output."""
        normed: dict = {}
        outputs = {branch.name: run_branch(self.layer, self.specs[branch.name], z, kwargs, normed)
                   for branch in self.group}
        columns = []
        for i, (branch, target, has_bias) in enumerate(self.writers.blocks):
            if target is None:
                columns.append(outputs[branch.name])
                continue
            columns.append(captured[i])
            if has_bias:
                columns.append(torch.ones_like(captured[i][..., :1]))
        return columns[0] if len(columns) == 1 else torch.cat(columns, dim=-1)

    def _target(self, b: int) -> torch.Tensor:
        """What batch b's writers should add to the stream: h_dense - z Q^T (or the dense writer's output)."""
        if self.dense_out is not None:
            return self.dense_out.get(b, self.device)
        return self.comp.dense.get(b) - self.full(self.sliced.get(b))

    def solve_writers(self) -> None:
        """The writers' fit (with neurons pruned), the stream after the step, and the new weights."""
        comp, writers = self.comp, self.writers
        kept = None
        if writers.neurons is not None:
            w, kept, error_prior, error_fit = prune(
                self.fit.reduce(comp.run.ranks), writers.prior, comp.ridge, writers.neurons[1], comp.neurons_at(self.li),
                work=torch.float64 if self.dtype == torch.float64 else torch.float32)
            comp.run.ranks.same(w, kept)
        elif writers.heads is not None:
            w, kept, error_prior, error_fit = self._prune_heads()
        elif comp.any_dense:
            w, error_prior, error_fit = comp.solve(self.fit, writers.prior)
        else:  # every target is X P: the fit is P, exactly
            w, error_prior, error_fit = writers.prior, 0.0, 0.0
        self.fit = writers.prior = None
        self._advance(w.to(self.dtype), kept)
        self.outcome.fits.append(FitRecord(self.step, "writers", error_prior, error_fit))
        if writers.neurons is not None:
            branch, rows = writers.neurons
            drop_neurons(self.layer, branch, (kept[(kept >= rows.start) & (kept < rows.stop)] - rows.start).cpu())
        if writers.heads is not None:
            branch, rows = writers.heads
            path, value = drop_heads(self.layer, branch, (kept[(kept >= rows.start) & (kept < rows.stop)]
                                                          - rows.start).cpu())
            owner, _, attr = path.rpartition(".")
            prefix = f"{comp.run.adapter.layers}.{self.li}.{owner}"
            self.outcome.module_attributes.setdefault(prefix, {})[attr] = value
        set_writers(self.layer, writers, w, self.hidden, self.dtype)

    def _prune_heads(self) -> tuple[torch.Tensor, torch.Tensor, float, float]:
        """The writers' fit with whole attention heads pruned (`compensation.prune_heads`)."""
        comp = self.comp
        branch, rows = self.writers.heads
        spec = branch.heads
        size = get_path(self.layer, spec.head_dim)
        groups = len(rows) // size // get_path(self.layer, spec.groups)  # query heads / query heads per group
        w, kept, error_prior, error_fit = prune_heads(self.fit.reduce(comp.run.ranks), self.writers.prior, comp.ridge,
                                                      rows, size, groups, comp.heads)
        comp.run.ranks.same(w, kept)
        return w, kept, error_prior, error_fit

    def _advance(self, w: torch.Tensor, kept: torch.Tensor | None) -> None:
        """The sliced stream after the step, z Q^T + X W (z + norm(X W) with `dense_out`), from the kept X."""
        post_norm = get_path(self.layer, self.group[0].post_norm) if self.dense_out is not None else None
        for b in range(len(self.sliced)):
            x = self.inputs.get(b, self.device)
            y = (x if kept is None else x[..., kept]) @ w
            h = self.full(self.sliced.get(b)) + (post_norm(y) if post_norm is not None else y)
            check_finite(h, f"of layer {self.li} ({step_name(self.group)})")
            self.sliced.put(b, h)
        self.inputs.close()
        self.inputs = None
