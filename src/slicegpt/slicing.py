"""Rotate and slice, layer by layer, in one pass over the calibration activations.

For each residual step i (attention, MLP, or parallel branches) the stream entering it is
held sliced, ``z_i = x_i Q_i[:, :k]``. The step runs once on ``z_i Q_i[:, :k]^T`` through its
still unrotated weights, which gives the full-width signal after it,
``x_{i+1} = z_i Q_i^T + branch(z_i Q_i^T)``, exactly the function the sliced model computes
(its norms act on k coordinates with constants rescaled to match). Its covariance gives
Q_{i+1}; then inputs and outputs are rotated, the skip gets ``S_i = Q_i[:, :k]^T Q_{i+1}[:, :k]``,
and ``z_{i+1} = x_{i+1} Q_{i+1}[:, :k]``. Each branch is evaluated once (the paper's code runs
every block twice and keeps every activation); only one boundary's activations are held.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
from torch import nn
from tqdm.auto import tqdm

from slicegpt.adapters import ModelAdapter
from slicegpt.adapters.base import Branch, branch_groups
from slicegpt.errors import SliceGPTError
from slicegpt.invariance import fuse_norms, ties_head, untie_head
from slicegpt.pca import Covariance
from slicegpt.sliced_modeling import ENTRY, attach_structure, get_path, layer_arguments, run_branch, set_parameter
from slicegpt.weights import Target, resolve, resolve_all, rotate_input, rotate_output

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
                         ) -> tuple[list[torch.Tensor], list[list[dict]]]:
    """Run the model's own forward with every decoder layer stubbed out.

    Returns the first layer's input per batch and, per layer and batch, the keyword
    arguments the family's forward gives that layer (masks, rotary embeddings, position
    ids). They differ between layers in some families (Gemma 2/3 alternate sliding-window
    and global attention), so each layer gets its own. The stubs pass the input through,
    so nothing but the embeddings is computed.
    """
    layers = list(get_path(model, adapter.layers))
    inputs: list[torch.Tensor] = []
    kwargs: list[list[dict]] = [[] for _ in layers]

    def stub(index: int):
        def forward(*args, **kw):
            hidden = args[0] if args else kw.pop("hidden_states")
            if index == 0:
                inputs.append(hidden)
            kwargs[index].append(layer_arguments(type(layers[index]), args[1:], kw))
            if index == len(layers) - 1:
                raise _StopForward
            return hidden
        return forward

    for i, layer in enumerate(layers):
        layer.forward = stub(i)
    device = next(model.parameters()).device
    try:
        for input_ids, mask in batches:
            try:
                model(input_ids=input_ids.to(device), attention_mask=mask.to(device), use_cache=False)
            except _StopForward:
                pass
    finally:
        for layer in layers:
            del layer.forward
    return inputs, kwargs


def _targets(layer: nn.Module, branch: Branch, role: str) -> list[Target]:
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
                     slice_head: bool = False, keep_tied_head: bool = True,
                     progress: bool = True) -> SliceOutcome:
    """Turn `model` (in place) into its sliced version with residual width `dim`.

    A head tied to the embeddings stays tied (`keep_tied_head`, when the head is not sliced):
    the embedding table keeps its d columns and the first layer multiplies the stream by
    Q_0[:, :k] (d x k). That is the same function as slicing the embedding columns, and
    costs d*k parameters instead of an untied vocab x d head (the paper's way).
    """
    outcome = SliceOutcome()
    embeddings = [resolve(model, p) for p in adapter.embeddings]
    hidden = getattr(embeddings[0][0], embeddings[0][1]).shape[-1]
    tied = keep_tied_head and not slice_head and not adapter.entry_writers and ties_head(model, adapter)
    fuse_norms(model, adapter, tied_head=tied)
    if not tied:
        untie_head(model, adapter)  # embeddings and head end up in different bases
    dtype = getattr(embeddings[0][0], embeddings[0][1]).dtype

    inputs, kwargs_per_layer = capture_layer_inputs(model, adapter, batches)
    masks = [mask.to(inputs[0].device) for _, mask in batches]
    if tied and adapter.norm_kind == "layernorm":  # the stream's mean, which every LayerNorm drops
        inputs = [x - x.mean(dim=-1, keepdim=True) for x in inputs]

    cov = Covariance(hidden, inputs[0].device)
    for x, m in zip(inputs, masks):
        _check_finite(x, "after the embeddings")
        cov.update(x, m)
    values, q = cov.eigh()
    outcome.spectra.append(values)
    q = q[:, :dim]
    layers = get_path(model, adapter.layers)
    if tied:
        entry = q - q.mean(dim=0, keepdim=True) if adapter.norm_kind == "layernorm" else q  # (I - 11^T/d) Q
        layers[0].register_parameter(ENTRY, nn.Parameter(entry.to(dtype)))
    else:
        for target in embeddings:
            rotate_input(target, q)
        for path in adapter.entry_writers:
            rotate_output(resolve(model, path), q)
    z = [x @ q.to(dtype) for x in inputs]
    del inputs

    structure = adapter.structure(tied_head=tied)
    specs = {b["name"]: b for b in structure["branches"]}
    groups = branch_groups(adapter.branches)
    n_layers = len(layers)
    with tqdm(total=n_layers * len(groups), desc="slicing", unit="step", disable=not progress) as bar:
        for li, layer in enumerate(layers):
            prefix = f"{adapter.layers}.{li}"
            for gi, group in enumerate(groups):
                # The branch runs on the stream as the sliced model will hold it, mapped back to
                # full width (z Q^T), through the still unrotated weights: the same function as
                # the rotated, sliced branch on z, and every kernel sees square shapes.
                q_t = q.T.to(dtype)
                cov = Covariance(hidden, q.device)
                full = []
                for zb, kwargs, m in zip(z, kwargs_per_layer[li], masks):
                    normed: dict = {}
                    x = zb @ q_t
                    h = x
                    for branch in group:
                        h = h + run_branch(layer, specs[branch.name], x, kwargs, normed)
                    _check_finite(h, f"of layer {li} ({'+'.join(b.name for b in group)})")
                    cov.update(h, m)
                    full.append(h)
                del x

                for norm_name in dict.fromkeys(b.norm for b in group):
                    eps = _resize_norm(get_path(layer, norm_name), adapter, dim, hidden)
                    if eps is not None:
                        outcome.module_attributes[f"{prefix}.{norm_name}"] = {adapter.norm_eps_attr: eps}
                for branch in group:
                    for target in _targets(layer, branch, "inputs"):
                        rotate_input(target, q)
                    for path in branch.width_attrs:
                        changed = _set_width(layer, path, dim)
                        if changed:
                            outcome.module_attributes.setdefault(f"{prefix}.{changed[0]}", {})[changed[1]] = dim

                last = li == n_layers - 1 and gi == len(groups) - 1
                if last and not slice_head:
                    q_next = torch.eye(hidden, dtype=torch.float64, device=q.device)
                else:
                    values, q_next = cov.eigh()
                    outcome.spectra.append(values)
                    q_next = q_next[:, :dim]
                layer.register_parameter(group[0].shortcut, nn.Parameter((q.T @ q_next).to(dtype)))
                for branch in group:
                    if not branch.post_norm:
                        for target in _targets(layer, branch, "outputs"):
                            rotate_output(target, q_next)
                    elif not (last and not slice_head):  # the normed output is rotated after the norm
                        layer.register_parameter(branch.out_rotation, nn.Parameter(q_next.to(dtype)))
                q_next_t = q_next.to(dtype)
                z = [x @ q_next_t for x in full]
                del full
                q = q_next
                bar.update()

    if not tied:  # tied: the final norm and head still read the original basis, untouched
        eps = _resize_norm(get_path(model, adapter.final_norm), adapter, q.shape[1], hidden)
        if eps is not None:
            outcome.module_attributes[adapter.final_norm] = {adapter.norm_eps_attr: eps}
        rotate_input(resolve(model, adapter.head), q)
    attach_structure(model, structure)
    model.slicegpt_structure = {"structure": structure, "module_attributes": outcome.module_attributes}
    return outcome
