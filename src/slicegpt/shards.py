"""Sharded safetensors output, one part at a time, as transformers writes large models.

`model-0000N-of-0000M.safetensors` plus `model.safetensors.index.json` (its `weight_map` names
the file of every tensor). The engine hands each finished part (the embeddings, one decoder
layer, the final norm and head) to `write`, so the sliced model never has to be whole in
memory. Each file is written under a temporary name and renamed, and its SHA-256 recorded.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
from pathlib import Path

import torch

from slicegpt.atomic import write_file
from slicegpt.errors import SliceGPTError
from slicegpt.modeling.runtime import INDEX_NAME
from slicegpt.modeling.runtime import WEIGHTS_NAME as SINGLE_NAME

_DTYPE_BYTES = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U8": 1, "BOOL": 1}


def shard_name(part: int, parts: int) -> str:
    return f"model-{part + 1:05d}-of-{parts:05d}.safetensors"


def sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def write_shard(directory: Path, part: int, parts: int, tensors: dict[str, torch.Tensor]) -> tuple[str, str]:
    """Write one part durably (`atomic.write_file`); returns (file name, SHA-256). A failed write
    (a full disk) ends in one line and leaves no temporary file."""
    from safetensors.torch import save_file

    name = shard_name(part, parts)
    state = {k: v.detach().to("cpu").contiguous() for k, v in tensors.items()}
    needed = sum(t.numel() * t.element_size() for t in state.values())
    write_file(directory / name, lambda tmp: save_file(state, str(tmp), metadata={"format": "pt"}), needed,
               then="run the same command again to resume")
    return name, sha256(directory / name)


def tensor_sizes(path: Path) -> dict[str, tuple[int, int]]:
    """Tensor name -> (elements, bytes) of a safetensors file, from its header alone."""
    from safetensors import safe_open

    sizes = {}
    with safe_open(str(path), framework="pt") as f:
        for key in f.keys():
            sl = f.get_slice(key)
            numel = math.prod(sl.get_shape())
            sizes[key] = (numel, numel * _DTYPE_BYTES.get(sl.get_dtype(), 4))
    return sizes


def write_index(directory: Path, shards: dict[str, str]) -> None:
    """The index transformers reads: every tensor's file, and the total byte size of the tensors."""
    weight_map, total = {}, 0
    for name in sorted(shards):
        for key, (_, size) in tensor_sizes(directory / name).items():
            weight_map[key] = name
            total += size
    text = json.dumps({"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}, indent=2)
    write_file(directory / INDEX_NAME, lambda tmp: tmp.write_text(text), len(text))



def checkpoint_files(directory: Path) -> dict[str, str]:
    """Tensor name -> safetensors file, from the index of a sharded checkpoint or the one file."""
    from safetensors import SafetensorError, safe_open

    index = directory / INDEX_NAME
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (json.JSONDecodeError, KeyError, TypeError) as e:
            raise SliceGPTError(f"{index} is corrupted: {e}") from None
        files = {name: str(directory / shard) for name, shard in weight_map.items()}
        for shard in sorted(set(files.values())):
            if not os.path.isfile(shard):
                raise SliceGPTError(f"{directory} is incomplete: {os.path.basename(shard)} (named by "
                                    f"{INDEX_NAME}) is missing")
            try:
                with safe_open(shard, framework="pt") as f:
                    present = set(f.keys())
            except (SafetensorError, OSError) as e:
                raise SliceGPTError(f"{shard} is corrupted or truncated ({str(e).splitlines()[0]})") from None
            absent = [n for n, s in files.items() if s == shard and n not in present]
            if absent:
                raise SliceGPTError(f"{INDEX_NAME} names tensors that {os.path.basename(shard)} does not hold: "
                                    f"{', '.join(absent[:3])}")
        return files
    single = directory / SINGLE_NAME
    if not single.is_file():
        if list(directory.glob("*.bin")) or list(directory.glob("*.pt")):
            raise SliceGPTError(f"{directory} holds PyTorch pickles, not safetensors; convert it with "
                                "transformers (save_pretrained) first")
        raise SliceGPTError(f"{directory} has no {SINGLE_NAME} or {INDEX_NAME}")
    try:
        with safe_open(str(single), framework="pt") as f:
            return {name: str(single) for name in f.keys()}
    except (SafetensorError, OSError) as e:
        raise SliceGPTError(f"{single} is corrupted or truncated ({str(e).splitlines()[0]})") from None
