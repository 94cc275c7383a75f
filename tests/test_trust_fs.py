"""Files slicegpt may touch, and writes that fail for real: symlinked or foreign run directories,
--force, the source, umask, exchange on publish, full disks, read-only file systems, killed runs.

The storage errors are real ones: a process file-size limit (RLIMIT_FSIZE: EFBIG, any user) and,
where the tests may mount (root), a small tmpfs that fills up (ENOSPC), grows again, or turns
read-only (EROFS).
"""

import hashlib
import json
import os
import stat
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import slicegpt
from conftest import make_model
from slicegpt.atomic import (OUTPUT_MARKER, atomic_directory, atomic_file, publish, refuse_existing,
                             refuse_overlap)
from slicegpt.errors import SliceGPTError
from slicegpt.modeling.runtime import MANIFEST_NAME
from test_cli import assert_one_line_error
from test_streaming import ARGS, TEXT_FILE, _same_output, run_cli

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))
import fault_injection  # noqa: E402


@pytest.fixture(scope="module")
def source(tmp_path_factory):
    from conftest import TEXT
    from slicegpt.testing import train_tokenizer

    path = tmp_path_factory.mktemp("trust") / "dense"
    make_model("llama").save_pretrained(path)
    train_tokenizer(TEXT).save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def whole(source, tmp_path_factory):
    """The uninterrupted run every resumed one must equal (bench/fault_injection.py's per-layer run:
    activations on disk), and its durability points."""
    return fault_injection.reference(source, "per-layer", tmp_path_factory.mktemp("whole"))


def _command(source, out: Path, work: Path) -> list[str]:
    return fault_injection.slice_command(source, out, "per-layer", work)[3:]  # without `python -m slicegpt`


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.lstat().st_mode)


def _leftovers(root: Path) -> list[str]:
    """Temporary files anywhere under `root` (mkstemp/mkdtemp names: a leading dot, .tmp or -tmp)."""
    return [p.name for p in root.rglob("*") if p.name.endswith(".tmp") or ".tmp-" in p.name]


# --- 1. nothing outside the run ---

def _slice(source, out, **extra):
    slicegpt.slice_and_save(source, out, slicing=0.25, neurons="off", calibration=TEXT_FILE, samples=8, seqlen=64,
                            evaluate=False, progress=False, **extra)


def test_a_symlinked_or_foreign_run_directory_is_refused_and_left_alone(source, tmp_path):
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    (elsewhere / "keep.txt").write_text("keep")
    (tmp_path / ".o1.slicegpt-run").symlink_to(elsewhere)
    result = run_cli("slice", source, *ARGS, "--no-eval", "--out", tmp_path / "o1")
    assert_one_line_error(result, r"run directory .*\.o1\.slicegpt-run is a symbolic link")
    assert sorted(p.name for p in elsewhere.iterdir()) == ["keep.txt"] and not (tmp_path / "o1").exists()

    planted = tmp_path / ".o2.slicegpt-run"  # someone else's files where the run directory would be
    planted.mkdir(mode=0o700)
    (planted / "progress.json").write_text("{}")
    with pytest.raises(SliceGPTError, match=r"\.o2\.slicegpt-run was not made by slicegpt"):
        _slice(source, tmp_path / "o2")
    assert (planted / "progress.json").read_text() == "{}"
    planted.chmod(0o777)
    with pytest.raises(SliceGPTError, match=r"\.o2\.slicegpt-run is writable by other users"):
        _slice(source, tmp_path / "o2")
    if os.geteuid() == 0:  # only root can give a directory away
        planted.chmod(0o700)
        os.chown(planted, 65534, 65534)
        with pytest.raises(SliceGPTError, match=r"\.o2\.slicegpt-run belongs to another user"):
            _slice(source, tmp_path / "o2")

    acts, linked = tmp_path / "acts", tmp_path / "linked-acts"
    acts.mkdir()
    linked.mkdir()
    (linked / "keep.txt").write_text("keep")
    digest = hashlib.sha256(str((tmp_path / "o3").resolve()).encode()).hexdigest()[:12]
    (acts / f"slicegpt-{digest}").symlink_to(linked)  # this run's folder, named as the run names it
    with pytest.raises(SliceGPTError, match=r"activation folder .* is a symbolic link"):
        _slice(source, tmp_path / "o3", activations_dir=acts)
    assert sorted(p.name for p in linked.iterdir()) == ["keep.txt"]


