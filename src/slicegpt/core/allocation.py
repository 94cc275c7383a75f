"""One budget across layers: how many MLP neurons each layer keeps, chosen by measured loss.

Equal counts spend the budget as if every layer's neurons were worth the same; they are not.
Before the slicing pass, each layer's MLP is probed on the dense model (a few calibration
windows): the statistics of its down projection give the cost of removing its neurons, each
removal's error after the others are refitted (structured OBS, `compensation.removal_costs`, the
search that prunes them later, without its fit). Each token's error is measured relative to the RMS of
the stream the layer writes it into, which is what the next norm divides by, so every layer's
costs are on one scale; the budget's removals go, a `round_to` block at a time, wherever they
cost least per parameter. The parameters freed are at least what equal counts would free.

SmolLM2-135M at 0.8 of its parameters (docs/benchmarks.md): equal counts 48.32 held-out
perplexity; costs relative to the stream's summed energy 47.50 (a few tokens' massive activations
set that scale, and six middle layers fell to the floor); relative to each token's RMS 44.15.
"""

from __future__ import annotations

import heapq
import math
from dataclasses import dataclass
from typing import Sequence

import torch

from slicegpt.adapters import ModelAdapter
from slicegpt.adapters.base import branch_groups
from slicegpt.core.compensation import LeastSquares, head_removal_costs, removal_costs
from slicegpt.core.distributed import Ranks
from slicegpt.core.onload import LayeredModel
from slicegpt.core.transform import check_finite, targets
from slicegpt.core.weights import output_matrix
from slicegpt.core.widths import StreamSpectrum
from slicegpt.modeling.runtime import get_path

PROBE_WINDOWS = 8  # calibration windows the probe runs (per rank, at most)
LAYER_FLOOR = 0.1  # no layer keeps fewer than this share of its neurons


def layer_floor(dense: int, round_to: int) -> int:
    """The fewest neurons one layer may keep."""
    return min(dense, max(round_to, math.ceil(LAYER_FLOOR * dense / round_to) * round_to))


@dataclass
class Probe:
    """What the probe measured, per layer, on one scale (an error per token relative to the stream's RMS):
    each MLP neuron removal's cost in turn (`neurons`), and the cost of each attention head layout priced
    (`heads`: (key/value heads, query heads each) -> cost)."""

    neurons: list[list[float]]
    heads: list[dict[tuple[int, int], float]]
    spectra: list[torch.Tensor] | None = None  # with `spectra=True`: `widths.probe_spectra`'s, from the same pass


