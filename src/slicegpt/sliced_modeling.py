"""Runtime for sliced models: the skip-connection matrices and loading from a directory.

This file is deliberately self-contained (torch, transformers and safetensors only): `save`
copies it next to the weights as ``modeling_slicegpt.py`` so that

    AutoModelForCausalLM.from_pretrained(dir, trust_remote_code=True)

works without slicegpt installed. The package imports the very same code, so the in-memory
sliced model and a reloaded one run identical forward passes.

A sliced model is the family's own transformers model with smaller weights. Per-layer
rotations (the paper's default) also need a matrix on each skip connection: the residual
``x`` of a branch lives in basis Q_i, the branch writes in basis Q_{i+1}, so the layer computes
``x @ S + branch(x)`` with ``S = Q_i^T Q_{i+1}`` (sliced). Layers get that behaviour by a class
swap to a subclass of their own class, so module names, attributes and the KV-cache path stay
those of the original layer.
"""

from __future__ import annotations

import json
import os
from functools import lru_cache
from typing import Any

import torch
from torch import nn

FORMAT_VERSION = 1
CONFIG_KEY = "slicegpt"
WEIGHTS_NAME = "model.safetensors"


class CheckpointError(ValueError):
    """A sliced-model directory that cannot be loaded (incomplete, corrupt, incompatible)."""


def get_path(root: nn.Module, path: str) -> Any:
    obj: Any = root
    for part in path.split("."):
        obj = getattr(obj, part)
    return obj


