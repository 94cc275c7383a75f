"""Save sliced models (loading: `formats.loading`): safetensors weights, stock config, tokenizer, loader code.

A directory is written to a temporary sibling and renamed into place, so an interrupted
save leaves nothing half-written. `slicegpt.json` lists a SHA-256 for every file, so a
truncated or altered directory is refused instead of producing a silently wrong model.
The PCA eigenvalues of every block boundary go beside it (`slicegpt.spectra`), for reports.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Callable

import torch
from torch import nn

from slicegpt.modeling import runtime as sliced_modeling
from slicegpt.atomic import atomic_directory, read_json, refuse_existing
from slicegpt.config import SlicingConfig
from slicegpt.errors import SliceGPTError
from slicegpt.shards import sha256
from slicegpt.version import __version__
from slicegpt.modeling.runtime import (CONFIG_KEY, FORMAT_VERSION, MANIFEST_NAME, READABLE_VERSIONS, WEIGHTS_NAME,
                                              sliced_structure)

CODE_NAME = "modeling_slicegpt.py"
# safetensors bytes (float64, keys boundary.{i}), deliberately not named *.safetensors: vLLM
# loads every top-level *.safetensors file of a directory without an index as weights.
SPECTRA_NAME = "slicegpt.spectra"


def _state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """Persistent tensors, each storage once (a tied head is restored from the config)."""
    seen: set[int] = set()
    state = {}
    for name, tensor in model.state_dict(keep_vars=True).items():
        if id(tensor) in seen:  # a tied parameter (equal bases of two branches may share storage: kept)
            continue
        seen.add(id(tensor))
        state[name] = tensor.detach().contiguous().cpu()
    return state


def sliced_config_dict(model_config, structure: dict, module_attributes: dict) -> dict:
    """config.json of a per-layer sliced model: the family's config, the structure, the loader."""
    config = model_config.to_dict()
    config.pop("quantization_config", None)
    config["auto_map"] = {"AutoModelForCausalLM": f"{CODE_NAME[:-3]}.SlicedModelForCausalLM"}
    config[CONFIG_KEY] = {"format_version": FORMAT_VERSION, "structure": structure,
                          "module_attributes": module_attributes}
    return config


def _save_sliced(model: nn.Module, slicing: dict, tmp: Path) -> None:
    """Weights, config with the slicing structure, and the loader code for trust_remote_code."""
    from safetensors.torch import save_file

    save_file(_state_dict(model), str(tmp / WEIGHTS_NAME), metadata={"format": "pt"})
    write_sliced_config(model.config, getattr(model, "generation_config", None), slicing["structure"],
                        slicing["module_attributes"], tmp)


def write_sliced_config(model_config, generation_config, structure: dict, module_attributes: dict, tmp: Path) -> None:
    """config.json with the slicing structure, generation config, and the loader code for trust_remote_code."""
    config_dict = sliced_config_dict(model_config, structure, module_attributes)
    (tmp / "config.json").write_text(json.dumps(config_dict, indent=2, sort_keys=True))
    if generation_config is not None:
        generation_config.save_pretrained(tmp)
    shutil.copyfile(sliced_modeling.__file__, tmp / CODE_NAME)


def save_spectra(spectra: list[torch.Tensor], path: Path) -> None:
    """Eigenvalues per block boundary as float64 safetensors (`boundary.0` = after the embeddings)."""
    from safetensors.torch import save_file

    tensors = {f"boundary.{i}": v.detach().to("cpu", torch.float64).contiguous() for i, v in enumerate(spectra)}
    save_file(tensors, str(path), metadata={"count": str(len(tensors))})


