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
from typing import Sequence

import torch

from slicegpt.adapters import ModelAdapter
from slicegpt.adapters.base import branch_groups
from slicegpt.core.compensation import LeastSquares, removal_costs
from slicegpt.core.distributed import Ranks
from slicegpt.core.onload import LayeredModel
from slicegpt.core.transform import check_finite, targets
from slicegpt.core.weights import output_matrix
from slicegpt.modeling.runtime import get_path

PROBE_WINDOWS = 8  # calibration windows the probe runs (per rank, at most)
LAYER_FLOOR = 0.1  # no layer keeps fewer than this share of its neurons


def layer_floor(dense: int, round_to: int) -> int:
    """The fewest neurons one layer may keep."""
    return min(dense, max(round_to, math.ceil(LAYER_FLOOR * dense / round_to) * round_to))


@torch.no_grad()
def probe_neuron_costs(view: LayeredModel, adapter: ModelAdapter, batches: Sequence, ridge: float, floor: int,
                       offload: str = "cpu", offload_dir=None, progress: bool = True,
                       ranks: Ranks | None = None) -> list[list[float]]:
    """Per layer, the cost of each removal of an MLP neuron in turn (down to `floor` kept), on one scale.

    Runs the dense layers as they are on the first batches (`PROBE_WINDOWS` windows); the sums
    are over every rank's."""
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
    curves: list[list[float]] = []
    with dense_entry(view, adapter, used, offload, offload_dir) as (cache, arguments):
        with tqdm(total=n_layers, desc="probing neurons", unit="layer",
                  disable=not progress or not ranks.writer) as bar:
            for li in range(n_layers):
                layer = view.onload(f"{adapter.layers}.{li}")
                target = targets(layer, mlp, "outputs")[0]
                weight = output_matrix(target)[0]  # without the bias (a constant the fit ignores)
                # the writer's own weights are the fit of its own outputs: the Gram alone (no outputs)
                fit = LeastSquares(weight.shape[-1], 0, view.device)
                for group in branch_groups(adapter.branches):
                    seen: list[torch.Tensor] = []
                    hook = target[0].register_forward_hook(lambda m, inp, out: seen.append(inp[0])) \
                        if mlp in group else None
                    try:
                        for b in range(len(cache)):
                            mask = used[b][1].to(view.device)
                            seen.clear()
                            h = residual(layer, group, specs, cache.get(b, view.device),
                                         arguments.get(li, b, view.device))
                            check_finite(h, f"of layer {li}")
                            cache.put(b, h)
                            if hook is None:
                                continue
                            x = seen[0]
                            h = h.to(torch.float64)
                            if adapter.norm_kind == "layernorm":
                                h = h - h.mean(dim=-1, keepdim=True)
                            # each token's error relative to its own stream's RMS, which the next norm
                            # divides by (a few tokens' massive activations would otherwise set the scale)
                            x = x * h.pow(2).mean(-1, keepdim=True).clamp_min(1e-30).rsqrt().to(x.dtype)
                            fit.update(x, x[..., :0], mask)
                    finally:
                        if hook is not None:
                            hook.remove()
                work = torch.float64 if weight.dtype == torch.float64 else torch.float32
                fit.reduce(ranks)
                costs = removal_costs(fit.xx, weight.T, ridge, range(0, weight.shape[-1]), floor, work=work)
                curves.append([c / max(fit.tokens, 1) for c in costs])
                view.offload(f"{adapter.layers}.{li}")
                bar.update()
    return curves


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
