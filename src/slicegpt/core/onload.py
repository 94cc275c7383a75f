"""Where a model's weights live while it is sliced: one module on the compute device at a time.

A `LayeredModel` wraps a model skeleton whose parameters may sit on the meta device. The
engine asks it to `onload` a submodule (embeddings, one decoder layer, the head) before it
works on it and to `offload` it afterwards. Two kinds:

- `CheckpointModel` reads a transformers safetensors checkpoint (one file or sharded with an
  index) lazily through `safetensors.safe_open`: only the tensors of the module asked for are
  read, so peak memory is one layer, not the model.
- `ResidentModel` wraps a model already in memory (the Python API given a model object):
  onloading moves nothing and offloading keeps the changes, so the model is sliced in place.

Both run the same algorithm; only where the weights come from and go to differs.
"""

from __future__ import annotations

import copy
import hashlib
import os
from pathlib import Path

import torch
from torch import nn

from slicegpt.atomic import read_json
from slicegpt.errors import SliceGPTError
from slicegpt.modeling.runtime import (aligned, attach_structure, get_path, set_module_attributes, set_parameter,
                                      use_rms_norms)

from slicegpt.shards import checkpoint_files


class LayeredModel:
    """A model whose submodules are brought to the compute device one at a time."""

    model: nn.Module
    device: torch.device
    keeps_changes: bool = True  # offloading keeps a module's changed weights (resident models)

    def onload(self, path: str) -> nn.Module:
        raise NotImplementedError

    def offload(self, path: str) -> None:
        raise NotImplementedError

    def original(self, name: str) -> torch.Tensor:
        """A tensor as the source holds it, before any change (for a head untied from changed embeddings)."""
        raise NotImplementedError

    def ties_head(self, head: str, embedding: str) -> bool:
        return getattr(get_path(self.model, head), "weight", None) is get_path(self.model, embedding).weight

    def untie_head(self, adapter) -> None:
        """The head gets its own weight (the source's), so the embeddings may change alone."""
        from slicegpt.core.invariance import untie_head

        untie_head(self.model, adapter)


class ResidentModel(LayeredModel):
    """A model held in memory: changes stay (sliced in place).

    With a `device` other than the model's, each module is moved there when onloaded and back
    when offloaded: the whole model waits in CPU memory, one layer at a time is on the GPU.
    """

    def __init__(self, model: nn.Module, device: str | torch.device | None = None) -> None:
        self.model = model
        self.home = next(model.parameters()).device
        self.dtype = next(model.parameters()).dtype
        self.device = torch.device(device) if device is not None else self.home
        if self.device != self.home:
            _buffers_to(model, self.device)

    def onload(self, path: str) -> nn.Module:
        module = get_path(self.model, path) if path else self.model
        return module.to(self.device) if self.device != self.home else module

    def offload(self, path: str) -> None:
        if self.device != self.home and path:
            get_path(self.model, path).to(self.home)

    def original(self, name: str) -> torch.Tensor:
        return self.model.get_parameter(name).detach().clone().to(self.device)


def _buffers_to(model: nn.Module, device: torch.device) -> None:
    """Buffers (rotary tables, embedding scales) are small: they stay on the compute device."""
    for name, buffer in list(model.named_buffers()):
        owner, _, leaf = name.rpartition(".")
        model.get_submodule(owner)._buffers[leaf] = buffer.to(device)


def eager_experts_for_float64(model: nn.Module, dtype: torch.dtype) -> None:
    """Fused MoE kernels (grouped_mm) have no float64 version: float64 models use the eager loop."""
    if dtype == torch.float64 and hasattr(model, "set_experts_implementation"):
        try:
            model.set_experts_implementation("eager")
        except (ValueError, AttributeError):
            pass


class ConfigModel(LayeredModel):
    """The model a config describes, every weight on the meta device: shapes without reading a file.

    Planning (`slicegpt.plan`) counts parameters and chooses widths from shapes alone, so a dry
    run needs nothing but config.json. A tied head shares its embedding's Parameter, as in the
    loaded model."""

    keeps_changes = False

    def __init__(self, config, dtype: torch.dtype | None = None) -> None:
        self.config, self.device = config, torch.device("meta")
        self.dtype = dtype or checkpoint_dtype(config)
        self.model = skeleton(config, self.dtype)
        self.tied_heads = tied_weights(self.model, config)

    def ties_head(self, head: str, embedding: str) -> bool:
        return self.tied_heads.get(f"{head}.weight") == f"{embedding}.weight"

    def onload(self, path: str) -> nn.Module:
        return get_path(self.model, path) if path else self.model

    def offload(self, path: str) -> None:
        pass

    def original(self, name: str) -> torch.Tensor:
        raise SliceGPTError("internal error: a plan reads no weights")