def load_spectra(directory: str | os.PathLike) -> list[torch.Tensor] | None:
    """The eigenvalues `save` recorded, in boundary order; None for directories written before them.

    The file's checksum is checked against the manifest, like the weights'.
    """
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    directory = Path(directory)
    path = directory / SPECTRA_NAME
    if not path.is_file():
        return None
    digest = read_manifest(directory).get("files", {}).get(SPECTRA_NAME)
    if digest is not None and sha256(path) != digest:
        raise SliceGPTError(f"{directory} is corrupted: {SPECTRA_NAME} does not match its checksum")
    try:
        tensors = load_file(str(path))
    except (SafetensorError, OSError) as e:
        raise SliceGPTError(f"{path} is corrupted: {e}") from None
    count = len(tensors)
    if set(tensors) != {f"boundary.{i}" for i in range(count)}:
        raise SliceGPTError(f"{path} is corrupted: expected keys boundary.0 ... boundary.{count - 1}")
    return [tensors[f"boundary.{i}"] for i in range(count)]


def save(model: nn.Module, tokenizer, config: SlicingConfig, out_dir: str | os.PathLike,
         force: bool = False, extra: dict | None = None,
         fill_extra: Callable[[Path], None] | None = None) -> Path:
    """Write a sliced model directory atomically; refuse to replace one unless `force`.

    A per-layer model is written with its slicing structure and loader code (it loads with
    slicegpt or with trust_remote_code); a standard one (`config.standard`) is written by the
    family's own `save_pretrained` and loads with plain transformers. `fill_extra` may add
    files (a LoRA adapter folder); they are checksummed like the rest.
    """
    out = Path(out_dir)
    refuse_existing(out, force, "output directory", "--force (force=True)")
    slicing = sliced_structure(model)
    if slicing is None and not config.standard:
        raise SliceGPTError("this model was not sliced by slicegpt (no slicing structure attached)")
    needed = sum(t.numel() * t.element_size() for t in model.state_dict().values())  # for a full disk's message
    with atomic_directory(out, force=True, needed=needed) as tmp:  # existence checked above
        if slicing is None:  # a stock model (uniform rotation): the family's own format, nothing else
            model.save_pretrained(tmp)
        else:
            _save_sliced(model, slicing, tmp)
        if fill_extra is not None:
            fill_extra(tmp)
        finish_directory(tmp, tokenizer, config, extra)
    return out


def finish_directory(tmp: Path, tokenizer, config: SlicingConfig, extra: dict | None = None,
                     known: dict[str, str] | None = None) -> None:
    """Tokenizer, spectra and the manifest (the run record, with a SHA-256 for every file).

    `known` holds digests already computed (shards hashed as they were written).
    """
    if tokenizer is not None:
        tokenizer.save_pretrained(tmp)
    if config.spectra:
        save_spectra(config.spectra, tmp / SPECTRA_NAME)
    known = known or {}
    files = {p.relative_to(tmp).as_posix(): known.get(p.relative_to(tmp).as_posix()) or sha256(p)
             for p in sorted(tmp.rglob("*")) if p.is_file()}
    manifest = {"format_version": FORMAT_VERSION, "slicegpt_version": __version__, "slicing": config.to_dict(),
                "files": files, **(extra or {})}
    (tmp / MANIFEST_NAME).write_text(json.dumps(manifest, indent=2))


def read_manifest(directory: str | os.PathLike) -> dict:
    path = Path(directory) / MANIFEST_NAME
    if not path.is_file():
        raise SliceGPTError(f"{directory} is not a complete sliced model: {MANIFEST_NAME} is missing")
    manifest = read_json(path)
    version = manifest.get("format_version")
    if version not in READABLE_VERSIONS:
        raise SliceGPTError(
            f"{directory} was written in sliced-model format {version!r}; this slicegpt reads format "
            f"{FORMAT_VERSION}: re-slice the model or install a matching slicegpt version")
    return manifest


def verify(directory: str | os.PathLike) -> dict:
    """Check every file listed in the manifest is present and unchanged; return the manifest."""
    directory = Path(directory)
    if not directory.is_dir():
        raise SliceGPTError(f"sliced model directory not found: {directory}")
    manifest = read_manifest(directory)
    for name, digest in manifest.get("files", {}).items():
        path = directory / name
        if not path.is_file():
            raise SliceGPTError(f"{directory} is incomplete: {name} is missing")
        if sha256(path) != digest:
            raise SliceGPTError(f"{directory} is corrupted: {name} does not match its checksum")
    return manifest
