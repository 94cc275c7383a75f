"""Rotate and slice, layer by layer, in one pass over the calibration activations.

For each residual step i (attention, MLP, or parallel branches) the stream entering it is
held sliced, ``z_i = x_i Q_i[:, :k]``. The step's readers are rotated and sliced first and it
runs once on ``z_i``, its writers still in the original basis, which gives the full-width
signal after it, ``x_{i+1} = z_i Q_i^T + branch(z_i)``, exactly the function the sliced model
computes (its norms act on k coordinates with constants rescaled to match). Its covariance gives
Q_{i+1}; then inputs and outputs are rotated, the skip gets ``S_i = Q_i[:, :k]^T Q_{i+1}[:, :k]``,
and ``z_{i+1} = x_{i+1} Q_{i+1}[:, :k]``. Each branch is evaluated once (the paper's code runs
every block twice and keeps every activation); only one boundary's activations are held.

With ``rotation="uniform"`` one Q serves every boundary (PCA of the pooled covariance of
the dense stream), so no skip matrices are needed and the result is a stock model of the
same family with hidden size d' (see `standard`).
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
from slicegpt.invariance import fuse_norms, tie_head, ties_head, untie_head
from slicegpt.pca import Covariance
from slicegpt.sliced_modeling import ENTRY, attach_structure, get_path, layer_arguments, run_branch, set_parameter
from slicegpt.weights import Target, resolve, resolve_all, rotate_input, rotate_output

Batch = tuple[torch.Tensor, torch.Tensor]  # input_ids [b, L], attention_mask [b, L]
POOLINGS = ("unit-trace", "tokens")  # how uniform rotation weighs the block boundaries


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


def _rotate_reads(layer: nn.Module, prefix: str, group: tuple[Branch, ...], adapter: ModelAdapter,
                  q: torch.Tensor, hidden: int, outcome: SliceOutcome) -> None:
    """The branches of one step read the stream in basis q (d x k): norms, input linears, widths."""
    dim = q.shape[1]
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


def _rotate_writes(layer: nn.Module, group: tuple[Branch, ...], q: torch.Tensor, rotate_normed: bool = True) -> None:
    """The branches of one step write in basis q; a post-normed output is rotated after its norm."""
    dtype = next(layer.parameters()).dtype
    for branch in group:
        if not branch.post_norm:
            for target in _targets(layer, branch, "outputs"):
                rotate_output(target, q)
        elif rotate_normed:
            layer.register_parameter(branch.out_rotation, nn.Parameter(q.to(dtype)))


@torch.no_grad()
def rotate_and_slice(model: nn.Module, adapter: ModelAdapter, batches: list[Batch], dim: int,
                     slice_head: bool = False, keep_tied_head: bool = True, rotation: str = "per-layer",
                     fit_tied_head: bool = False, pooling: str = "unit-trace", progress: bool = True) -> SliceOutcome:
    """Turn `model` (in place) into its sliced version with residual width `dim`.

    A head tied to the embeddings stays tied (`keep_tied_head`, when the head is not sliced):
    the embedding table keeps its d columns and the first layer multiplies the stream by
    Q_0[:, :k] (d x k). That is the same function as slicing the embedding columns, and
    costs d*k parameters instead of an untied vocab x d head (the paper's way).
    """
    if rotation == "uniform":
        if pooling not in POOLINGS:
            raise SliceGPTError(f"pooling must be one of {', '.join(POOLINGS)}, got {pooling!r}")
        return _slice_uniform(model, adapter, batches, dim, fit_tied_head, pooling == "unit-trace", progress)
    if rotation != "per-layer":
        raise SliceGPTError(f"rotation must be 'per-layer' or 'uniform', got {rotation!r}")
    if fit_tied_head:
        raise SliceGPTError("fitting a tied head's gain applies to --rotation uniform only")
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
                # The branch runs on the stream as the sliced model will hold it: its norms and
                # input linears already read z (d' wide), its outputs still write the original
                # basis, so z Q^T + branch(z) is the full-width signal after the step. MoE
                # kernels write as wide as they read, so there the branch runs on z Q^T through
                # the unrotated weights instead (the same function) and is rotated afterwards.
                on_sliced = not any(b.width_attrs for b in group)
                if on_sliced:
                    _rotate_reads(layer, prefix, group, adapter, q, hidden, outcome)
                q_t = q.T.to(dtype)
                cov = Covariance(hidden, q.device)
                full = []
                for zb, kwargs, m in zip(z, kwargs_per_layer[li], masks):
                    normed: dict = {}
                    x = zb if on_sliced else zb @ q_t
                    h = zb @ q_t if on_sliced else x
                    for branch in group:
                        h = h + run_branch(layer, specs[branch.name], x, kwargs, normed)
                    _check_finite(h, f"of layer {li} ({'+'.join(b.name for b in group)})")
                    cov.update(h, m)
                    full.append(h)
                del x

                if not on_sliced:
                    _rotate_reads(layer, prefix, group, adapter, q, hidden, outcome)

                last = li == n_layers - 1 and gi == len(groups) - 1
                if last and not slice_head:
                    q_next = torch.eye(hidden, dtype=torch.float64, device=q.device)
                else:
                    values, q_next = cov.eigh()
                    outcome.spectra.append(values)
                    q_next = q_next[:, :dim]
                layer.register_parameter(group[0].shortcut, nn.Parameter((q.T @ q_next).to(dtype)))
                _rotate_writes(layer, group, q_next, rotate_normed=not (last and not slice_head))
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


def _pooled_covariance(layers: list[nn.Module], groups: list[tuple[Branch, ...]], specs: dict,
                       inputs: list[torch.Tensor], kwargs_per_layer: list[list[dict]],
                       masks: list[torch.Tensor], progress: bool, unit_trace: bool = True
                       ) -> tuple[torch.Tensor, torch.Tensor]:
    """Covariance of the dense residual stream pooled over every block boundary.

    Each boundary's covariance is scaled to unit trace before pooling: the norms that read
    the stream divide by its RMS, so what matters at each boundary is the *share* of energy
    a direction carries, and the growing later boundaries must not drown the early ones
    (SmolLM2 at 25%: perplexity 76 against 98 unscaled). Gemma 3 270M is the opposite case
    (10%: 72.6 unscaled, 1.3e5 at unit trace), hence `unit_trace=False` ("tokens" pooling);
    bench/uniform_pooling.py measures both.
    Also returns the covariance of the final stream after RMS normalisation (what the final
    norm hands the head), for fitting a tied head's gain.
    """
    hidden = inputs[0].shape[-1]
    pooled = torch.zeros(hidden, hidden, dtype=torch.float64, device=inputs[0].device)

    def add(stream: list[torch.Tensor]) -> None:
        cov = Covariance(hidden, pooled.device)
        for x, m in zip(stream, masks):
            cov.update(x, m)
        matrix = cov.matrix / cov.tokens
        pooled.add_(matrix / matrix.trace() if unit_trace else matrix)

    stream = inputs
    add(stream)
    with tqdm(total=len(layers) * len(groups), desc="pooled PCA", unit="step", disable=not progress) as bar:
        for li, layer in enumerate(layers):
            for group in groups:
                nxt = []
                for x, kwargs in zip(stream, kwargs_per_layer[li]):
                    normed: dict = {}
                    h = x
                    for branch in group:
                        h = h + run_branch(layer, specs[branch.name], x, kwargs, normed)
                    _check_finite(h, f"of layer {li} ({'+'.join(b.name for b in group)})")
                    nxt.append(h)
                stream = nxt
                add(stream)
                bar.update()
    final = Covariance(hidden, pooled.device)
    for x, m in zip(stream, masks):
        x = x.to(torch.float64)
        final.update(x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True)), m)
    return pooled / (len(layers) * len(groups) + 1), final.matrix / final.tokens


def _zero_mean_basis(cov: torch.Tensor, dim: int) -> torch.Tensor:
    """A d x k basis for a zero-mean stream whose k coordinates also sum to zero.

    A stock LayerNorm on the sliced stream subtracts the mean of the k kept coordinates,
    z 1_k / k = x (Q 1_k) / k. Taking the top k-1 principal directions (all orthogonal to
    1_d) plus the signal-free direction 1_d / sqrt(d), and turning that basis with the
    Householder reflection that sends 1_k / sqrt(k) to its last axis, gives Q 1_k ∝ 1_d,
    so every zero-mean x has z 1_k = 0 and the LayerNorm subtracts exactly nothing.
    """
    d = cov.shape[0]
    ones = torch.full((d, 1), d ** -0.5, dtype=torch.float64, device=cov.device)
    centering = torch.eye(d, dtype=torch.float64, device=cov.device) - ones @ ones.T
    values, vectors = torch.linalg.eigh(centering @ cov @ centering)
    top = vectors[:, torch.argsort(values, descending=True)[:dim - 1]]
    basis, r = torch.linalg.qr(torch.cat([ones, top], dim=1))  # exact orthogonality, ones first
    basis = basis * torch.sign(torch.diagonal(r))
    basis = torch.cat([basis[:, 1:], basis[:, :1]], dim=1)
    v = torch.full((dim,), dim ** -0.5, dtype=torch.float64, device=cov.device)
    v[-1] -= 1.0
    if dim > 1:
        householder = torch.eye(dim, dtype=torch.float64, device=cov.device) - 2 * torch.outer(v, v) / (v @ v)
        basis = basis @ householder
    return basis


def _fit_diagonal_gain(q: torch.Tensor, gain: torch.Tensor, normed_cov: torch.Tensor,
                       embeddings: torch.Tensor) -> torch.Tensor:
    """The diagonal D (in the rotated basis) whose tied-head logits best match the exact ones.

    Exact logits are n diag(g) E^T for the normalised final stream n = u Q^T; tied, they are
    u D (E Q)^T. Minimising E||u (Q^T diag(g) - D Q^T) E^T||^2 over diagonal D is a k x k linear
    system with C = Q^T Cov(n) Q and K = Q^T E^T E Q: (C o K^T) d = diag(C Q^T diag(g) E^T E Q).
    """
    e = embeddings.detach()
    gram = torch.zeros(e.shape[1], e.shape[1], dtype=torch.float64, device=q.device)
    for i in range(0, e.shape[0], 4096):
        block = e[i:i + 4096].to(torch.float64)
        gram.addmm_(block.T, block)
    c = q.T @ normed_cov @ q
    k = q.T @ gram @ q
    a = c * k.T
    b = torch.diagonal(c @ (q.T * gain[None, :]) @ gram @ q)
    return torch.linalg.lstsq(a, b.unsqueeze(1)).solution.squeeze(1)


@torch.no_grad()
def _slice_uniform(model: nn.Module, adapter: ModelAdapter, batches: list[Batch], dim: int,
                   fit_tied_head: bool, unit_trace: bool, progress: bool) -> SliceOutcome:
    """One rotation Q for the whole stream: no skip matrices (see `rotate_and_slice`).

    A tied head stays tied exactly when the final norm's gain is uniform; otherwise it is
    untied (its gain folds into it) unless `fit_tied_head` keeps it tied and gives the final
    norm the diagonal of Q^T diag(gain) Q, the least-squares diagonal in the rotated basis
    (in the PCA basis the signal covariance is diagonal, so weighting by it changes nothing).
    """
    outcome = SliceOutcome()
    embeddings = [resolve(model, p) for p in adapter.embeddings]
    hidden = getattr(embeddings[0][0], embeddings[0][1]).shape[-1]
    final_norm = get_path(model, adapter.final_norm)
    final_gain = None
    if fit_tied_head:
        if adapter.norm_kind != "rmsnorm":
            raise SliceGPTError(f"fitting a tied head's gain is for RMSNorm families, not {adapter.family}")
        if not ties_head(model, adapter):
            raise SliceGPTError("this model's head is not tied to its embeddings; there is no tied head to fit")
        final_gain = final_norm.weight.data.to(torch.float64) + adapter.norm_offset
    fuse_norms(model, adapter)  # keeps the head tied only where that stays exact
    final_norm = get_path(model, adapter.final_norm)  # LayerNorm families: now an RMSNorm module
    if final_gain is not None:
        tie_head(model, adapter)
    tied = ties_head(model, adapter)

    inputs, kwargs_per_layer = capture_layer_inputs(model, adapter, batches)
    masks = [mask.to(inputs[0].device) for _, mask in batches]
    layers = list(get_path(model, adapter.layers))
    groups = branch_groups(adapter.branches)
    structure = adapter.structure(rotation="uniform")
    specs = {b["name"]: b for b in structure["branches"]}
    for x in inputs:
        _check_finite(x, "after the embeddings")
    pooled, final_cov = _pooled_covariance(layers, groups, specs, inputs, kwargs_per_layer, masks, progress,
                                           unit_trace)
    del inputs
    values, vectors = torch.linalg.eigh(pooled)
    order = torch.argsort(values, descending=True)
    outcome.spectra.append(values[order])
    q = _zero_mean_basis(pooled, dim) if adapter.norm_kind == "layernorm" else vectors[:, order[:dim]]
    if final_gain is not None:  # needs the embeddings before they are rotated
        fit = _fit_diagonal_gain(q, final_gain, final_cov, get_path(model, adapter.embeddings[0]).weight)

    for target in embeddings:
        rotate_input(target, q)
    for path in adapter.entry_writers:
        rotate_output(resolve(model, path), q)
    for li, layer in enumerate(layers):
        for group in groups:
            _rotate_reads(layer, f"{adapter.layers}.{li}", group, adapter, q, hidden, outcome)
            _rotate_writes(layer, group, q)
    eps = _resize_norm(final_norm, adapter, dim, hidden)
    if eps is not None:
        outcome.module_attributes[adapter.final_norm] = {adapter.norm_eps_attr: eps}
    if final_gain is not None:
        w = final_norm.weight.data
        final_norm.weight.data = ((w.to(torch.float64) + adapter.norm_offset) * fit - adapter.norm_offset).to(w.dtype)
    if tied:
        tie_head(model, adapter)
    else:
        rotate_input(resolve(model, adapter.head), q)
    attach_structure(model, structure)
    model.slicegpt_structure = {"structure": structure, "module_attributes": outcome.module_attributes}
    return outcome