def test_force_replaces_only_slicegpt_outputs_and_never_the_source(source, tmp_path):
    assert OUTPUT_MARKER == MANIFEST_NAME
    plain = tmp_path / "plain"
    plain.mkdir()
    (plain / "thesis.tex").write_text("x")
    with pytest.raises(SliceGPTError, match=r"plain is not a slicegpt output \(no slicegpt.json\); --force"):
        refuse_existing(plain, True, "output directory")
    (plain / MANIFEST_NAME).write_text("{}")
    refuse_existing(plain, True)  # a slicegpt output: may be replaced
    with pytest.raises(SliceGPTError, match="already exists; pass --force"):
        refuse_existing(plain, False)
    (tmp_path / "link").symlink_to(plain)
    with pytest.raises(SliceGPTError, match="is a symbolic link"):
        refuse_existing(tmp_path / "link", True)
    notes = tmp_path / "notes.gguf"
    notes.write_text("not a model")
    with pytest.raises(SliceGPTError, match="not a file slicegpt writes"):
        refuse_existing(notes, True, ours=b"GGUF")
    notes.write_bytes(b"GGUF\x03\x00")
    refuse_existing(notes, True, ours=b"GGUF")

    for out, src in [(source, source), (source / "sliced", source), (source.parent, source), (tmp_path / "link", plain)]:
        with pytest.raises(SliceGPTError, match="overlaps the source model"):
            refuse_overlap(out, src)
    refuse_overlap(tmp_path / "elsewhere", source)

    (tmp_path / "m").symlink_to(source)  # the source under another spelling
    assert_one_line_error(run_cli("slice", tmp_path / "m", *ARGS, "--out", source, "--force"),
                          r"overlaps the source model")
    for out in (tmp_path / "m", source / "inside", source.parent):
        with pytest.raises(SliceGPTError, match="overlaps the source model"):
            _slice(tmp_path / "m", out, force=True)
    assert (source / "config.json").is_file() and not (source / "inside").exists()
    with pytest.raises(SliceGPTError, match=r"notes.gguf is not a slicegpt output"):
        _slice(source, notes, force=True)


# --- 2. durable and atomic, umask ---

@pytest.mark.parametrize("mask", [0o022, 0o077])
def test_the_umask_decides_output_permissions(tmp_path, mask):
    old = os.umask(mask)
    try:
        with atomic_directory(tmp_path / "out") as tmp:
            (tmp / "sub").mkdir(mode=0o700)
            (tmp / "sub" / "w.safetensors").write_text("")
            (tmp / "sub" / "w.safetensors").chmod(0o600)  # as safetensors writes them
        with atomic_file(tmp_path / "model.gguf") as tmp:
            tmp.write_bytes(b"GGUF")
    finally:
        os.umask(old)
    assert _mode(tmp_path / "out") == _mode(tmp_path / "out" / "sub") == 0o777 & ~mask
    assert _mode(tmp_path / "out" / "sub" / "w.safetensors") == _mode(tmp_path / "model.gguf") == 0o666 & ~mask


def test_publish_exchanges_so_the_output_is_never_missing(tmp_path):
    out, new = tmp_path / "out", tmp_path / ".out.tmp-x"
    out.mkdir()
    (out / "old.txt").write_text("old")
    new.mkdir()
    (new / "new.txt").write_text("new")
    inode = new.stat().st_ino
    publish(new, out)
    assert out.stat().st_ino == inode  # the new directory itself, swapped in by renameat2
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"] and (out / "new.txt").read_text() == "new"


LIMITED = """
import resource, signal, sys
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # a write past the limit fails with EFBIG instead of killing
resource.setrlimit(resource.RLIMIT_FSIZE, (int(sys.argv[1]), int(sys.argv[1])))
from slicegpt.cli import main
sys.exit(main(sys.argv[2:]))
"""


