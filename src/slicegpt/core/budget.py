"""Parameter counts of a sliced model as a function of its widths, before any slicing.

A sliced model's parameter count is ``constant + sum_b a_b k_b (+ sum_s k_s k_{s+1})``: every
reader of boundary b loses columns, every writer loses rows, each norm keeps k_b gains, and
per-layer rotation adds a k_s x k_{s+1} skip matrix per step. The coefficients come from the
dense model's shapes only (a meta skeleton is enough), so `--size` can choose widths
before the first layer is read. Every added matrix is counted: skip, entry and branch-output
rotations, and a head that slicing unties from the embeddings.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

from slicegpt.adapters import ModelAdapter
from slicegpt.adapters.base import branch_groups
from slicegpt.adapters.base import Branch
from slicegpt.core.weights import bias_of, resolve, resolve_all, weight_of
from slicegpt.modeling.runtime import get_path


@dataclass
class ParameterModel:
    """count(widths) = constant + linear . widths (+ products of neighbouring widths, per-layer)."""

    constant: int
    linear: list[int]  # per boundary
    skip: bool  # per-layer rotation: step s adds widths[s] * widths[s + 1]
    fixed: dict[int, int] = field(default_factory=dict)  # boundaries whose width is not free (the exit)
    # MLP neurons (`Branch.neurons`): each one pruned removes neuron_linear . widths + neuron_constant
    neurons: int = 0  # per MLP, dense (0: no family description of neurons)
    neuron_linear: list[int] = field(default_factory=list)
    neuron_constant: int = 0
    # the same per MLP layer: (constant, {boundary: coefficient}), summing to the two above
    neuron_layers: list[tuple[int, dict[int, int]]] = field(default_factory=list)

    def count(self, widths: list[int], neurons: int | list[int] | tuple[int, ...] | None = None) -> int:
        """The parameters at these widths, each MLP keeping `neurons` (one count, or one per layer)."""
        widths = [self.fixed.get(b, w) for b, w in enumerate(widths)]
        total = self.constant + sum(a * w for a, w in zip(self.linear, widths))
        if self.skip:
            total += sum(widths[s] * widths[s + 1] for s in range(len(widths) - 1))
        if isinstance(neurons, (list, tuple)) and self.neurons:
            total -= sum((self.neurons - n) * c for n, c in zip(neurons, self.neuron_costs(widths)))
        elif neurons is not None and self.neurons:
            per_neuron = self.neuron_constant + sum(a * w for a, w in zip(self.neuron_linear, widths))
            total -= (self.neurons - neurons) * per_neuron
        return total

    def neuron_costs(self, widths: list[int]) -> list[int]:
        """Parameters one neuron of each MLP layer holds at these widths."""
        widths = [self.fixed.get(b, w) for b, w in enumerate(widths)]
        return [c + sum(a * widths[b] for b, a in terms.items()) for c, terms in self.neuron_layers]


def _numel(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())  # each shared parameter once


def _per_unit(w: torch.Tensor, hidden: int) -> int:
    return w.numel() // hidden


def parameter_model(model: nn.Module, adapter: ModelAdapter, *, rotation: str, tied: bool, source_tied: bool,
                    slice_head: bool, total: int | None = None, heads: tuple[int, int] | None = None
                    ) -> ParameterModel:
    """The count of `model` sliced with these settings, as a function of the boundary widths.

    `rotation`: "per-layer", "uniform", or "none" (only MLP neurons pruned: the stream keeps
    its width and basis, so a branch-output norm needs no rotation after it). `total` is the
    dense count (each shared parameter once) when `model`'s own tensors do not say it (a meta
    skeleton need not share its tied head). `tied`: the sliced model keeps the head tied to
    the embeddings (per-layer: with an entry matrix; uniform: with the table sliced).
    `source_tied`: the dense model ties them. `heads` (key/value heads, query heads per key/value
    head): every layer keeps that many attention heads (a fixed choice, folded into the terms).
    """
    hidden = get_path(model, adapter.embeddings[0]).weight.shape[-1]
    groups = branch_groups(adapter.branches)
    layers = list(get_path(model, adapter.layers))
    n_steps = len(layers) * len(groups)
    linear = [0] * (n_steps + 1)
    neuron_linear = [0] * (n_steps + 1)
    neuron_constant, neurons = 0, 0
    neuron_layers: list[tuple[int, dict[int, int]]] = []
    constant = _numel(model) if total is None else total
    layernorm = adapter.norm_kind == "layernorm"

    def norm_terms(norm: nn.Module, readers) -> int:
        """Moves the norm's weight to the boundary; a LayerNorm bias folds into reader biases."""
        nonlocal constant
        constant -= norm.weight.numel()
        bias = getattr(norm, "bias", None) if layernorm else None
        if bias is not None:
            constant -= bias.numel()
            for target in readers:
                if bias_of(target) is None:  # folding creates one
                    constant += weight_of(target).shape[-2]
        return 1

    for li, layer in enumerate(layers):
        for gi, group in enumerate(groups):
            s = li * len(groups) + gi
            for name in dict.fromkeys(b.norm for b in group):
                readers = [t for b in adapter.branches if b.norm == name for t in resolve_all(layer, b.inputs)]
                linear[s] += norm_terms(get_path(layer, name), readers)
            for branch in group:
                for target in resolve_all(layer, branch.inputs):
                    w = weight_of(target)
                    constant -= w.numel()
                    linear[s] += _per_unit(w, hidden)
                if branch.post_norm:  # the writer stays d wide
                    if rotation != "none" and not (rotation == "per-layer" and s + 1 == n_steps and not slice_head):
                        linear[s + 1] += hidden  # d x k rotation after the norm (none at the exit)
                else:
                    for target in resolve_all(layer, branch.outputs):
                        w, bias = weight_of(target), bias_of(target)
                        constant -= w.numel()
                        linear[s + 1] += _per_unit(w, hidden)
                        if bias is not None:
                            constant -= bias.numel()
                            linear[s + 1] += 1
                if branch.neurons:  # per neuron: a row of each neuron input, a column of the output
                    neurons = weight_of(resolve_all(layer, branch.outputs)[0]).shape[-1]
                    own_constant, own = 0, {s: 0}
                    if branch.post_norm:
                        own_constant += hidden
                    else:
                        own[s + 1] = 1
                    for target in resolve_all(layer, branch.neurons):
                        own[s] += 1
                        own_constant += int(bias_of(target) is not None)
                    neuron_layers.append((own_constant, own))
                    neuron_constant += own_constant
                    for b, a in own.items():
                        neuron_linear[b] += a
                if heads is not None and branch.heads:
                    constant += _head_terms(layer, branch, heads, hidden, linear, s)

    embeddings = [get_path(model, p).weight for p in adapter.embeddings]
    head = get_path(model, adapter.head).weight
    final = get_path(model, adapter.final_norm)
    fixed: dict[int, int] = {}
    if rotation == "per-layer":
        if tied:
            linear[0] += hidden  # the entry matrix; embeddings, final norm and head unchanged
        else:
            if source_tied:
                constant += head.numel()  # untied: the head is a parameter of its own
            constant += _entry_terms(model, adapter, embeddings, hidden, linear) + _final_bias(model, adapter)
            if slice_head:
                constant -= head.numel() + final.weight.numel()
                linear[n_steps] += _per_unit(head, hidden) + 1  # head columns and the final norm's gains
        if not slice_head:
            fixed[n_steps] = hidden  # the head reads the original basis
        return ParameterModel(constant, linear, skip=True, fixed=fixed, neurons=neurons,
                              neuron_linear=neuron_linear, neuron_constant=neuron_constant,
                              neuron_layers=neuron_layers)

    # uniform: one width everywhere, embeddings and head sliced, no skip matrices ("none": the
    # stream unrotated, its width d everywhere, so branch outputs need no rotation either)
    constant += _entry_terms(model, adapter, embeddings, hidden, linear) + _final_bias(model, adapter)
    constant -= final.weight.numel()
    linear[n_steps] += 1
    if not tied:
        if not source_tied:
            constant -= head.numel()
        linear[n_steps] += _per_unit(head, hidden)
    return ParameterModel(constant, linear, skip=False, neurons=neurons, neuron_linear=neuron_linear,
                          neuron_constant=neuron_constant, neuron_layers=neuron_layers)