def skeleton(config, dtype: torch.dtype) -> nn.Module:
    """The causal LM of `config` with parameters on meta (buffers real: rotary tables are computed)."""
    from accelerate import init_empty_weights
    from transformers import AutoModelForCausalLM

    with init_empty_weights(include_buffers=False):
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    eager_experts_for_float64(model, dtype)
    return model.eval()


def tied_weights(model: nn.Module, config) -> dict[str, str]:
    """Head -> embedding names the config ties, each pair made to share one Parameter."""
    tied = getattr(config, "tie_word_embeddings", False) or getattr(
        config.get_text_config(), "tie_word_embeddings", False)
    aliases = dict(getattr(model, "all_tied_weights_keys", None) or {}) if tied else {}
    for head, embedding in aliases.items():
        owner, _, leaf = head.rpartition(".")
        setattr(model.get_submodule(owner), leaf, model.get_parameter(embedding))
    return aliases


class CheckpointModel(LayeredModel):
    """A transformers safetensors checkpoint read one module at a time (meta skeleton + safe_open)."""

    keeps_changes = False

    def __init__(self, directory: str | os.PathLike, dtype: torch.dtype | None = None,
                 device: str | torch.device = "cpu", sliced: dict | None = None) -> None:
        self.directory = Path(directory)
        self.device = torch.device(device)
        steady_allocator()
        config = read_config(self.directory)  # what the model is, before where its weights are
        self.files = checkpoint_files(self.directory)  # tensor name -> file
        self.config = config
        self.dtype = dtype or checkpoint_dtype(config)
        self.model = model = skeleton(config, self.dtype)
        self.sliced = sliced  # the slicegpt block of a sliced model's config: its layer structure
        if sliced is not None:
            use_rms_norms(model, sliced["structure"])
            attach_structure(model, sliced["structure"])
            set_module_attributes(model, sliced.get("module_attributes", {}))
        self._skeleton_names = {n for n, _ in model.named_parameters(remove_duplicate=False)}
        tied = getattr(config, "tie_word_embeddings", False) or getattr(
            config.get_text_config(), "tie_word_embeddings", False)
        self.aliases = dict(getattr(model, "all_tied_weights_keys", None) or {}) if tied else {}
        missing = [n for n, _ in model.named_parameters() if n not in self.files and n not in self.aliases
                   and not (sliced is not None and n.endswith(".bias"))]
        self.targets: dict[str, str] | None = None  # checkpoint key -> module name, where they differ
        if missing and sliced is None:
            self.targets = _conversion_targets(model, self.files)
            found = set(self.targets.values())
            missing = [n for n in missing if n not in found]
        if missing:
            raise SliceGPTError(f"{self.directory} does not hold every weight of its config: "
                                f"{', '.join(missing[:3])} missing from its safetensors files")
        self.tied_heads = dict(self.aliases)  # head -> embedding while they stay tied
        for head, embedding in self.aliases.items():  # share one Parameter, as a loaded model does
            owner, _, leaf = head.rpartition(".")
            setattr(self.model.get_submodule(owner), leaf, self.model.get_parameter(embedding))
        _buffers_to(self.model, self.device)
        self._pristine: dict[str, nn.Module] = {}

    def _read(self, name: str) -> torch.Tensor:
        from safetensors import SafetensorError, safe_open

        key = name if name in self.files else self.aliases.get(name, name)
        path = self.files.get(key)
        if path is None:
            raise SliceGPTError(f"{self.directory}: no tensor {name} in its safetensors files")
        if not os.path.isfile(path):
            raise SliceGPTError(f"{self.directory} is incomplete: {os.path.basename(path)} is missing")
        try:  # opened per read: a mapping kept open would keep every page read so far resident
            with safe_open(path, framework="pt") as handle:
                tensor = handle.get_tensor(key)
        except (SafetensorError, OSError, ValueError, RuntimeError) as e:
            detail = (e.strerror or str(e)) if isinstance(e, OSError) else str(e).splitlines()[0]
            raise SliceGPTError(f"{path} is corrupted or truncated ({detail})") from None
        return aligned(tensor)  # computes like one held in memory

    def original(self, name: str) -> torch.Tensor:
        return self._read(name).to(device=self.device, dtype=self.dtype)

    def ties_head(self, head: str, embedding: str) -> bool:
        """Tied in the source and not untied since (identity is not kept across onloads here)."""
        return self.tied_heads.get(f"{head}.weight") == f"{embedding}.weight"

    def untie_head(self, adapter) -> None:
        from slicegpt.core.invariance import record_tie

        if self.tied_heads.pop(f"{adapter.head}.weight", None) is not None:
            record_tie(self.model, False)

    def onload(self, path: str) -> nn.Module:
        """Read the module's tensors from the files; a sliced checkpoint's shapes and extra matrices
        (skip connections) come from the file, so one reader serves dense and sliced models."""
        module = get_path(self.model, path) if path else self.model
        if path and path not in self._pristine:
            self._pristine[path] = copy.deepcopy(module)
        prefix = f"{path}." if path else ""
        wanted = {prefix + n for n, p in module.named_parameters(remove_duplicate=False) if p.device.type == "meta"}
        if not wanted:
            return module
        if self.targets is not None:
            return self._onload_converted(module, prefix, wanted)
        names = [n for n in self._by_prefix(prefix) if n in wanted or n not in self._skeleton_names]
        names += [n for n in wanted if n not in self.files and n in self.aliases]
        seen: dict[str, nn.Parameter] = {}
        for full in names:
            owner_name, _, leaf = full[len(prefix):].rpartition(".")
            owner = module.get_submodule(owner_name) if owner_name else module
            key = self.aliases.get(full, full) if full not in self.files else full
            if key in seen:  # a tied alias inside this module
                owner._parameters[leaf] = seen[key]
                continue
            tensor = self._read(full).to(device=self.device, dtype=self.dtype)
            current = owner._parameters.get(leaf)
            if current is not None and not self.sliced and tuple(tensor.shape) != tuple(current.shape):
                raise SliceGPTError(f"{os.path.basename(self.files.get(key, key))}: {key} has shape "
                                    f"{tuple(tensor.shape)}, its config says {tuple(current.shape)}")
            set_parameter(owner, leaf, tensor)
            owner._parameters[leaf].requires_grad_(False)
            seen[key] = owner._parameters[leaf]
        left = [n for n, p in module.named_parameters(remove_duplicate=False) if p.device.type == "meta"]
        if left:
            raise SliceGPTError(f"{self.directory}: {prefix}{left[0]} is in no safetensors file")
        return module

    def _onload_converted(self, module: nn.Module, prefix: str, wanted: set[str]) -> nn.Module:
        """A checkpoint whose names differ from the modules' (renamed heads, per-expert MoE weights
        fused on load): transformers' own conversion, given just this module's checkpoint tensors."""
        from transformers.conversion_mapping import get_model_conversion_mapping
        from transformers.core_model_loading import convert_and_load_state_dict_in_model
        from transformers.modeling_utils import LoadStateDictConfig

        tied = {self.aliases[n] for n in wanted if n in self.aliases}
        part = {src: self._read(src) for src, target in self.targets.items()
                if target in wanted or target.startswith(prefix) or target in tied}
        config = LoadStateDictConfig(weight_mapping=get_model_conversion_mapping(self.model), dtype=self.dtype)
        try:
            convert_and_load_state_dict_in_model(self.model, part, config)
        except Exception as e:  # transformers' many error types for tensors that do not fit
            raise SliceGPTError(f"cannot load {prefix.rstrip('.') or 'the model'} from {self.directory}: "
                                f"{str(e).splitlines()[0]}") from None
        for name in wanted & set(self.aliases):  # a tied alias: the embedding just read
            owner, _, leaf = name.rpartition(".")
            self.model.get_submodule(owner)._parameters[leaf] = self.model.get_parameter(self.aliases[name])
        for name, param in list(module.named_parameters(remove_duplicate=False)):
            if param.device.type == "meta":
                raise SliceGPTError(f"{self.directory}: {prefix}{name} is in no safetensors file")
            owner_name, _, leaf = name.rpartition(".")
            owner = module.get_submodule(owner_name) if owner_name else module
            if param.device != self.device or param.dtype != self.dtype or param.requires_grad:
                owner._parameters[leaf] = nn.Parameter(param.data.to(self.device, self.dtype), requires_grad=False)
        return module

    def _by_prefix(self, prefix: str) -> list[str]:
        if not prefix:
            return list(self.files)
        # layers share a prefix pattern ("model.layers.1." vs "model.layers.10."): the dot ends it
        return [n for n in self.files if n.startswith(prefix)]

    def offload(self, path: str) -> None:
        """Put the module back as it was before onloading (meta weights, its original norms and
        no added matrices): the engine has written what it needs, and a later pass reads it again."""
        pristine = self._pristine.get(path)
        if pristine is None:
            return
        parent, _, leaf = path.rpartition(".")
        setattr(get_path(self.model, parent) if parent else self.model, leaf, copy.deepcopy(pristine))
        release_memory()

    def fingerprint(self) -> str:
        """A checksum of the source: its config and every file's safetensors header and size.

        The headers name every tensor with its dtype, shape and byte range; hashing all the
        bytes of a 140 GB checkpoint would take minutes at every start.
        """
        digest = hashlib.sha256((self.directory / "config.json").read_bytes())
        for path in sorted(set(self.files.values())):
            with open(path, "rb") as f:
                head = f.read(8)
                size = int.from_bytes(head, "little") if len(head) == 8 else 0
                digest.update(head + f.read(min(size, 100_000_000)))
            digest.update(str(os.path.getsize(path)).encode())
        return digest.hexdigest()


