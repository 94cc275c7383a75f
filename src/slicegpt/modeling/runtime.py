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

import inspect
import json
import os
from functools import lru_cache
from typing import Any

import torch
from torch import nn

FORMAT_VERSION = 3  # 2: parallel branches, RMSNorm swaps, post-norm output rotations; 3: uniform rotation
READABLE_VERSIONS = (2, 3)
CONFIG_KEY = "slicegpt"
WEIGHTS_NAME = "model.safetensors"
INDEX_NAME = "model.safetensors.index.json"  # sharded weights: model-0000N-of-0000M.safetensors
MANIFEST_NAME = "slicegpt.json"  # slicing record and checksums, written by slicegpt.save
ENTRY = "entry_rotation"  # on the first layer when the embeddings stay tied to the head, unsliced


def sliced_structure(model: nn.Module) -> dict | None:
    """How a sliced model is built (``{"format_version", "structure", "module_attributes"}``), or None.

    It lives in the model's config, under the key config.json gives it, so the model in memory,
    a reloaded one and the saved file carry the same description.
    """
    meta = getattr(getattr(model, "config", None), CONFIG_KEY, None)
    return meta if isinstance(meta, dict) else None


def record_structure(model: nn.Module, structure: dict, module_attributes: dict) -> None:
    """Attach the structure description to a model just sliced in memory (see `sliced_structure`)."""
    setattr(model.config, CONFIG_KEY, {"format_version": FORMAT_VERSION, "structure": structure,
                                       "module_attributes": module_attributes})


class CheckpointError(ValueError):
    """A sliced-model directory that cannot be loaded (incomplete, corrupt, incompatible)."""


def get_path(root: nn.Module, path: str) -> Any:
    obj: Any = root
    for part in path.split("."):
        obj = getattr(obj, part)
    return obj


class SlicedLayerMixin:
    """Generic decoder-layer forward driven by a structure description (see adapters).

    ``slicegpt_steps`` is a tuple of (shortcut name, branches): the branches of one step
    read the same stream and their outputs are summed (one branch unless parallel).
    """

    slicegpt_branches: tuple = ()
    slicegpt_steps: tuple = ()

    def forward(self, hidden_states: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        if args:  # GPT-2 passes the cache and mask positionally
            kwargs = layer_arguments(type(self), args, kwargs)
        x = hidden_states
        entry = getattr(self, ENTRY, None)
        if entry is not None:  # full-width embeddings -> the first sliced basis
            x = x @ entry
        for shortcut, branches in self.slicegpt_steps:
            normed: dict[str, torch.Tensor] = {}
            h = None
            for branch in branches:
                out = run_branch(self, branch, x, kwargs, normed)
                h = out if h is None else h + out
            skip = getattr(self, shortcut, None) if shortcut else None  # uniform rotation: none
            x = (x if skip is None else x @ skip) + h
        return x


@lru_cache(maxsize=None)
def _layer_parameters(cls: type) -> tuple[inspect.Parameter, ...]:
    """Parameters after (self, hidden_states) of the family's own layer forward."""
    for klass in cls.__mro__:
        if not issubclass(klass, SlicedLayerMixin) and "forward" in vars(klass):
            return tuple(inspect.signature(klass.forward).parameters.values())[2:]
    return ()


def layer_arguments(cls: type, args: tuple, kwargs: dict) -> dict:
    """A decoder-layer call's arguments after hidden_states, all by keyword."""
    named = {}
    for param, value in zip(_layer_parameters(cls), args):
        if param.kind not in (param.POSITIONAL_ONLY, param.POSITIONAL_OR_KEYWORD):
            raise TypeError(f"{cls.__name__} got more positional arguments than it names")
        named[param.name] = value
    return {**named, **kwargs}


def run_branch(layer: nn.Module, branch: dict, x: torch.Tensor, kwargs: dict,
               normed: dict | None = None) -> torch.Tensor:
    """What one residual branch adds to the stream: post_norm(module(norm(x))) [@ rotation]."""
    if normed is not None and branch["norm"] in normed:  # parallel branches sharing one norm
        h = normed[branch["norm"]]
    else:
        h = get_path(layer, branch["norm"])(x)
        if normed is not None:
            normed[branch["norm"]] = h
    module = branch["module"]
    if branch["kind"] == "attention":
        h = get_path(layer, module)(hidden_states=h, **kwargs)
        if isinstance(h, tuple):
            h = h[0]
    else:
        for path in [module] if isinstance(module, str) else module:
            h = get_path(layer, path)(h)
    if branch.get("post_norm"):
        h = get_path(layer, branch["post_norm"])(h)
        rotation = getattr(layer, branch["out_rotation"], None) if branch.get("out_rotation") else None
        if rotation is not None:  # a norm on the branch output runs at full width, then rotate and slice
            h = h @ rotation
    return h


class RMSNorm(nn.Module):
    """The scale-free RMSNorm a LayerNorm becomes once the residual stream is zero-mean."""

    def __init__(self, hidden_size: int, eps: float = 1e-5) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(hidden_size))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = x.float() if x.dtype in (torch.float16, torch.bfloat16) else x
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * h.to(x.dtype)