def _head_terms(layer: nn.Module, branch: Branch, heads: tuple[int, int], hidden: int, linear: list[int],
                s: int) -> int:
    """Pruned heads take head_dim rows of the query (and, with their group, key and value) linears and
    head_dim columns of the output linear: the step's coefficients shrink; returns the change to the
    constant (biases, and an output linear that stays d wide before a branch-output norm)."""
    spec = branch.heads
    size = get_path(layer, spec.head_dim)
    query, key, value = (resolve(layer, path) for path in (spec.query, spec.key, spec.value))
    kv = weight_of(key).shape[-2] // size
    removed_q = weight_of(query).shape[-2] - heads[0] * heads[1] * size
    removed_kv = (kv - heads[0]) * size
    change = 0
    for target, removed in ((query, removed_q), (key, removed_kv), (value, removed_kv)):
        linear[s] -= removed
        change -= removed if bias_of(target) is not None else 0
    if branch.post_norm:
        change -= removed_q * hidden
    else:
        linear[s + 1] -= removed_q
    return change


def _entry_terms(model: nn.Module, adapter: ModelAdapter, embeddings: list[torch.Tensor], hidden: int,
                 linear: list[int]) -> int:
    """Sliced embedding tables and entry writers (OPT's project_in): boundary 0's terms; returns
    the change to the constant."""
    change = 0
    for w in embeddings:
        change -= w.numel()
        linear[0] += _per_unit(w, hidden)
    for target in resolve_all(model, adapter.entry_writers):
        w, bias = weight_of(target), bias_of(target)
        change -= w.numel() + (bias.numel() if bias is not None else 0)
        linear[0] += _per_unit(w, hidden) + (1 if bias is not None else 0)
    return change


def _final_bias(model: nn.Module, adapter: ModelAdapter) -> int:
    """A final LayerNorm's bias folds into the head's bias (created if the head has none)."""
    final = get_path(model, adapter.final_norm)
    if adapter.norm_kind != "layernorm" or getattr(final, "bias", None) is None:
        return 0
    head = get_path(model, adapter.head)
    return -final.bias.numel() + (head.weight.shape[0] if getattr(head, "bias", None) is None else 0)
