"""Atomic outputs: whole or absent, ordinary permissions, nothing left behind on failure."""

import stat

import pytest

from slicegpt.atomic import atomic_directory, atomic_file
from slicegpt.errors import SliceGPTError


def _mode(path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def test_atomic_directory_replaces_whole_and_is_readable_by_others(tmp_path):
    out = tmp_path / "deep" / "out"
    with atomic_directory(out) as tmp:
        (tmp / "a.txt").write_text("first")
        (tmp / "sub").mkdir(mode=0o700)
        (tmp / "sub" / "w.safetensors").write_text("")
        (tmp / "sub" / "w.safetensors").chmod(0o600)  # as safetensors writes them
        assert not out.exists()  # nothing visible until the block succeeds
    assert (out / "a.txt").read_text() == "first" and _mode(out) == 0o755
    assert _mode(out / "sub") == 0o755 and _mode(out / "sub" / "w.safetensors") == 0o644
    with pytest.raises(SliceGPTError, match="already exists; pass --force"):
        with atomic_directory(out):
            pass
    with atomic_directory(out, force=True) as tmp:
        (tmp / "b.txt").write_text("second")
    assert sorted(p.name for p in out.iterdir()) == ["b.txt"]  # replaced, not merged
    assert sorted(p.name for p in out.parent.iterdir()) == ["out"]  # no staging or old copies left


def test_atomic_directory_failure_keeps_the_old_output(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "old.txt").write_text("old")
    with pytest.raises(RuntimeError):
        with atomic_directory(out, force=True) as tmp:
            (tmp / "new.txt").write_text("half")
            raise RuntimeError("crash mid-write")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]
    assert sorted(p.name for p in out.iterdir()) == ["old.txt"]
    (tmp_path / "file").write_text("x")
    with pytest.raises(SliceGPTError, match="exists and is not a directory"):
        with atomic_directory(tmp_path / "file", force=True):
            pass


def test_atomic_file_is_644_and_vanishes_on_error(tmp_path):
    out = tmp_path / "model.gguf"
    with atomic_file(out) as tmp:
        tmp.write_bytes(b"GGUF")
    assert out.read_bytes() == b"GGUF" and _mode(out) == 0o644
    with pytest.raises(KeyboardInterrupt):
        with atomic_file(out, force=True) as tmp:
            tmp.write_bytes(b"partial")
            raise KeyboardInterrupt
    assert out.read_bytes() == b"GGUF" and [p.name for p in tmp_path.iterdir()] == ["model.gguf"]
