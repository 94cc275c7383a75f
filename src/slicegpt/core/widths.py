"""How wide each block boundary stays: equal widths (the paper's) or chosen under a parameter budget.

`allocate` spends a parameter budget where the signal is: it starts from full width and
repeatedly removes one `round_to` block of directions at the boundary where that loses the
least of the stream's energy per parameter saved (the energy share of the removed
eigenvalues of the *dense* stream's covariance at that boundary, from `probe_spectra`).
The norms that read the stream divide by its RMS, so what a cut costs is the *share* of
energy removed, not its absolute size; a boundary whose spectrum is steep gives up many
directions for little, a flat one keeps them. bench/quality.py measures it against equal widths:
it helps SmolLM2 (with compensation 50.0 -> 49.2) and hurts Gemma 3 (83.5 -> 96.4), so equal
widths stay the default; a per-boundary sensitivity probe would be the better measure.
"""

from __future__ import annotations

import heapq
from typing import Sequence

import torch

from slicegpt.adapters import ModelAdapter
from slicegpt.core.bases import Covariance
from slicegpt.core.budget import ParameterModel
from slicegpt.core.cache import ActivationCache
from slicegpt.core.distributed import Ranks
from slicegpt.core.onload import LayeredModel
from slicegpt.core.transform import check_finite
from slicegpt.errors import SliceGPTError
from slicegpt.modeling.runtime import get_path
from slicegpt.adapters.base import branch_groups

WIDTHS = ("adaptive", "equal", "auto")
# "auto" prunes MLP neurons alone down to this share of them, then slices the stream too. SmolLM2 at
# --parameters 0.65: neurons alone (616 of 1536) 59.48 held-out perplexity, half of them and the stream
# sliced to 416 65.62; at --size 0.5 a 0.3 floor matched it (84.65 at 0.499 against 86.18 at 0.493) and 0.2
# was worse (91.88): docs/benchmarks.md, Choosing the defaults.
MLP_FLOOR = 0.4


class StreamSpectrum:
    """The dense stream's covariance at one boundary as the norms see it: each token divided by its RMS
    (for LayerNorm families its mean dropped first), the mean direction removed, which carries no
    information. `allocate` spends widths by its eigenvalues."""

    def __init__(self, dim: int, device: torch.device | str, layernorm: bool) -> None:
        self.cov = Covariance(dim, device)
        self.total = torch.zeros(dim, dtype=torch.float64, device=device)
        self.layernorm = layernorm

    def update(self, x: torch.Tensor, mask: torch.Tensor, where: str) -> None:
        check_finite(x, where)
        x = x.to(torch.float64)
        if self.layernorm:
            x = x - x.mean(dim=-1, keepdim=True)
        x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-12)  # what the norms pass on
        self.total += x.reshape(-1, x.shape[-1])[mask.reshape(-1).bool()].sum(0)
        self.cov.update(x, mask)

    def eigenvalues(self, ranks: Ranks) -> torch.Tensor:
        """Descending, on the CPU; the sums over every rank's tokens."""
        self.cov.reduce(ranks)
        ranks.sum_(self.total)
        mean = self.total / max(self.cov.tokens, 1)
        matrix = self.cov.matrix / self.cov.tokens - torch.outer(mean, mean)
        return torch.linalg.eigvalsh(matrix).flip(0).cpu()