def swap_rms_norm(root: nn.Module, path: str) -> None:
    """Replace the LayerNorm at `path` with an RMSNorm module of the same size, dtype and device."""
    old = root.get_submodule(path)
    if isinstance(old, RMSNorm):
        return
    reference = next(old.parameters(), None)
    new = RMSNorm(old.normalized_shape[-1], old.eps)
    if reference is not None:
        new = new.to(device=reference.device, dtype=reference.dtype)
    parent, _, leaf = path.rpartition(".")
    setattr(root.get_submodule(parent) if parent else root, leaf, new)


def use_rms_norms(model: nn.Module, structure: dict) -> None:
    """Replace the LayerNorms named by the structure with RMSNorm modules of the same size."""
    spec = structure.get("rms_norms")
    if not spec:
        return
    n_layers = len(get_path(model, structure["layers"]))
    paths = [f"{structure['layers']}.{i}.{name}" for i in range(n_layers) for name in spec["layer"]]
    for path in paths + list(spec["model"]):
        swap_rms_norm(model, path)


@lru_cache(maxsize=None)
def sliced_layer_class(cls: type) -> type:
    """A subclass of the family's own layer class whose forward applies the shortcuts."""
    if issubclass(cls, SlicedLayerMixin):
        return cls
    return type(f"Sliced{cls.__name__}", (SlicedLayerMixin, cls), {})


def layer_steps(branches: tuple[dict, ...]) -> tuple:
    """(shortcut, branches) per residual step: a parallel branch joins the step before it."""
    steps: list[tuple[str, list[dict]]] = []
    for branch in branches:
        if branch.get("parallel") and steps:
            steps[-1][1].append(branch)
        else:
            steps.append((branch["shortcut"], [branch]))
    return tuple((shortcut, tuple(group)) for shortcut, group in steps)


def attach_structure(model: nn.Module, structure: dict) -> None:
    """Switch every decoder layer of `model` to the generic sliced forward (not the family's own layers
    with MLPs of their own widths: they run as they are)."""
    if structure.get("stock"):
        return
    branches = tuple(dict(b) for b in structure["branches"])
    for layer in get_path(model, structure["layers"]):
        layer.__class__ = sliced_layer_class(type(layer))
        layer.slicegpt_branches = branches
        layer.slicegpt_steps = layer_steps(branches)


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
    elif type(module).__name__ == "Conv1D" and hasattr(module, "nf"):  # transformers' GPT-2 linear
        module.nx, module.nf = tensor.shape


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
    if version not in READABLE_VERSIONS:
        raise CheckpointError(
            f"{directory} uses sliced-model format {version!r}, this code reads format {FORMAT_VERSION}; "
            "re-slice the model or use a matching slicegpt version"
        )
    return meta


def _weight_files(directory: str) -> tuple[str, list[str]]:
    """(name for messages, safetensors files): one model.safetensors, or the shards its index names."""
    index = os.path.join(directory, INDEX_NAME)
    if os.path.isfile(index):
        try:
            with open(index) as f:
                shards = sorted(set(json.load(f)["weight_map"].values()))
        except (json.JSONDecodeError, KeyError, TypeError, AttributeError) as e:
            raise CheckpointError(f"{index} is corrupted: {e}") from None
        for shard in shards:
            if not os.path.isfile(os.path.join(directory, shard)):
                raise CheckpointError(f"{directory} is incomplete: {shard} is missing")
        return INDEX_NAME, [os.path.join(directory, shard) for shard in shards]
    weights = os.path.join(directory, WEIGHTS_NAME)
    if not os.path.isfile(weights):
        raise CheckpointError(f"{directory} is incomplete: {WEIGHTS_NAME} is missing")
    return weights, [weights]


def aligned(tensor: torch.Tensor, alignment: int = 64) -> torch.Tensor:
    """`tensor` in memory aligned as torch allocates it: BLAS kernels round differently on the
    unaligned memory a file mapping may give, and a loaded model must compute like the saved one."""
    return tensor.clone() if tensor.data_ptr() % alignment else tensor


def load_sliced_model(directory: str, dtype: torch.dtype | None = None, device: str | None = None,
                      config=None) -> nn.Module:
    """Rebuild a sliced model from a directory written by `slicegpt.save`."""
    from safetensors import SafetensorError, safe_open
    from transformers import AutoConfig

    directory = os.fspath(directory)
    meta = check_slicing_config(_read_config(directory), directory)
    weights, files = _weight_files(directory)
    if config is None:
        config = AutoConfig.from_pretrained(directory)
    model = build_skeleton(config)
    use_rms_norms(model, meta["structure"])
    attach_structure(model, meta["structure"])
    state = {}
    for path in files:
        try:
            with safe_open(path, framework="pt") as f:
                state.update({k: aligned(f.get_tensor(k)) for k in f.keys()})
        except (SafetensorError, OSError, ValueError) as e:
            raise CheckpointError(f"{path} is corrupted or truncated: {e}") from None

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
    if meta["structure"].get("entry_rotation") and getattr(get_path(model, layers_path)[0], ENTRY, None) is None:
        missing.append(f"{layers_path}.0.{ENTRY}")
    for i, layer in enumerate(get_path(model, layers_path)):  # skip matrices exist only in the file
        for shortcut, _ in getattr(layer, "slicegpt_steps", ()):
            if shortcut and getattr(layer, shortcut, None) is None:
                missing.append(f"{layers_path}.{i}.{shortcut}")
    if missing:
        raise CheckpointError(f"{weights} is incomplete: missing tensors {missing[:3]}")
    set_module_attributes(model, meta.get("module_attributes", {}))
    model.config.slicegpt = meta  # already there from config.json; the one description of the structure
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