def _conversion_targets(model: nn.Module, files: dict[str, str]) -> dict[str, str]:
    """Checkpoint key -> the module parameter transformers loads it into (its renames and fusions)."""
    try:
        from transformers.conversion_mapping import get_model_conversion_mapping
        from transformers.core_model_loading import WeightConverter, rename_source_key
    except ImportError:
        return {k: k for k in files}
    mapping = get_model_conversion_mapping(model)
    renamings = [m for m in mapping if not isinstance(m, WeightConverter)]
    converters = [m for m in mapping if isinstance(m, WeightConverter)]
    meta = dict(model.state_dict())
    prefix = getattr(model, "base_model_prefix", None)
    return {k: rename_source_key(k, renamings, converters, prefix, meta)[0] for k in files}


def checkpoint_dtype(config) -> torch.dtype:
    dtype = getattr(config, "dtype", None) or getattr(config, "torch_dtype", None)
    if isinstance(dtype, str):
        dtype = getattr(torch, dtype, None)
    return dtype if isinstance(dtype, torch.dtype) and dtype.is_floating_point else torch.float32


def steady_allocator() -> None:
    """Serve blocks of 4 MiB and more by mmap, always: a freed layer then goes straight back to the
    system instead of fragmenting glibc's heap (which grows the peak by several layers)."""
    if _LIBC is not None and hasattr(_LIBC, "mallopt"):
        _LIBC.mallopt(-3, 4 << 20)  # M_MMAP_THRESHOLD; setting it also stops glibc from raising it