@torch.no_grad()
def probe_spectra(view: LayeredModel, adapter: ModelAdapter, batches: Sequence, offload: str = "cpu",
                  offload_dir=None, progress: bool = True, ranks: Ranks | None = None) -> list[torch.Tensor]:
    """Eigenvalues (descending) of the dense stream's covariance at every block boundary.

    Runs the layers as they are (no fusion, nothing changed); for LayerNorm families the
    stream's mean, which every LayerNorm drops, is removed first. `batches` are this rank's
    share; the sums are over every rank's.
    """
    ranks = ranks or Ranks()
    from tqdm.auto import tqdm

    from slicegpt.core.streams import dense_entry, residual

    model = view.model
    layer_paths = [f"{adapter.layers}.{i}" for i in range(len(get_path(model, adapter.layers)))]
    structure = adapter.structure()
    specs = {b["name"]: b for b in structure["branches"]}
    groups = branch_groups(adapter.branches)
    masks = [mask for _, mask in batches]
    spectra = []
    dim = view.model.get_submodule(adapter.embeddings[0]).weight.shape[-1]

    def add(cache: ActivationCache, where: str) -> None:
        spectrum = StreamSpectrum(dim, view.device, adapter.norm_kind == "layernorm")
        for b in range(len(cache)):
            spectrum.update(cache.get(b, view.device), masks[b].to(view.device), where)
        spectra.append(spectrum.eigenvalues(ranks))

    with dense_entry(view, adapter, batches, offload, offload_dir) as (cache, arguments):
        add(cache, "after the embeddings")
        with tqdm(total=len(layer_paths), desc="probing widths", unit="layer",
                  disable=not progress or not ranks.writer) as bar:
            for li, path in enumerate(layer_paths):
                layer = view.onload(path)
                for group in groups:
                    for b in range(len(cache)):
                        kwargs = arguments.get(li, b, view.device)
                        cache.put(b, residual(layer, group, specs, cache.get(b, view.device), kwargs))
                    add(cache, f"of layer {li} ({'+'.join(b.name for b in group)})")
                view.offload(path)
                bar.update()
    return spectra


def allocate(spectra: Sequence[torch.Tensor], params: ParameterModel, budget: int, round_to: int,
             hidden: int, neurons: int | None = None) -> list[int]:
    """Widths (multiples of `round_to`) whose parameter count is at most `budget`, losing the least energy
    (each MLP keeping `neurons`)."""
    n = len(spectra)
    params = _WithNeurons(params, neurons)
    widths = [params.fixed.get(b, hidden) for b in range(n)]
    shares = [(s.clamp_min(0) / s.clamp_min(0).sum()).tolist() for s in spectra]
    free = [b for b in range(n) if b not in params.fixed]

    def cut(b: int) -> tuple[float, int] | None:
        k = widths[b]
        step = k - (k - 1) // round_to * round_to if k % round_to else round_to  # back onto the grid
        if k - step < round_to:
            return None
        lost = sum(shares[b][k - step:k])
        trial = widths.copy()
        trial[b] = k - step
        saved = params.count(widths) - params.count(trial)
        return (lost / saved if saved > 0 else float("inf")), step

    count = params.count(widths)
    heap = [(c[0], b) for b in free if (c := cut(b)) is not None]
    heapq.heapify(heap)
    while count > budget:
        if not heap:
            raise SliceGPTError(f"no widths of at least {round_to} meet a budget of {budget:,} parameters: the "
                                f"narrowest still hold {count:,} (what no width shrinks, such as a tied embedding "
                                "table, stays whole); choose a larger --size")
        priority, b = heapq.heappop(heap)
        current = cut(b)
        if current is None:
            continue
        if current[0] > priority + 1e-15:  # a neighbour's width changed its price: requeue
            heapq.heappush(heap, (current[0], b))
            continue
        widths[b] -= current[1]
        count = params.count(widths)
        following = cut(b)
        if following is not None:
            heapq.heappush(heap, (following[0], b))
    # The last cut may have overshot: give back steps, the most valuable first, while they fit,
    # so that no single round-to step could be added without breaking the budget.
    while True:
        best = None
        for b in free:
            k = widths[b]
            if k >= hidden:
                continue
            grow = min(round_to, hidden - k)
            trial = widths.copy()
            trial[b] = k + grow
            extra = params.count(trial) - count
            if params.count(trial) <= budget:
                value = sum(shares[b][k:k + grow]) / max(extra, 1)
                if best is None or value > best[0]:
                    best = (value, b, trial)
        if best is None:
            return widths
        widths = best[2]
        count = params.count(widths)