@torch.no_grad()
def probe_costs(view: LayeredModel, adapter: ModelAdapter, batches: Sequence, ridge: float, floor: int,
                layouts: Sequence[tuple[int, int]] = (), offload: str = "cpu", offload_dir=None,
                progress: bool = True, ranks: Ranks | None = None, spectra: bool = False) -> Probe:
    """Per layer, the cost of each removal of an MLP neuron in turn (down to `floor` kept) and of each head
    layout in `layouts`, on one scale; with `spectra`, also the stream's spectrum at every boundary (the
    same as `widths.probe_spectra` on these windows, without a pass of its own).

    Runs the dense layers as they are on the first batches (`PROBE_WINDOWS` windows); the sums
    are over every rank's. A branch's error is taken on its output linear (the down projection, the
    attention's output projection) with the other rows refitted, as the run prunes them."""
    from tqdm.auto import tqdm

    from slicegpt.core.streams import dense_entry, residual

    ranks = ranks or Ranks()
    used, windows = [], 0
    for batch in batches:
        if windows >= PROBE_WINDOWS:
            break
        used.append(batch)
        windows += batch[0].shape[0]
    n_layers = len(get_path(view.model, adapter.layers))
    structure = adapter.structure()
    specs = {b["name"]: b for b in structure["branches"]}
    mlp = next(b for b in adapter.branches if b.neurons)
    attention = next((b for b in adapter.branches if b.heads), None) if layouts else None
    probe = Probe([], [], [] if spectra else None)
    hidden = get_path(view.model, adapter.embeddings[0]).weight.shape[-1]
    layernorm = adapter.norm_kind == "layernorm"
    with dense_entry(view, adapter, used, offload, offload_dir) as (cache, arguments):
        if spectra:
            spectrum = StreamSpectrum(hidden, view.device, layernorm)
            for b in range(len(cache)):
                spectrum.update(cache.get(b, view.device), used[b][1].to(view.device), "after the embeddings")
            probe.spectra.append(spectrum.eigenvalues(ranks))
        desc = "probing neurons" + (" and heads" if attention else "") + (" and widths" if spectra else "")
        with tqdm(total=n_layers, desc=desc, unit="layer", disable=not progress or not ranks.writer) as bar:
            for li in range(n_layers):
                layer = view.onload(f"{adapter.layers}.{li}")
                priced = [b for b in (mlp, attention) if b is not None]
                linears = {b.name: targets(layer, b, "outputs")[0] for b in priced}
                # each linear's own weights are the fit of its own outputs: the Gram alone (no outputs)
                fits = {name: LeastSquares(output_matrix(t)[0].shape[-1], 0, view.device)
                        for name, t in linears.items()}
                for group in branch_groups(adapter.branches):
                    spectrum = StreamSpectrum(hidden, view.device, layernorm) if spectra else None
                    seen: dict[str, torch.Tensor] = {}
                    hooks = [linears[b.name][0].register_forward_hook(
                        lambda m, inp, out, name=b.name: seen.__setitem__(name, inp[0]))
                        for b in group if b.name in linears]
                    try:
                        for b in range(len(cache)):
                            mask = used[b][1].to(view.device)
                            seen.clear()
                            h = residual(layer, group, specs, cache.get(b, view.device),
                                         arguments.get(li, b, view.device))
                            check_finite(h, f"of layer {li}")
                            cache.put(b, h)
                            if spectrum is not None:
                                spectrum.update(h, mask, f"of layer {li}")
                            if not hooks:
                                continue
                            h = h.to(torch.float64)
                            if adapter.norm_kind == "layernorm":
                                h = h - h.mean(dim=-1, keepdim=True)
                            # each token's error relative to its own stream's RMS, which the next norm
                            # divides by (a few tokens' massive activations would otherwise set the scale)
                            scale = h.pow(2).mean(-1, keepdim=True).clamp_min(1e-30).rsqrt()
                            for name, x in seen.items():
                                x = x * scale.to(x.dtype)
                                fits[name].update(x, x[..., :0], mask)
                    finally:
                        for hook in hooks:
                            hook.remove()
                    if spectrum is not None:
                        probe.spectra.append(spectrum.eigenvalues(ranks))
                for name, fit in fits.items():
                    fit.reduce(ranks)
                weight = output_matrix(linears[mlp.name])[0]  # without the bias (a constant the fit ignores)
                work = torch.float64 if weight.dtype == torch.float64 else torch.float32
                fit = fits[mlp.name]
                costs = removal_costs(fit.xx, weight.T, ridge, range(0, weight.shape[-1]), floor, work=work)
                probe.neurons.append([c / max(fit.tokens, 1) for c in costs])
                probe.heads.append({})
                if attention is not None:
                    weight, fit = output_matrix(linears[attention.name])[0], fits[attention.name]
                    head_dim = get_path(layer, attention.heads.head_dim)
                    groups = weight.shape[-1] // head_dim // get_path(layer, attention.heads.groups)
                    costs = head_removal_costs(fit.xx, weight.T, ridge, range(0, weight.shape[-1]), head_dim,
                                               groups, layouts)
                    probe.heads[-1] = {tuple(layout): c / max(fit.tokens, 1) for layout, c in zip(layouts, costs)}
                view.offload(f"{adapter.layers}.{li}")
                bar.update()
    return probe


def neuron_cost(curves: Sequence[Sequence[float]], counts: Sequence[int], dense: int) -> float:
    """The probe's cost of keeping `counts` neurons per layer: each layer's first removals summed."""
    return float(sum(sum(curve[:dense - count]) for curve, count in zip(curves, counts)))


def allocate_neurons(curves: Sequence[Sequence[float]], dense: int, keep: int, round_to: int,
                     costs: Sequence[int] | None = None) -> list[int]:
    """Neurons per layer in place of `keep` in every layer, removed a `round_to` block at a time where the
    curves (each layer's removal costs in turn) say they cost least per parameter. `costs`: the parameters
    one neuron of each layer holds (the layers around a per-layer stream differ); the removals free at
    least the parameters that `keep` everywhere would, so the count stays within the same budget."""
    costs = list(costs) if costs is not None else [1] * len(curves)
    removed = [0] * len(curves)
    heap: list[tuple[float, int]] = []

    def push(i: int) -> None:
        m = removed[i]
        if m + round_to <= len(curves[i]):
            heapq.heappush(heap, (float(sum(curves[i][m:m + round_to])) / costs[i], i))

    for i in range(len(curves)):
        push(i)
    target = sum(c * (dense - keep) for c in costs)
    freed = 0
    while freed < target and heap:  # (an empty heap: every layer at its floor, not reachable from keep)
        _, i = heapq.heappop(heap)
        removed[i] += round_to
        freed += round_to * costs[i]
        push(i)
    return [dense - r for r in removed]
