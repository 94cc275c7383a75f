"""Weight changes of one residual step: its readers take the sliced stream, its writers the next basis.

Each function acts on one decoder layer (or the model's ends) in place; the engine calls them
in the same order whatever the source of the weights (resident or onloaded one layer at a time).
"""

from __future__ import annotations

import math

import torch
from torch import nn

from slicegpt.adapters import ModelAdapter
from slicegpt.adapters.base import Branch
from slicegpt.errors import SliceGPTError
from slicegpt.modeling.runtime import get_path, set_parameter
from slicegpt.core.weights import (Target, bias_of, put_weight, resolve, resolve_all, rotate_input, rotate_output,
                                   weight_of)

ModuleAttributes = dict[str, dict[str, float]]  # plain attributes to restore on load (norm epsilons, widths)


def targets(layer: nn.Module, branch: Branch, role: str) -> list[Target]:
    targets = resolve_all(layer, getattr(branch, role))
    if not targets:
        raise SliceGPTError(f"branch '{branch.name}' of {type(layer).__name__} has none of its {role}")
    return targets


def _set_width(layer: nn.Module, path: str, dim: int) -> tuple[str, str] | None:
    """Set a plain attribute holding the residual width (``mlp.gate.hidden_dim``); ``?`` = optional."""
    owner_path, _, attr = path.rstrip("?").rpartition(".")
    try:
        owner = get_path(layer, owner_path)
    except AttributeError:
        owner = None
    if owner is None or not hasattr(owner, attr):
        if path.endswith("?"):
            return None
        raise SliceGPTError(f"{type(layer).__name__} has no attribute {path}")
    setattr(owner, attr, dim)
    return owner_path, attr


def check_finite(x: torch.Tensor, where: str) -> None:
    if not torch.isfinite(x).all():
        hint = "load it with --dtype float32" if x.dtype in (torch.float16, torch.bfloat16) else "check its weights"
        raise SliceGPTError(
            f"non-finite values (NaN/inf) in the activations {where} on the calibration data "
            f"({str(x.dtype).replace('torch.', '')}); {hint}"
        )


def resize_norm(norm: nn.Module, adapter: ModelAdapter, dim: int, hidden: int) -> float | None:
    """Make a fused (unit-gain) RMSNorm act on `dim` kept coordinates as it did on `hidden`.

    RMS over k coordinates is sqrt(d/k) times RMS over d, so the gain becomes sqrt(d/k)
    and epsilon becomes eps * d/k: x / sqrt(sum/k + eps d/k) * sqrt(d/k) = x / sqrt(sum/d + eps).
    Returns the new epsilon, or None when nothing changed.
    """
    w = norm.weight.data
    gain = math.sqrt(hidden / dim) - adapter.norm_offset
    set_parameter(norm, "weight", torch.full((dim,), gain, dtype=w.dtype, device=w.device))
    if dim == hidden:
        return None
    eps = getattr(norm, adapter.norm_eps_attr) * hidden / dim
    setattr(norm, adapter.norm_eps_attr, eps)
    return eps


def rotate_reads(layer: nn.Module, prefix: str, group: tuple[Branch, ...], adapter: ModelAdapter,
                  q: torch.Tensor, hidden: int, attributes: ModuleAttributes,
                  maps: dict[str, torch.Tensor] | None = None) -> None:
    """The branches of one step read the stream in basis q (d x k): norms, input linears, widths.

    `maps` gives, per norm, the d x k matrix its readers take instead of q (compensation's fit).
    """
    dim = q.shape[1]
    for norm_name in dict.fromkeys(b.norm for b in group):
        eps = resize_norm(get_path(layer, norm_name), adapter, dim, hidden)
        if eps is not None:
            attributes[f"{prefix}.{norm_name}"] = {adapter.norm_eps_attr: eps}
    for branch in group:
        for target in targets(layer, branch, "inputs"):
            rotate_input(target, maps[branch.norm] if maps and branch.norm in maps else q)
        for path in branch.width_attrs:
            changed = _set_width(layer, path, dim)
            if changed:
                attributes.setdefault(f"{prefix}.{changed[0]}", {})[changed[1]] = dim


def rotate_writes(layer: nn.Module, group: tuple[Branch, ...], q: torch.Tensor, rotate_normed: bool = True) -> None:
    """The branches of one step write in basis q; a post-normed output is rotated after its norm
    (after the d x d matrix compensation fitted there, when it did)."""
    dtype = next(layer.parameters()).dtype
    for branch in group:
        if not branch.post_norm:
            for target in targets(layer, branch, "outputs"):
                rotate_output(target, q)
        elif rotate_normed:
            fitted = getattr(layer, branch.out_rotation, None)
            rotation = q if fitted is None else fitted.data.to(torch.float64) @ q
            layer.register_parameter(branch.out_rotation, nn.Parameter(rotation.to(dtype)))




def _keep_rows(target: Target, index: torch.Tensor) -> None:
    """Keep rows `index` of a weight that feeds a pruned unit (and of its bias)."""
    put_weight(target, weight_of(target)[index.to(weight_of(target).device)])
    bias = bias_of(target)
    if bias is not None:
        set_parameter(target[0], "bias", bias.data[index.to(bias.device)].contiguous())


def drop_neurons(layer: nn.Module, branch: Branch, kept: torch.Tensor) -> None:
    """Keep only the MLP neurons `kept`: rows (and biases) of the neuron inputs, columns of the output."""
    for target in resolve_all(layer, branch.neurons):
        _keep_rows(target, kept)
    for target in targets(layer, branch, "outputs"):
        put_weight(target, weight_of(target)[:, kept.to(weight_of(target).device)])


def drop_heads(layer: nn.Module, branch: Branch, kept: torch.Tensor) -> tuple[str, int]:
    """Keep only the attention heads whose output-linear columns are `kept` (whole head blocks, the same
    number in each kept group): their query rows, their groups' key and value rows, those columns. The
    query heads per group change, an attribute the forward reads: returns its path and new value."""
    spec = branch.heads
    size = get_path(layer, spec.head_dim)
    groups = weight_of(resolve(layer, spec.key)).shape[-2] // size
    per_group = weight_of(resolve(layer, spec.query)).shape[-2] // size // groups
    heads = sorted(set((kept.cpu() // size).tolist()))
    kept_groups = sorted(set(h // per_group for h in heads))
    if len(heads) % len(kept_groups) or any(sum(h // per_group == g for h in heads) != len(heads) // len(kept_groups)
                                            for g in kept_groups):
        raise SliceGPTError("internal error: pruned heads leave groups of different sizes")

    def rows(units: list[int]) -> torch.Tensor:
        return torch.cat([torch.arange(u * size, (u + 1) * size) for u in units])

    _keep_rows(resolve(layer, spec.query), rows(heads))
    for path in (spec.key, spec.value):
        _keep_rows(resolve(layer, path), rows(kept_groups))
    for target in targets(layer, branch, "outputs"):
        put_weight(target, weight_of(target)[:, rows(heads).to(weight_of(target).device)])
    owner, _, attr = spec.groups.rpartition(".")
    setattr(get_path(layer, owner), attr, len(heads) // len(kept_groups))
    return spec.groups, len(heads) // len(kept_groups)