def test_a_file_size_limit_mid_run_ends_in_one_line_and_the_same_command_resumes(source, whole, tmp_path):
    """A real EFBIG from the kernel (any user): shards are ~120 KB, the first (embeddings) ~77 KB."""
    out = tmp_path / "out"
    args = _command(source, out, tmp_path)
    limited = subprocess.run([sys.executable, "-c", LIMITED, "100000", *args], capture_output=True, text=True,
                             env={**os.environ, "HF_HUB_OFFLINE": "1"}, timeout=600)
    assert_one_line_error(limited, r"cannot write .*model-00002-of-00005.safetensors: file too large.*about "
                                   r"1\d\d\.\d KB needed.*run the same command again to resume")
    run_dir = tmp_path / ".out.slicegpt-run"
    assert (run_dir / "staging" / "model-00001-of-00005.safetensors").is_file()  # the progress so far is kept
    assert _leftovers(tmp_path) == [] and not out.exists()
    again = run_cli(*args)
    assert again.returncode == 0, again.stderr
    _same_output(whole[0], out)


def test_a_full_disk_ends_in_one_line_keeps_progress_and_resumes_once_space_is_free(source, whole, small_disk):
    out = small_disk / "out"
    full = run_cli(*_command(source, out, small_disk))  # activations on the small disk too
    assert_one_line_error(full, rf"cannot write {small_disk}/.*: no space left on device \([\d.]+ (bytes|KB) free on "
                                rf"{small_disk}, about [\d.]+ KB needed\); free some space and run the same command")
    record = json.loads((small_disk / ".out.slicegpt-run" / "progress.json").read_text())
    assert record["next_layer"] >= 1 and _leftovers(small_disk) == [] and not out.exists()
    subprocess.run(["mount", "-o", "remount,size=16m", str(small_disk)], check=True)  # space freed
    again = run_cli(*_command(source, out, small_disk), "--json")
    assert again.returncode == 0, again.stderr
    assert json.loads(again.stdout.splitlines()[-1])["resumed_from_layer"] == record["next_layer"]
    _same_output(whole[0], out)

    info = os.statvfs(small_disk)
    used = (info.f_blocks - info.f_bfree) * info.f_frsize
    subprocess.run(["mount", "-o", f"remount,size={used + 65536}", str(small_disk)], check=True)
    from slicegpt.config import SlicingConfig

    loaded = slicegpt.load(out)
    with pytest.raises(SliceGPTError, match=rf"cannot write .*: no space left on device .* needed"):
        slicegpt.save(loaded.model, loaded.tokenizer, SlicingConfig.from_dict(loaded.sliced["slicing"]),
                      small_disk / "copy")
    assert _leftovers(small_disk) == [] and not (small_disk / "copy").exists()
    subprocess.run(["mount", "-o", "remount,ro", str(small_disk)], check=True)
    assert_one_line_error(run_cli("slice", source, *ARGS, "--no-eval", "--out", small_disk / "other"),
                          r"cannot (write|create) .*read-only file system")


# --- 3. fault injection ---

@pytest.mark.parametrize("kind", ["written model-N-of-N.safetensors", "publish out",
                                  pytest.param("snapshot sliced", marks=pytest.mark.slow)])
def test_killed_at_a_durability_point_the_rerun_resumes_identically(source, whole, tmp_path, kind):
    """Points of bench/fault_injection.py's harness (the script tries many): inside the last shard write
    (the file cut to half its bytes), just before publishing (the staged output complete), while an
    activation snapshot is being made."""
    ref, points = whole
    points = [p.replace(" reference", " out") for p in points]  # the reference run's output is named so
    assert len(points) > 50
    n = [i for i, p in enumerate(points, 1) if p == kind][-1]  # the last: after a progress record (a leftover
    # temporary shard and an unrecorded shard must not reach the output)
    assert fault_injection.try_point(source, "per-layer", n, ref, tmp_path) == ("resumed", "")


def test_a_run_directory_of_another_slicegpt_version_is_refused_naming_restart(tmp_path):
    from slicegpt.core.resume import RunDirectory
    from slicegpt.core.run import Progress

    old = RunDirectory(tmp_path / "out", 5, {"slicegpt": "0.1.0"}, "fingerprint")
    old.write(0, {"w": torch.ones(2)})
    old.checkpoint(Progress("layers", 1, {"basis": torch.eye(2)}), None)
    del old  # its lock is released as a killed run's would be
    with pytest.raises(SliceGPTError, match=r"was made by slicegpt 0\.1\.0 \(this is 0\.2\.0\); pass --restart"):
        RunDirectory(tmp_path / "out", 5, {"slicegpt": "0.2.0"}, "fingerprint")
    RunDirectory(tmp_path / "out", 5, {"slicegpt": "0.2.0"}, "fingerprint", restart=True).remove()
    assert sorted(p.name for p in tmp_path.iterdir()) == []
