"""Outputs that appear whole or not at all: write into a temporary sibling, then rename into place.

Readers (and a crashed run's next attempt) see the old output or the complete new one, never a
half-written one; the rename also leaves ordinary permissions (mkdtemp/mkstemp make things private).
"""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from slicegpt.errors import SliceGPTError


def refuse_existing(out: Path, force: bool, what: str = "", flag: str = "--force") -> None:
    """The one overwrite rule: an existing output is replaced only when asked; checked before slow work too."""
    if out.exists() and not force:
        raise SliceGPTError(f"{what + ' ' if what else ''}{out} already exists; pass {flag} to overwrite it")


def _readable(tree: Path) -> None:
    """Others may read what we publish: mkdtemp makes 0700 and safetensors writes its files 0600."""
    for path in [tree, *tree.rglob("*")]:
        if not path.is_symlink():
            path.chmod(path.stat().st_mode | (0o755 if path.is_dir() else 0o644))


@contextmanager
def atomic_directory(out: Path, force: bool = False) -> Iterator[Path]:
    """Yield an empty temporary sibling of `out`; on success it replaces `out`, on error it vanishes.

    Readers see either the old directory or the complete new one, never a half-written one.
    """
    refuse_existing(out, force)
    if out.exists() and not out.is_dir():
        raise SliceGPTError(f"output path {out} exists and is not a directory")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    try:
        yield tmp
        publish(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def publish(tmp: Path, out: Path) -> None:
    """Rename the finished directory `tmp` (a sibling of `out`) into place, replacing an old `out`."""
    _readable(tmp)
    if out.exists():
        old = Path(tempfile.mkdtemp(prefix=f".{out.name}.old-", dir=out.parent))
        os.replace(out, old / "dir")
        os.replace(tmp, out)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(tmp, out)


def read_json(path: Path) -> object:
    """A small JSON file, or a one-line SliceGPTError naming it as corrupted."""
    import json

    try:
        return json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise SliceGPTError(f"{path} is corrupted: {e}") from None


def write_json(path: Path, data: dict) -> None:
    """Replace a small JSON file atomically and durably (a crash leaves the old or the new one)."""
    import json

    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w") as f:
        f.write(json.dumps(data, indent=1, sort_keys=True))
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


@contextmanager
def atomic_file(out: Path, force: bool = False) -> Iterator[Path]:
    """Yield a temporary sibling path of `out`; on success it replaces `out` (mode 644), on error it vanishes."""
    refuse_existing(out, force)
    out.parent.mkdir(parents=True, exist_ok=True)
    fd, name = tempfile.mkstemp(prefix=f".{out.name}.tmp-", dir=out.parent)
    os.close(fd)
    tmp = Path(name)
    try:
        yield tmp
        tmp.chmod(0o644)  # mkstemp makes it private
        os.replace(tmp, out)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
