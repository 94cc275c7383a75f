"""A run that survives a crash: finished parts on disk, and a progress record after every layer.

The work of `slicegpt slice ... --out OUT` lives in a hidden sibling, ``.OUT.slicegpt-run/``:

- ``staging/``: the output being built; each finished part is a safetensors shard. When the
  run ends it is completed (config, tokenizer, index, manifest) and renamed to OUT in one
  step, so nothing half-written is ever visible at OUT.
- ``progress.json``: replaced atomically (fsync + rename) after every finished layer. It
  names the settings of the run, a fingerprint of the source, the shards written with their
  SHA-256, the state tensors (current basis, running sums) and the activation snapshot, and
  carries a checksum of itself.
- ``state-N.safetensors`` and ``activations-N/``: what the engine needs to continue after
  layer N (float64 basis and sums; the calibration streams at that boundary: the sliced one, and
  with compensation the dense one).

The directory is private (0700) and is used, emptied or resumed only when it is a real directory
of this user's holding the marker ``slicegpt-run`` (or empty): a symbolic link or another user's
directory is refused in one line. Every file a resume depends on is written under a fresh
temporary name, fsynced and renamed, and the directory fsynced (`atomic.write_file`), so the
record names only complete files, after a crash or a power loss. The record's SHA-256 checksum
catches damage, not forgery: nobody else can write into the private directory, so a key would
add nothing.

In a distributed job (`core.distributed`) rank 0 owns the lock, the shards, the state and the
record; every rank snapshots its own share of the activations (``activations-N.rankR/``),
and the record is replaced only once every rank's snapshot is complete, so it never names a
snapshot that a crash left half-written. The directory must be one that every rank reads.

Running the same command again continues from the last finished layer; the computation
after it is the same as in an uninterrupted run, so the output is bit-identical. A record
that does not match the command, or is damaged, is refused with a one-line error naming
`--restart`.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import signal
import tempfile
from pathlib import Path

import torch

from slicegpt.atomic import (fault_point, fsync_path, fsync_tree, private_directory, storage_error, storage_errors,
                             write_file, write_json)
from slicegpt.core.cache import FILE_SUFFIX, ActivationCache, load_value, save_value
from slicegpt.core.compensation import FitRecord
from slicegpt.core.distributed import Ranks
from slicegpt.core.run import Hooks, Progress
from slicegpt.errors import SliceGPTError
from slicegpt.shards import sha256, write_shard

RECORD_VERSION = 3  # 2: one activation snapshot per stream (sliced, dense); 3: snapshots are safetensors, not pickles
PROGRESS_NAME = "progress.json"
RUN_MARKER = "slicegpt-run"  # marks a directory slicegpt made for a run (see `atomic.private_directory`)
RESUME = "run the same command again to resume"
KILL_SWITCH = "SLICEGPT_TEST_KILL_AFTER_LAYER"  # tests: SIGKILL the process after this many layers
KILL_RANK = "SLICEGPT_TEST_KILL_RANK"  # tests: only this rank of a distributed job kills itself
KILL_SIGNAL = "SLICEGPT_TEST_KILL_SIGNAL"  # tests: STOP instead of KILL (a rank that hangs)


def run_directory(out: Path) -> Path:
    return out.parent / f".{out.name}.slicegpt-run"


def _checksum(record: dict) -> str:
    body = {k: v for k, v in record.items() if k != "checksum"}
    return hashlib.sha256(json.dumps(body, sort_keys=True).encode()).hexdigest()


class RunDirectory(Hooks):
    """The engine's hooks for a run written to disk: shards as they finish, checkpoints, resume."""

    def __init__(self, out: Path, parts: int, settings: dict, fingerprint: str, restart: bool = False,
                 checkpoint_every: int = 1, ranks: Ranks | None = None) -> None:
        self.ranks = ranks or Ranks()
        self.out = Path(out)
        self.root = run_directory(self.out)
        self.staging = self.root / "staging"
        self.parts = parts
        self.settings = settings
        self.fingerprint = fingerprint
        self.every = max(1, checkpoint_every)
        self.shards: dict[str, str] = {}
        self.record: dict | None = None
        self.checkpoints = 0
        self._lock = None
        self.record = self.ranks.on_writer(lambda: self._open(restart))
        self.ranks.check_shared(self.root)
        if self.record is not None:
            self.shards = dict(self.record["shards"])

    def _open(self, restart: bool) -> dict | None:
        """Rank 0: take the lock, keep a valid record (or clear what is left), make the staging folder."""
        self._lock = self._take_lock()
        if restart:
            _clear(self.root)
        record = self._read_record()
        if record is None:
            _clear(self.root)  # a run that died before its first record: nothing to keep
        subfolder(self.staging)
        if record is not None:
            self._tidy(record)
        return record

    def _tidy(self, record: dict) -> None:
        """Drop what a killed run wrote after its record: temporary files (their names start with a
        dot), and in the staged output everything but the record's shards (unrecorded shards; the
        configs, tokenizer and manifest of a run killed while publishing are written again)."""
        for folder in (self.root, self.root / "exact"):
            for path in folder.glob(".*"):
                _remove(path)
        for path in self.staging.iterdir():
            if path.name not in record["shards"]:
                _remove(path)

    def _take_lock(self):
        """One run per output at a time (the kernel drops the lock of a killed process)."""
        import fcntl

        private_directory(self.root, RUN_MARKER, "run directory")  # a symlink or another's directory: refused
        with storage_errors(self.root, then=RESUME):
            handle = os.fdopen(os.open(self.root / "lock", os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_NOFOLLOW,
                                       0o600), "a")
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            handle.close()
            raise SliceGPTError(f"another slicegpt run is writing {self.out} (it holds {self.root / 'lock'}); "
                                "wait for it to finish or stop it") from None
        return handle

    @property
    def resuming(self) -> bool:
        return self.record is not None

    def _refuse(self, why: str) -> SliceGPTError:
        return SliceGPTError(f"the interrupted run in {self.root} {why}; pass --restart to start over "
                             f"(or remove {self.root})")

    def _read_record(self) -> dict | None:
        path = self.root / PROGRESS_NAME
        if not path.is_file():
            return None
        try:
            record = json.loads(path.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError, OSError):
            raise self._refuse("has a damaged progress record (not valid JSON)") from None
        if not isinstance(record, dict) or record.get("checksum") != _checksum(record):
            raise self._refuse("has a damaged progress record (checksum mismatch)")
        if record.get("version") != RECORD_VERSION:
            raise self._refuse(f"was written by another slicegpt version (record {record.get('version')!r})")
        made_by, this = record.get("settings", {}).get("slicegpt"), self.settings.get("slicegpt")
        if made_by != this:  # other code would continue another algorithm's half-made model
            raise self._refuse(f"was made by slicegpt {made_by} (this is {this})")
        if record.get("fingerprint") != self.fingerprint:
            raise self._refuse("sliced another model (the source's fingerprint differs)")
        if record.get("settings") != self.settings:
            old, new = record.get("settings", {}), self.settings
            diff = sorted(k for k in set(old) | set(new) if old.get(k) != new.get(k))
            raise self._refuse(f"used other settings ({', '.join(diff)} differ)")
        for name, digest in record["shards"].items():
            path = self.staging / name
            if not path.is_file() or sha256(path) != digest:
                raise self._refuse(f"is damaged: its finished shard {name} is missing or changed")
        state = self.root / record["state"]
        if not state.is_file() or sha256(state) != record["state_sha256"]:
            raise self._refuse("is damaged: its state file is missing or changed")
        return record

    # --- Hooks ---

    def write(self, part: int, tensors: dict[str, torch.Tensor]) -> None:
        if not self.ranks.writer:  # every rank holds the same finished part; rank 0 writes it
            return
        name, digest = write_shard(self.staging, part, self.parts, tensors)
        self.shards[name] = digest

    def _activations(self, name: str) -> Path:
        """This rank's snapshot folder for the record's activation name."""
        return self.root / (name if not self.ranks.distributed else f"{name}.rank{self.ranks.rank}")

    def checkpoint(self, progress: Progress, streams: dict[str, ActivationCache] | None) -> None:
        self.checkpoints += 1
        final = progress.phase == "weights" and not streams  # no activations to snapshot: cheap, always recorded
        if not final and self.checkpoints % self.every:
            return
        n = f"{progress.phase}-{progress.next_layer}"
        try:
            activations = self._snapshot(streams, n) if streams else None
            failed = ""
        except Exception as e:  # a full disk: OSError, or torch.save's RuntimeError
            error = e if isinstance(e, SliceGPTError) else storage_error(e, self.root, _bytes(streams), RESUME)
            if error is None:
                raise
            failed = str(error)
        failed = next((f for f in self.ranks.gather(failed) if f), "")  # every snapshot is complete, or none counts
        if failed:
            raise SliceGPTError(failed, shared=True)
        old = self.record
        self.record = self.ranks.on_writer(lambda: self._record(progress, n, activations))
        if old is not None and old.get("activations") and old["activations"] != activations:
            shutil.rmtree(self._activations(old["activations"]), ignore_errors=True)  # superseded
        fault_point(f"checkpoint {progress.phase}")
        kill = os.environ.get(KILL_SWITCH, "")  # "k" (first phase to reach layer k) or "phase:k"
        if kill and kill in (str(progress.next_layer), f"{progress.phase}:{progress.next_layer}") and \
                os.environ.get(KILL_RANK, str(self.ranks.rank)) == str(self.ranks.rank):
            os.kill(os.getpid(), getattr(signal, "SIG" + os.environ.get(KILL_SIGNAL, "KILL")))

    def _record(self, progress: Progress, n: str, activations: str | None) -> dict:
        """Rank 0: the state file and the progress record that names it, replacing the previous ones."""
        from safetensors.torch import save_file

        tensors = {f"tensor.{k}": v.detach().to("cpu", torch.float64).contiguous() for k, v in progress.tensors.items()}
        tensors.update({f"spectrum.{i}": v.detach().to("cpu", torch.float64).contiguous()
                        for i, v in enumerate(progress.spectra)})
        state = self.root / f"state-{n}.safetensors"
        needed = sum(t.numel() * t.element_size() for t in tensors.values())
        write_file(state, lambda tmp: save_file(tensors, str(tmp)), needed, then=RESUME)
        old = self.record
        record = {"version": RECORD_VERSION, "settings": self.settings, "fingerprint": self.fingerprint,
                  "phase": progress.phase, "next_layer": progress.next_layer, "shards": dict(self.shards),
                  "state": state.name, "state_sha256": sha256(state), "tensors": sorted(progress.tensors),
                  "spectra": len(progress.spectra), "module_attributes": progress.module_attributes,
                  "fits": [f.to_dict() for f in progress.fits],
                  "activations": activations}
        record["checksum"] = _checksum(record)
        write_json(self.root / PROGRESS_NAME, record)
        if old is not None and old["state"] != record["state"]:  # the previous checkpoint is superseded
            (self.root / old["state"]).unlink(missing_ok=True)
        return record

    def _snapshot(self, streams: dict[str, ActivationCache], n: str) -> str:
        """This rank's calibration streams at this boundary, one file per stream and batch,
        ``x-<stream>-<batch>.safetensors`` (hard links for disk offload)."""
        name = f"activations-{n}"
        target = self._activations(name)
        tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.", suffix=".tmp", dir=self.root))
        try:
            for stream, cache in streams.items():
                for i, entry in enumerate(cache.entries):
                    _save_entry(entry, tmp / f"x-{stream}-{i:06d}{FILE_SUFFIX}")
                    fault_point(f"snapshot {stream}", partial=tmp / f"x-{stream}-{i:06d}{FILE_SUFFIX}")
            fsync_tree(tmp)
            fault_point("snapshot synced")
            shutil.rmtree(target, ignore_errors=True)
            os.replace(tmp, target)
            fault_point("snapshot renamed")
            fsync_path(self.root)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        return name

    def resume(self) -> tuple[Progress, dict[str, list] | None] | None:
        if self.record is None:
            return None
        from safetensors.torch import load_file

        record = self.record
        state = load_file(str(self.root / record["state"]))
        tensors = {k: state[f"tensor.{k}"] for k in record["tensors"]}
        spectra = [state[f"spectrum.{i}"] for i in range(record["spectra"])]
        progress = Progress(record["phase"], record["next_layer"], tensors, spectra,
                            record["module_attributes"], [FitRecord(**f) for f in record.get("fits", [])])
        activations = None
        if record.get("activations"):
            directory = self._activations(record["activations"])
            missing = self.ranks.gather(not directory.is_dir())
            if any(missing):
                raise SliceGPTError(f"the interrupted run in {self.root} is damaged: the activation snapshot of rank "
                                    f"{missing.index(True)} is missing; pass --restart to start over", shared=True)
            activations = {}  # per stream, its batches in order
            for path in sorted(directory.glob(f"x-*-*{FILE_SUFFIX}")):
                activations.setdefault(path.name[2:].rpartition("-")[0], []).append(_LazyTensor(path))
        return progress, activations

    def remove(self) -> None:
        """The finished run's directory (rank 0, once every rank is done with it)."""
        self.ranks.barrier()
        if self.ranks.writer:
            shutil.rmtree(self.root, ignore_errors=True)
            self._lock.close()