class _WithNeurons:
    """A parameter model with the MLP width held fixed (what `allocate` varies is the stream's)."""

    def __init__(self, params: ParameterModel, neurons: int | None) -> None:
        self.params, self.neurons, self.fixed = params, neurons, params.fixed

    def count(self, widths: list[int]) -> int:
        return self.params.count(widths, self.neurons)


def budget_widths(params: ParameterModel, budget: int, round_to: int, hidden: int, n: int,
                  neurons: int | None = None) -> list[int]:
    """The largest equal width (multiple of `round_to`) whose count is at most `budget`."""
    for k in range(hidden // round_to * round_to, 0, -round_to):
        if params.count([k] * n, neurons) <= budget:
            return [params.fixed.get(b, k) for b in range(n)]  # the exit stays full width where fixed
    least = params.count([params.fixed.get(b, round_to) for b in range(n)], neurons)
    raise SliceGPTError(f"no width of at least {round_to} meets a budget of {budget:,} parameters: at width "
                        f"{round_to} this layout still holds {least:,} (what no width shrinks, such as a tied "
                        "embedding table, stays whole); choose a larger --size")


def fill_neurons(params: ParameterModel, widths: list[int], budget: int, neurons: int, round_to: int) -> int:
    """The most neurons per MLP (at least `neurons`, a multiple of `round_to`) that these widths leave room for:
    one equal width meets a budget only to within a step of the stream's width (SmolLM2 at 0.5: 0.7% of
    the parameters), which the neurons can spend."""
    while neurons + round_to <= params.neurons and params.count(widths, neurons + round_to) <= budget:
        neurons += round_to
    return neurons


def plan_widths(view: LayeredModel, adapter: ModelAdapter, batches: Sequence, *, rotation: str, rule: str,
                sparsity: float, parameters: float | None, dense_parameters: int, round_to: int, tied: bool,
                slice_head: bool, probe_samples: int = 8, offload: str = "cpu", offload_dir=None,
                progress: bool = True, ranks: Ranks | None = None, mlp: float | str | None = None,
                heads: tuple[int, int] | None = None, spectra: Sequence[torch.Tensor] | None = None
                ) -> tuple[list[int] | None, str, int | None]:
    """One width per block boundary: equal (`sparsity`, the paper's), or within a budget.

    The budget is `parameters` x the dense count when given, else the count the equal widths
    of `sparsity` would have; `rule="adaptive"` (per-layer rotation) spends it by `allocate`
    on the spectra of the first `probe_samples` calibration windows, `"equal"` takes the
    largest equal width that fits. `batches` are this rank's share of the windows
    (`Ranks.share`); the probe takes the first whole batches that reach `probe_samples`, and
    every rank gets rank 0's widths. Returns the widths, the rule used (families whose
    forward needs one width throughout, GPT-2 and MoE, get equal widths) and the MLP
    neurons to keep per layer (None: all).

    `mlp`: a fraction of every MLP's neurons to keep (the stream's widths then fill the
    budget), or "auto": the budget (with `sparsity`: the dense count less that share of the
    decoder layers' weights) is met by pruning neurons alone, the stream keeping its full
    width and basis, while that keeps at least `MLP_FLOOR` of them; past that the neurons
    stay at the floor and the stream is sliced for the rest (families whose MLPs write
    through a branch-output norm slice the stream alone then, to the paper's count). Where
    the stream is not sliced at all the widths are all d (the caller then rotates nothing).

    `heads` (key/value heads, query heads each) are fixed before the budget is spent: every count
    here is of the model with those heads, so neurons (or the stream) fill the rest of the budget;
    where the heads alone meet it, nothing else is cut.

    `rule="auto"` (the default recipe's) is adaptive where MLP neurons are pruned beside the sliced
    stream and equal elsewhere: SmolLM2 at 0.5 gave 81.15 adaptive against 84.99 equal (the rest of
    the budget spent on neurons), where the stream alone sliced adaptively hurt Gemma 3 (83.5 -> 96.4).
    `spectra`: the boundaries' eigenvalues when the caller has probed them (`allocation.probe_costs`).
    """
    from slicegpt.core.bases import sliced_dim
    from slicegpt.core.budget import parameter_model

    if rule not in WIDTHS:
        raise SliceGPTError(f"widths must be one of {', '.join(WIDTHS)}, got {rule!r}")
    hidden = get_path(view.model, adapter.embeddings[0]).weight.shape[-1]
    n = len(get_path(view.model, adapter.layers)) * len(branch_groups(adapter.branches)) + 1
    dim = sliced_dim(hidden, sparsity, round_to)
    if mlp == 1 or mlp == 1.0:
        mlp = None
    if rotation == "uniform" or adapter.slice_head_required or (rule == "auto" and mlp is None):
        rule = "equal"
    if parameters is None and rule == "equal" and (mlp is None or mlp != "auto"):
        widths = [dim] * n
        if rotation == "per-layer" and not slice_head:
            widths[-1] = hidden  # the head reads the original basis
        neurons = _neurons(view, adapter, mlp, round_to)
        if neurons is not None and dim != hidden:
            _refuse_mixing(adapter)
        return widths, rule, neurons
    source_tied = view.ties_head(adapter.head, adapter.embeddings[0])
    model = parameter_model(view.model, adapter, rotation=rotation, tied=tied, source_tied=source_tied,
                            slice_head=slice_head, total=dense_parameters, heads=heads)
    if parameters is not None:  # checked by the plan (`slicegpt.plan`)
        budget = int(parameters * dense_parameters)
    else:
        budget = model.count([dim] * n)
    neurons = None
    unrotated = parameter_model(view.model, adapter, rotation="none", tied=source_tied,
                                source_tied=source_tied, slice_head=True, total=dense_parameters, heads=heads)
    full = [hidden] * n
    if heads is not None and mlp is None and unrotated.count(full) <= budget:  # the heads alone meet the size
        return full, "equal", None
    if mlp is not None:
        if mlp == "auto":
            if not unrotated.neurons:
                mlp = None  # the family describes no MLP neurons: the stream alone is sliced
            else:
                own = budget
                if parameters is None:  # `sparsity` of the decoder layers' weights (monotone, always
                    # below dense: the paper's count also holds the matrices its rotation adds)
                    layer_weights = sum(p.numel() for p in get_path(view.model, adapter.layers).parameters())
                    own = dense_parameters - int(sparsity * layer_weights)
                if unrotated.count(full) <= own and heads is not None:  # the heads alone meet the size
                    return full, "equal", None
                if unrotated.count(full) <= own:  # nothing needs pruning: the stream alone, as asked
                    mlp = None
                else:
                    for m in range(unrotated.neurons // round_to * round_to, 0, -round_to):
                        if unrotated.count(full, m) <= own:
                            if m >= MLP_FLOOR * unrotated.neurons:
                                return full, "equal", m
                            break
                    if neurons_need_full_width(adapter):
                        mlp = None  # past the floor, and neurons cannot be mixed with slicing: the stream alone
                    else:
                        neurons, budget = -(-int(MLP_FLOOR * unrotated.neurons) // round_to) * round_to, own
        else:
            neurons = _neurons(view, adapter, mlp, round_to)
            if unrotated.count(full, neurons) <= budget:
                return full, "equal", neurons
            if neurons is not None:
                _refuse_mixing(adapter)
    if rule == "auto":
        rule = "adaptive" if neurons is not None else "equal"
    if rule == "equal":
        widths = budget_widths(model, budget, round_to, hidden, n, neurons)
        if mlp == "auto" and neurons is not None:  # what the equal width leaves goes back to the neurons
            neurons = fill_neurons(model, widths, budget, neurons, round_to)
        return widths, rule, neurons
    if spectra is not None:
        widths = (ranks or Ranks()).from_writer(allocate(spectra, model, budget, round_to, hidden, neurons))
        return widths, rule, neurons
    if batches is None:  # a plan before calibration: the spectra choose them later
        return None, rule, neurons
    ranks = ranks or Ranks()
    batch_size = len(batches[0][0]) if batches else 1
    first = -(-probe_samples // batch_size) * batch_size  # whole batches of the windows, as one process takes them
    rows = len(ranks.share(first))  # this rank's part of the first windows
    probe = []
    for ids, mask in batches:
        if rows <= 0:
            break
        probe.append((ids[:rows], mask[:rows]))
        rows -= len(probe[-1][0])
    spectra = probe_spectra(view, adapter, probe, offload, offload_dir, progress, ranks)
    return ranks.from_writer(allocate(spectra, model, budget, round_to, hidden, neurons)), rule, neurons


def no_heads_message(family: str, described: str) -> str:
    """Why `--heads` does not apply to `family` (`described`: the model types whose heads are described)."""
    return f"--heads applies to families whose adapter describes attention heads ({described}); not {family}"


def head_layout(heads: float | str | None, dense: tuple[int, int] | None, family: str,
                described: str = "") -> tuple[int, int] | None:
    """`--heads` as (key/value heads, query heads per key/value head) kept in every layer; None keeps all.

    "GxR" is taken as given. A fraction f of the H = G x R query heads keeps the layout whose count
    is nearest f x H (at least one head), and of equal counts the one with the fewest key/value
    groups: whole groups go before query heads within groups do (SmolLM2 at 0.8x and 0.65x: one of
    3 groups gone 47.56 and 60.84, one query head per group 50.14 and 70.14; docs/benchmarks.md).
    """
    if heads is None:
        return None
    if dense is None:
        raise SliceGPTError(no_heads_message(family, described))
    groups, per_group = dense
    if isinstance(heads, str):
        kept = tuple(int(n) for n in heads.split("x"))
        if kept[0] > groups or kept[1] > per_group:
            raise SliceGPTError(f"--heads {heads}: this model has {groups} key/value heads with {per_group} query "
                                "heads each")
    else:
        target = max(1, round(heads * groups * per_group))
        kept = min(((g, r) for g in range(1, groups + 1) for r in range(1, per_group + 1)),
                   key=lambda gr: (abs(gr[0] * gr[1] - target), gr[0]))
    return None if kept == (groups, per_group) else kept


def neurons_need_full_width(adapter: ModelAdapter) -> bool:
    """Whether pruned MLP neurons rule out slicing the stream: an MLP that writes through a
    branch-output norm is refitted before that norm, which only the unrotated stream allows."""
    return any(b.neurons and b.post_norm for b in adapter.branches)


def _refuse_mixing(adapter: ModelAdapter) -> None:
    if neurons_need_full_width(adapter):
        raise SliceGPTError(f"{adapter.family} MLPs write through a branch-output norm: their neurons are pruned "
                            "only while the stream keeps its width (a --size that neurons alone meet)")


def _neurons(view: LayeredModel, adapter: ModelAdapter, mlp: float | None, round_to: int) -> int | None:
    """A fraction of the MLP width as a count of neurons (a multiple of `round_to`); None keeps all."""
    if mlp is None:
        return None
    if not 0.0 < mlp <= 1.0:
        raise SliceGPTError(f"--neurons is the fraction of MLP neurons to keep, in (0, 1]; got {mlp}")
    from slicegpt.core.weights import mlp_neurons

    total = mlp_neurons(view.model, adapter)
    if total is None:
        from slicegpt.adapters import ADAPTERS

        have = ", ".join(t for a in ADAPTERS if any(b.neurons for b in a.branches) for t in a.model_types)
        raise SliceGPTError(f"pruning MLP neurons is not described for {adapter.family} models ({have} have it)")
    return max(round_to, round(mlp * total / round_to) * round_to) if mlp < 1.0 else None
