"""The calibration activations of one block boundary, held once, on an offload device.

One entry per calibration batch. The engine reads entry i, moves it to the compute device,
and writes its replacement under the same index, so at most one batch is on the compute
device and the boundary is never held twice. `offload="cpu"` keeps entries in memory;
`offload="disk"` keeps each as a file (read back one at a time), so memory does not grow with
the number of calibration samples. The per-layer arguments the family's forward passes
each layer (masks, rotary tables) are kept the same way, each distinct one once per batch.

Files hold no pickle: each is a safetensors file whose header metadata carries the value's
structure as JSON (dicts, lists, tuples, None, bools, numbers, strings; tensors by key), so a
file planted in the directory can change numbers but never run code.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import uuid
from pathlib import Path
from typing import Any

import torch

from slicegpt.atomic import storage_error
from slicegpt.errors import SliceGPTError

OFFLOADS = ("cpu", "disk")


def move(obj: Any, device: torch.device | str) -> Any:
    """`obj` (tensors inside tuples, lists and dicts) on `device`."""
    if isinstance(obj, torch.Tensor):
        return obj.to(device)
    if isinstance(obj, dict):
        return {k: move(v, device) for k, v in obj.items()}
    if isinstance(obj, (tuple, list)):
        return type(obj)(move(v, device) for v in obj)
    return obj


FILE_SUFFIX = ".safetensors"
_FORMAT = "slicegpt-value-1"  # the metadata key naming the structure's format


class Unstorable(TypeError):
    """A value with something other than tensors, containers and JSON scalars: kept in memory."""


def _encode(value: Any, tensors: dict[str, torch.Tensor], seen: dict[int, str]) -> Any:
    """`value` as JSON, its tensors put in `tensors` (one key per tensor object: sharing survives)."""
    if isinstance(value, torch.Tensor):
        if id(value) not in seen:
            t = value.detach().to("cpu").contiguous()
            if any(t.untyped_storage().data_ptr() == o.untyped_storage().data_ptr() for o in tensors.values()):
                t = t.clone()  # safetensors refuses two tensors on one storage
            seen[id(value)] = str(len(tensors))
            tensors[seen[id(value)]] = t
        return {"tensor": seen[id(value)]}
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    if isinstance(value, (list, tuple)):
        return {type(value).__name__: [_encode(v, tensors, seen) for v in value]}
    if isinstance(value, dict) and all(isinstance(k, str) for k in value):
        return {"dict": {k: _encode(v, tensors, seen) for k, v in value.items()}}
    raise Unstorable(f"cannot store a {type(value).__name__} in an activation file")


def _decode(node: Any, tensors: dict[str, torch.Tensor]) -> Any:
    """The value `_encode` described; any other structure fails (KeyError, ValueError, ...), never runs code."""
    if not isinstance(node, dict):
        return node
    (kind, body), = node.items()
    if kind == "tensor":
        return tensors[body]
    if kind == "dict":
        return {k: _decode(v, tensors) for k, v in body.items()}
    return {"list": list, "tuple": tuple}[kind](_decode(v, tensors) for v in body)


def _os_error(e: Exception) -> OSError:
    """safetensors reports a failed write as SafetensorError("... (os error N)"): the OSError it was."""
    found = re.search(r"os error (\d+)", str(e))
    errno = int(found.group(1)) if found else 5
    return OSError(errno, os.strerror(errno))


def save_value(value: Any, path: Path) -> None:
    """Write `value` (tensors in containers) to `path` as safetensors with a JSON structure; OSError on failure.

    Raises `Unstorable` (before writing) for any other type."""
    from safetensors import SafetensorError
    from safetensors.torch import save_file

    tensors: dict[str, torch.Tensor] = {}
    structure = json.dumps(_encode(value, tensors, {}))
    try:
        save_file(tensors, str(path), metadata={_FORMAT: structure})
    except SafetensorError as e:
        raise _os_error(e) from None


def load_value(path: Path) -> Any:
    """What `save_value` wrote to `path`; SliceGPTError names the file if it is not such a file."""
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            structure = json.loads((f.metadata() or {})[_FORMAT])
            tensors = {k: f.get_tensor(k) for k in f.keys()}
        return _decode(structure, tensors)
    except (SafetensorError, OSError, KeyError, ValueError, TypeError, AttributeError, RecursionError) as e:
        raise SliceGPTError(f"{path} is not an activation file of slicegpt ({type(e).__name__})") from None


def _nbytes(value: Any) -> int:
    """Bytes of the tensors in `value` (for a full disk's message)."""
    if isinstance(value, torch.Tensor):
        return value.numel() * value.element_size()
    values = value.values() if isinstance(value, dict) else value if isinstance(value, (tuple, list)) else ()
    return sum(_nbytes(v) for v in values)


def _disk_error(e: OSError, where: Path) -> SliceGPTError:
    return SliceGPTError(f"cannot write calibration activations under {where}: {e.strerror or e}"
                         + (" (the disk is full)" if e.errno == 28 else ""))


class ActivationCache:
    """Per-batch tensors of the current boundary, on CPU memory or in files under `directory`."""

    def __init__(self, offload: str = "cpu", directory: str | os.PathLike | None = None) -> None:
        if offload not in OFFLOADS:
            raise SliceGPTError(f"offload must be one of {', '.join(OFFLOADS)}, got {offload!r}")
        if offload == "disk" and directory is None:
            raise SliceGPTError("activations on disk need a directory (--activations-dir)")
        self.offload = offload
        self.entries: list[Any] = []
        self.directory: Path | None = None
        if offload == "disk":
            self.directory = Path(directory) / f"slicegpt-activations-{uuid.uuid4().hex[:12]}"
            try:
                self.directory.mkdir(parents=True)
            except OSError as e:
                raise _disk_error(e, Path(directory)) from None

    def __len__(self) -> int:
        return len(self.entries)

    def _path(self, index: int, kind: str) -> Path:
        return self.directory / f"{kind}-{index:06d}{FILE_SUFFIX}"

    def _store(self, index: int, value: Any, kind: str) -> Any:
        if self.offload == "cpu":
            return move(value, "cpu")
        path = self._path(index, kind)
        tmp = path.with_name(path.name + ".tmp")
        try:  # a new file, never rewritten in place: a resume snapshot may hold a hard link to the old one
            save_value(value, tmp)
            os.replace(tmp, path)
        except Unstorable:  # a layer argument of a type we do not write (none of the families' today)
            return move(value, "cpu")
        except Exception as e:  # OSError (save_value turns safetensors' errors into one)
            tmp.unlink(missing_ok=True)
            error = storage_error(e, path, _nbytes(value), then="run the same command again to resume")
            if error is None:
                raise
            raise error from None
        return path

    def _fetch(self, entry: Any, device) -> Any:
        if isinstance(entry, Path):
            return move(load_value(entry), device)
        return move(entry, device)

    def append(self, value: torch.Tensor) -> None:
        self.entries.append(self._store(len(self.entries), value, "x"))

    def get(self, index: int, device: torch.device | str) -> torch.Tensor:
        return self._fetch(self.entries[index], device)

    def put(self, index: int, value: torch.Tensor) -> None:
        """Replace entry `index` (the old value is released first on CPU, overwritten on disk)."""
        self.entries[index] = None
        self.entries[index] = self._store(index, value, "x")

    def close(self) -> None:
        self.entries = []
        if self.directory is not None:
            shutil.rmtree(self.directory, ignore_errors=True)

    def __enter__(self) -> "ActivationCache":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


class LayerArguments:
    """What the family's forward passes each decoder layer, per batch, each distinct dict once.

    Layers of one batch usually share one set of arguments (Gemma 2/3 alternate two).
    """

    def __init__(self, cache: ActivationCache) -> None:
        self.cache = cache
        self.per_batch: list[Any] = []  # stored list of distinct dicts
        self.which: list[list[int]] = []  # per batch, per layer: index into its distinct dicts
        self._loaded: tuple[int, list[dict]] | None = None

    def add(self, per_layer: list[dict]) -> None:
        distinct: list[dict] = []
        keys: list[tuple] = []
        which = []
        for kwargs in per_layer:
            key = tuple((k, id(v)) for k, v in kwargs.items())
            if key not in keys:
                keys.append(key)
                distinct.append(kwargs)
            which.append(keys.index(key))
        index = len(self.per_batch)
        self.per_batch.append(self.cache._store(index, distinct, "kwargs"))
        self.which.append(which)

    def get(self, layer: int, batch: int, device) -> dict:
        if self._loaded is None or self._loaded[0] != batch:
            self._loaded = (batch, self.cache._fetch(self.per_batch[batch], device))
        return self._loaded[1][self.which[batch][layer]]
