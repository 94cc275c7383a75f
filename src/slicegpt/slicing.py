"""Rotate and slice, layer by layer, in one pass over the calibration activations.

For each residual branch i (attention, MLP, ...) the stream entering it is held sliced,
``z_i = x_i Q_i[:, :k]``. The branch runs once with its input linears already rotated and
its output linears still in the original basis, which gives the full-width signal after
the branch, ``x_{i+1} = z_i Q_i[:, :k]^T + branch(z_i)``, exactly as the sliced model will
see it. Its covariance gives Q_{i+1}; then the output linears are rotated, the skip gets
``S_i = Q_i[:, :k]^T Q_{i+1}[:, :k]``, and ``z_{i+1} = x_{i+1} Q_{i+1}[:, :k]``. Each branch
is evaluated once (the paper's code runs every block twice and keeps every activation);
only one boundary's activations are held at a time.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
from torch import nn
from tqdm.auto import tqdm

from slicegpt.adapters import ModelAdapter
from slicegpt.errors import SliceGPTError
from slicegpt.invariance import fuse_norms, untie_head
from slicegpt.pca import Covariance
from slicegpt.sliced_modeling import attach_structure, get_path, run_branch, set_parameter
from slicegpt.weights import rotate_columns, rotate_rows

Batch = tuple[torch.Tensor, torch.Tensor]  # input_ids [b, L], attention_mask [b, L]


@dataclass
class SliceOutcome:
    """What rotate_and_slice learned, beyond the modified model."""

    spectra: list[torch.Tensor] = field(default_factory=list)  # eigenvalues per boundary
    module_attributes: dict[str, dict[str, float]] = field(default_factory=dict)


class _StopForward(Exception):
    pass


def sliced_dim(hidden_size: int, sparsity: float, round_to: int = 8) -> int:
    """d' = (1 - sparsity) * d, rounded down to a multiple of `round_to` (at least `round_to`)."""
    if not 0.0 <= sparsity < 1.0 or math.isnan(sparsity):
        raise SliceGPTError(f"sparsity must be in [0, 1), got {sparsity}")
    if round_to < 1:
        raise SliceGPTError(f"round_to must be a positive integer, got {round_to}")
    dim = int((1.0 - sparsity) * hidden_size // round_to) * round_to
    return min(hidden_size, max(dim, round_to))


@torch.no_grad()
def capture_layer_inputs(model: nn.Module, adapter: ModelAdapter, batches: list[Batch]
                         ) -> tuple[list[torch.Tensor], list[dict]]:
    """Run the model up to its first decoder layer; return that layer's inputs per batch.

    The keyword arguments (masks, rotary embeddings, position ids) are whatever the family's
    own forward computes, so this works for any layout without knowing it.
    """
    first = get_path(model, adapter.layers)[0]
    inputs: list[torch.Tensor] = []
    kwargs_list: list[dict] = []

    def hook(module, args, kwargs):
        hidden = args[0] if args else kwargs.pop("hidden_states")
        inputs.append(hidden)
        kwargs_list.append(dict(kwargs))
        raise _StopForward

    handle = first.register_forward_pre_hook(hook, with_kwargs=True)
    device = next(model.parameters()).device
    try:
        for input_ids, mask in batches:
            try:
                model(input_ids=input_ids.to(device), attention_mask=mask.to(device), use_cache=False)
            except _StopForward:
                pass
    finally:
        handle.remove()
    return inputs, kwargs_list


def _check_finite(x: torch.Tensor, where: str) -> None:
    if not torch.isfinite(x).all():
        hint = "load it with --dtype float32" if x.dtype in (torch.float16, torch.bfloat16) else "check its weights"
        raise SliceGPTError(
            f"non-finite values (NaN/inf) in the activations {where} on the calibration data "
            f"({str(x.dtype).replace('torch.', '')}); {hint}"
        )


def _resize_norm(norm: nn.Module, adapter: ModelAdapter, dim: int, hidden: int) -> float | None:
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


@torch.no_grad()
def rotate_and_slice(model: nn.Module, adapter: ModelAdapter, batches: list[Batch], dim: int,
                     slice_head: bool = False, progress: bool = True) -> SliceOutcome:
    """Turn `model` (in place) into its sliced version with residual width `dim`."""
    outcome = SliceOutcome()
    embeddings = [get_path(model, p) for p in adapter.embeddings]
    hidden = embeddings[0].weight.shape[1]
    fuse_norms(model, adapter)
    untie_head(model, adapter)  # embeddings and head end up in different bases
    dtype = embeddings[0].weight.dtype

    inputs, kwargs_list = capture_layer_inputs(model, adapter, batches)
    masks = [mask.to(inputs[0].device) for _, mask in batches]

    cov = Covariance(hidden, inputs[0].device)
    for x, m in zip(inputs, masks):
        _check_finite(x, "after the embeddings")
        cov.update(x, m)
    values, q = cov.eigh()
    outcome.spectra.append(values)
    q = q[:, :dim]
    for emb in embeddings:
        rotate_columns(emb, q)
    z = [x @ q.to(dtype) for x in inputs]
    del inputs

    structure = adapter.structure()
    layers = get_path(model, adapter.layers)
    n_layers, n_branches = len(layers), len(adapter.branches)
    with tqdm(total=n_layers * n_branches, desc="slicing", unit="branch", disable=not progress) as bar:
        for li, layer in enumerate(layers):
            for bi, (branch, spec) in enumerate(zip(adapter.branches, structure["branches"])):
                eps = _resize_norm(get_path(layer, branch.norm), adapter, dim, hidden)
                if eps is not None:
                    path = f"{adapter.layers}.{li}.{branch.norm}"
                    outcome.module_attributes[path] = {adapter.norm_eps_attr: eps}
                for name in branch.inputs:
                    rotate_columns(get_path(layer, name), q)

                q_t = q.T.to(dtype)
                cov = Covariance(hidden, q.device)
                full = []
                for zb, kwargs, m in zip(z, kwargs_list, masks):
                    x = zb @ q_t + run_branch(layer, spec, zb, kwargs)
                    _check_finite(x, f"of layer {li} ({branch.name})")
                    cov.update(x, m)
                    full.append(x)

                last = li == n_layers - 1 and bi == n_branches - 1
                if last and not slice_head:
                    q_next = torch.eye(hidden, dtype=torch.float64, device=q.device)
                else:
                    values, q_next = cov.eigh()
                    outcome.spectra.append(values)
                    q_next = q_next[:, :dim]
                shortcut = (q.T @ q_next).to(dtype)
                layer.register_parameter(branch.shortcut, nn.Parameter(shortcut))
                for name in branch.outputs:
                    rotate_rows(get_path(layer, name), q_next)
                q_next_t = q_next.to(dtype)
                z = [x @ q_next_t for x in full]
                del full
                q = q_next
                bar.update()

    final_dim = q.shape[1]
    eps = _resize_norm(get_path(model, adapter.final_norm), adapter, final_dim, hidden)
    if eps is not None:
        outcome.module_attributes[adapter.final_norm] = {adapter.norm_eps_attr: eps}
    rotate_columns(get_path(model, adapter.head), q)
    attach_structure(model, structure)
    model.slicegpt_structure = {"structure": structure, "module_attributes": outcome.module_attributes}
    return outcome