class SlicedLayerMixin:
    """Generic decoder-layer forward driven by a structure description (see adapters).

    ``slicegpt_branches`` is a tuple of dicts: norm, module, kind, post_norm, shortcut.
    """

    slicegpt_branches: tuple = ()

    def forward(self, hidden_states: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        if args:
            raise TypeError("sliced decoder layers take every argument but hidden_states by keyword")
        x = hidden_states
        for branch in self.slicegpt_branches:
            h = run_branch(self, branch, x, kwargs)
            shortcut = getattr(self, branch["shortcut"], None)
            x = (x if shortcut is None else x @ shortcut) + h
        return x


def run_branch(layer: nn.Module, branch: dict, x: torch.Tensor, kwargs: dict) -> torch.Tensor:
    """What one residual branch adds to the stream: post_norm(module(norm(x)))."""
    h = get_path(layer, branch["norm"])(x)
    module = get_path(layer, branch["module"])
    if branch["kind"] == "attention":
        h = module(hidden_states=h, **kwargs)
        if isinstance(h, tuple):
            h = h[0]
    else:
        h = module(h)
    if branch.get("post_norm"):
        h = get_path(layer, branch["post_norm"])(h)
    return h


@lru_cache(maxsize=None)
def sliced_layer_class(cls: type) -> type:
    """A subclass of the family's own layer class whose forward applies the shortcuts."""
    if issubclass(cls, SlicedLayerMixin):
        return cls
    return type(f"Sliced{cls.__name__}", (SlicedLayerMixin, cls), {})


def attach_structure(model: nn.Module, structure: dict) -> None:
    """Switch every decoder layer of `model` to the generic sliced forward."""
    branches = tuple(dict(b) for b in structure["branches"])
    for layer in get_path(model, structure["layers"]):
        layer.__class__ = sliced_layer_class(type(layer))
        layer.slicegpt_branches = branches


def set_module_attributes(model: nn.Module, attributes: dict) -> None:
    """Plain attributes that are not in the state dict, such as a norm's epsilon."""
    for path, attrs in attributes.items():
        for attr, value in attrs.items():
            setattr(model.get_submodule(path), attr, value)


def set_parameter(module: nn.Module, name: str, tensor: torch.Tensor) -> None:
    """Replace (or add) a parameter, keeping the shape attributes of stock modules in sync."""
    setattr(module, name, nn.Parameter(tensor, requires_grad=tensor.is_floating_point()))
    if name != "weight":
        return
    if isinstance(module, nn.Linear):
        module.out_features, module.in_features = tensor.shape
    elif isinstance(module, nn.Embedding):
        module.num_embeddings, module.embedding_dim = tensor.shape
    elif isinstance(module, nn.LayerNorm):
        module.normalized_shape = tuple(tensor.shape)


def build_skeleton(config, dtype: torch.dtype | None = None) -> nn.Module:
    """The family's stock causal-LM class built from `config`, without random init."""
    from transformers import AutoModelForCausalLM

    try:
        from transformers.initialization import no_init_weights
    except ImportError:  # older transformers
        from transformers.modeling_utils import no_init_weights

    model_cls = AutoModelForCausalLM._model_mapping[type(config)]
    with no_init_weights():
        model = model_cls(config)
    if dtype is not None:
        model.to(dtype)
    return model


def _read_config(directory: str) -> dict:
    path = os.path.join(directory, "config.json")
    if not os.path.isfile(path):
        raise CheckpointError(f"{directory} is not a sliced model directory: config.json is missing")
    try:
        with open(path) as f:
            return json.load(f)
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{path} is corrupted: {e}") from None


def check_slicing_config(raw: dict, directory: str) -> dict:
    """Return the slicegpt block of a saved config, refusing unknown or missing formats."""
    meta = raw.get(CONFIG_KEY)
    if not isinstance(meta, dict):
        raise CheckpointError(f"{directory} was not written by slicegpt (config.json has no '{CONFIG_KEY}' entry)")
    version = meta.get("format_version")
    if version != FORMAT_VERSION:
        raise CheckpointError(
            f"{directory} uses sliced-model format {version!r}, this code reads format {FORMAT_VERSION}; "
            "re-slice the model or use a matching slicegpt version"
        )
    return meta


def load_sliced_model(directory: str, dtype: torch.dtype | None = None, device: str | None = None,
                      config=None) -> nn.Module:
    """Rebuild a sliced model from a directory written by `slicegpt.save`."""
    from safetensors import SafetensorError, safe_open
    from transformers import AutoConfig

    directory = os.fspath(directory)
    meta = check_slicing_config(_read_config(directory), directory)
    weights = os.path.join(directory, WEIGHTS_NAME)
    if not os.path.isfile(weights):
        raise CheckpointError(f"{directory} is incomplete: {WEIGHTS_NAME} is missing")
    if config is None:
        config = AutoConfig.from_pretrained(directory)
    model = build_skeleton(config)
    attach_structure(model, meta["structure"])
    try:
        with safe_open(weights, framework="pt") as f:
            state = {k: f.get_tensor(k) for k in f.keys()}
    except (SafetensorError, OSError, ValueError) as e:
        raise CheckpointError(f"{weights} is corrupted or truncated: {e}") from None

    expected = dict(model.named_parameters(remove_duplicate=False))
    for name, tensor in state.items():
        prefix, _, leaf = name.rpartition(".")
        try:
            owner = model.get_submodule(prefix) if prefix else model
        except AttributeError:
            raise CheckpointError(f"{weights} does not match its config: unexpected tensor {name}") from None
        current = getattr(owner, leaf, None)
        if current is None or tuple(current.shape) != tuple(tensor.shape) or name not in expected:
            set_parameter(owner, leaf, tensor)
        else:
            current.data = tensor
    if getattr(config, "tie_word_embeddings", False):
        model.tie_weights()
    missing = [n for n in dict(model.named_parameters()) if n not in state]
    layers_path = meta["structure"]["layers"]
    for i, layer in enumerate(get_path(model, layers_path)):  # skip matrices exist only in the file
        for branch in layer.slicegpt_branches:
            if branch.get("shortcut") and getattr(layer, branch["shortcut"], None) is None:
                missing.append(f"{layers_path}.{i}.{branch['shortcut']}")
    if missing:
        raise CheckpointError(f"{weights} is incomplete: missing tensors {missing[:3]}")
    set_module_attributes(model, meta.get("module_attributes", {}))
    model.slicegpt_structure = {"structure": meta["structure"],
                                "module_attributes": meta.get("module_attributes", {})}
    if dtype is not None:
        model.to(dtype)
    if device is not None:
        model.to(device)
    return model.eval()


class SlicedModelForCausalLM:
    """Entry point for ``AutoModelForCausalLM.from_pretrained(dir, trust_remote_code=True)``.

    Returns the family's own model class (e.g. LlamaForCausalLM) carrying the sliced weights.
    """

    @classmethod
    def register_for_auto_class(cls, auto_class: Any = None) -> None:
        """Nothing to register: the returned model is a stock transformers class."""

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path, *args, config=None, **kwargs) -> nn.Module:
        dtype = kwargs.get("dtype", kwargs.get("torch_dtype"))
        if isinstance(dtype, str):
            dtype = None if dtype == "auto" else getattr(torch, dtype)
        device = kwargs.get("device_map")
        return load_sliced_model(pretrained_model_name_or_path, dtype=dtype,
                                 device=device if isinstance(device, str) and device != "auto" else None,
                                 config=config)