def release_memory() -> None:
    """Hand freed memory back to the system (glibc keeps freed layer-sized blocks in its heap).

    After a large block is freed, glibc raises its mmap threshold, so the next layer's tensors
    come from the heap, which it trims only from the top: without this, the process's memory
    grows by about a layer per layer although every layer is freed.
    """
    if _LIBC is not None:
        _LIBC.malloc_trim(0)


def _libc():
    import ctypes
    import ctypes.util

    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        return libc if hasattr(libc, "malloc_trim") else None
    except OSError:  # not glibc (macOS, musl): nothing to trim
        return None


_LIBC = _libc()

def read_config(directory: Path):
    """The model's config, refusing with one line what transformers would answer with a traceback."""
    from transformers import AutoConfig

    from slicegpt.adapters import require_decoder

    path = directory / "config.json"
    if not path.is_file():
        raise SliceGPTError(f"{directory} has no config.json: it is not a model directory")
    raw = read_json(path)
    if not isinstance(raw, dict) or not raw.get("model_type"):
        raise SliceGPTError(f"{path} has no model_type: cannot tell which architecture the model is "
                            "(add e.g. \"model_type\": \"llama\")")
    try:
        config = AutoConfig.from_pretrained(directory)
    except (ValueError, KeyError, OSError) as e:
        raise SliceGPTError(f"cannot read {path}: {str(e).splitlines()[0]}") from None
    require_decoder(config)
    return config