def _save_entry(entry, path: Path) -> None:
    """One cached batch as a snapshot file: a hard link to a disk entry (the cache replaces files, never
    rewrites them in place), or a copy."""
    if isinstance(entry, Path):
        try:
            os.link(entry, path)
        except OSError:
            shutil.copyfile(entry, path)
    else:
        save_value(entry, path)


def _bytes(streams: dict[str, ActivationCache] | None) -> int | None:
    """The bytes of a snapshot's tensors held in memory (disk entries are hard links: no new bytes)."""
    tensors = [e for cache in (streams or {}).values() for e in cache.entries if isinstance(e, torch.Tensor)]
    return sum(t.numel() * t.element_size() for t in tensors) or None


def subfolder(path: Path) -> None:
    """A folder of the (verified, private) run directory: made private, or a real directory already."""
    with storage_errors(path, then=RESUME):
        path.mkdir(mode=0o700, exist_ok=True)
    if path.is_symlink() or not path.is_dir():
        raise SliceGPTError(f"{path} is not a directory slicegpt made; pass --restart to start over")


def _remove(path: Path) -> None:
    shutil.rmtree(path) if path.is_dir() and not path.is_symlink() else path.unlink()


def _clear(root: Path) -> None:
    """Everything of an old run but the lock this run holds and the marker."""
    for path in root.iterdir():
        if path.name not in ("lock", RUN_MARKER):
            _remove(path)


class _LazyTensor:
    """A snapshot file the activation cache reads when it is first needed."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def load(self) -> torch.Tensor:
        """The tensor; a file that is not one (damaged, or planted: it is never unpickled) is refused."""
        try:
            value = load_value(self.path)
        except SliceGPTError:
            value = None
        if not isinstance(value, torch.Tensor):
            raise SliceGPTError(f"the interrupted run's activation snapshot {self.path} is damaged (not a "
                                "slicegpt activation file); pass --restart to start over")
        return value
