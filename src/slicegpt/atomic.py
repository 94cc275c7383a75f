"""Outputs that appear whole or not at all, durably, and only where slicegpt may write.

Every file is written under an unpredictable temporary name (mkstemp/mkdtemp) beside its final
name, fsynced, renamed into place, and its directory fsynced: readers, a crashed run's next
attempt and a machine that lost power see the old file or the complete new one. A directory that
replaces another is exchanged with it in one step (Linux renameat2), so the old one is never
missing. Published outputs get the permissions the user's umask gives; working directories are
private (0700) and are used only after checking that this user made them. A full disk, a
read-only file system or an I/O error becomes one `SliceGPTError` line naming the path, the free
space and the bytes needed (`storage_errors`).

Tests kill the process at the "durability points" marked with `fault_point` (FAULTS_LOG, FAULT_AT).
"""

from __future__ import annotations

import errno
import os
import re
import shutil
import signal
import stat
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Callable

from slicegpt.errors import SliceGPTError

OUTPUT_MARKER = "slicegpt.json"  # modeling.runtime.MANIFEST_NAME (not imported here: that loads torch)
FAULTS_LOG = "SLICEGPT_TEST_FAULTS"  # tests: append the name of every durability point to this file
FAULT_AT = "SLICEGPT_TEST_FAULT_AT"  # tests: SIGKILL the process at the Nth point (counted in FAULTS_LOG)
_FAULT_RECORD = 64  # bytes per logged point: the log's size counts the points, no state in the process
STORAGE_ERRNOS = {errno.ENOSPC: "no space left on device", errno.EDQUOT: "disk quota exceeded",
                  errno.EFBIG: "file too large for this file system or the process's file size limit",
                  errno.EROFS: "read-only file system", errno.EACCES: "permission denied",
                  errno.EPERM: "operation not permitted", errno.EIO: "input/output error"}


# --- test fault injection ---

def fault_point(name: str, partial: Path | None = None) -> None:
    """A durability point: logged when FAULTS_LOG is set; the FAULT_AT-th one kills the process.

    `partial`: a file being written here; a kill cuts it to half its bytes first (a torn write).
    """
    log = os.environ.get(FAULTS_LOG)
    if not log:
        return
    fd = os.open(log, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
    try:
        os.write(fd, (name[:_FAULT_RECORD - 1].ljust(_FAULT_RECORD - 1) + "\n").encode())
        count = os.fstat(fd).st_size // _FAULT_RECORD
    finally:
        os.close(fd)
    if str(count) != os.environ.get(FAULT_AT):
        return
    if partial is not None and partial.is_file():
        os.truncate(partial, partial.stat().st_size // 2)
    os.kill(os.getpid(), signal.SIGKILL)


def _point(what: str, path: Path) -> str:
    """A point's name: the step and the kind of file (digits dropped, so runs of any size compare)."""
    return f"{what} {re.sub(r'[0-9]+', 'N', path.name)}"


# --- permissions ---

def umask() -> int:
    """The process's umask, read without changing it where Linux reports it."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except OSError:
        pass
    mask = os.umask(0o022)  # elsewhere: set and restore (not thread-safe, but only at publishing)
    os.umask(mask)
    return mask


def apply_umask(tree: Path) -> None:
    """Give a published tree the modes a plain mkdir/open would have (mkdtemp/mkstemp make them private)."""
    mask = umask()
    for path in [tree, *tree.rglob("*")]:
        if not path.is_symlink():
            path.chmod((0o777 if path.is_dir() else 0o666) & ~mask)


# --- durability ---

def fsync_path(path: Path) -> None:
    """Flush a file's or a directory's contents (a directory: the names renamed into it) to the disk."""
    fd = os.open(path, os.O_RDONLY | (os.O_DIRECTORY if path.is_dir() else 0))
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_tree(tree: Path) -> None:
    """Every file and directory of a tree, deepest first, so a renamed tree is whole after power loss."""
    for path in sorted(tree.rglob("*"), key=lambda p: -len(p.parts)):
        if not path.is_symlink():
            fsync_path(path)
    fsync_path(tree)


# --- storage errors ---

def _size(n: float) -> str:
    for unit in ("bytes", "KB", "MB", "GB", "TB"):
        if n < 1000 or unit == "TB":
            return f"{n:.0f} {unit}" if unit == "bytes" else f"{n:.1f} {unit}"
        n /= 1000
    return ""


def _mount_point(path: Path) -> Path:
    path = Path(os.path.abspath(path))
    while not path.exists():
        path = path.parent
    while path != path.parent and path.parent.stat().st_dev == path.stat().st_dev:
        path = path.parent
    return path


def _free(path: Path) -> int | None:
    try:
        target = _mount_point(path)
        info = os.statvfs(target)
        return info.f_bavail * info.f_frsize
    except OSError:
        return None


def _storage_errno(e: BaseException) -> int | None:
    """The errno of a failed write, from an OSError, safetensors' message or torch.save's; None if not one."""
    if isinstance(e, OSError):
        return e.errno if e.errno in STORAGE_ERRNOS else None
    name = type(e).__name__
    text = str(e)
    if name == "SafetensorError":
        found = re.search(r"os error (\d+)", text)
        return int(found.group(1)) if found else (errno.EIO if "I/O error" in text else None)
    if isinstance(e, RuntimeError) and ("inline_container" in text or "PytorchStreamWriter" in text):
        found = re.search(r"strerror: (.+)$", text.strip())  # torch.save names the error only when opening
        known = {os.strerror(n): n for n in STORAGE_ERRNOS}
        return known.get(found.group(1).strip(), errno.EIO) if found else errno.EIO
    return None


def storage_error(e: BaseException, path: Path, needed: int | None = None,
                  then: str = "run the same command again") -> SliceGPTError | None:
    """One line for a failed write to `path` (what failed, the file system, free and needed bytes); None
    when `e` is no write failure."""
    code = _storage_errno(e)
    if code is None:
        return None
    filename = getattr(e, "filename", None)
    if isinstance(e, OSError) and filename and not os.path.abspath(filename).startswith(
            os.path.abspath(_mount_point(path))):
        return None  # a file elsewhere (a source being read), not this write
    if isinstance(e, OSError) and filename:
        path = Path(filename)  # the very file that failed
    free = _free(path)
    if code == errno.EIO and free is not None and needed is not None and free < needed:
        code = errno.ENOSPC  # torch.save only says a write came up short
    why = STORAGE_ERRNOS[code]
    room = ""
    if code in (errno.ENOSPC, errno.EDQUOT, errno.EFBIG, errno.EIO):
        parts = [f"{_size(free)} free on {_mount_point(path)}" if free is not None else "",
                 f"about {_size(needed)} needed" if needed else ""]
        room = f" ({', '.join(p for p in parts if p)})" if any(parts) else ""
    fix = {errno.EROFS: "write elsewhere or remount it writable", errno.EACCES: "fix the permissions",
           errno.EPERM: "fix the permissions", errno.EIO: "check the disk"}.get(code, "free some space")
    return SliceGPTError(f"cannot write {path}: {why}{room}; {fix} and {then}")


@contextmanager
def storage_errors(path: Path, needed: int | None = None, then: str = "run the same command again") -> Iterator[None]:
    """Turn a failed write under `path` (full disk, read-only, I/O error: OSError, SafetensorError,
    torch.save's RuntimeError) into one SliceGPTError line; other exceptions pass unchanged."""
    try:
        yield
    except SliceGPTError:
        raise
    except Exception as e:
        error = storage_error(e, path, needed, then)
        if error is None:
            raise
        raise error from None


def write_file(path: Path, write: Callable[[Path], None], needed: int | None = None,
               then: str = "run the same command again") -> None:
    """Write `path` whole or not at all, durably: `write` fills a fresh temporary sibling (mode 0600),
    which is fsynced and renamed; the directory is fsynced after the rename."""
    with storage_errors(path, needed, then):
        fd, name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
        os.close(fd)
    tmp = Path(name)
    try:
        with storage_errors(path, needed, then):
            fault_point(_point("create", path), partial=tmp)
            write(tmp)
            fault_point(_point("written", path), partial=tmp)
            fsync_path(tmp)
            fault_point(_point("synced", path))
            os.replace(tmp, path)
            fault_point(_point("renamed", path))
            fsync_path(path.parent)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def write_json(path: Path, data: dict) -> None:
    """Replace a small JSON file atomically and durably (a crash leaves the old or the new one)."""
    import json

    text = json.dumps(data, indent=1, sort_keys=True)
    write_file(path, lambda tmp: tmp.write_text(text), len(text))


def read_json(path: Path) -> object:
    """A small JSON file, or a one-line SliceGPTError naming it as corrupted."""
    import json

    try:
        return json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise SliceGPTError(f"{path} is corrupted: {e}") from None


# --- what may be used, replaced or deleted ---

def refuse_existing(out: Path, force: bool, what: str = "", flag: str = "--force",
                    ours: str | tuple[str, ...] | bytes | None = OUTPUT_MARKER) -> None:
    """The one overwrite rule: an existing output is replaced only when asked, and only if slicegpt wrote it.

    `ours`: for a directory, the file (or files, any of them) that marks it as a slicegpt output;
    for a file, its first bytes; None: anything may be replaced (the caller checked). Checked before slow work too.
    """
    label = f"{what + ' ' if what else ''}{out}"
    if not os.path.lexists(out):
        return
    if not force:
        raise SliceGPTError(f"{label} already exists; pass {flag} to overwrite it")
    if ours is None:
        return
    if out.is_symlink():
        raise SliceGPTError(f"{label} is a symbolic link; {flag} replaces only what slicegpt wrote, remove it yourself")
    if isinstance(ours, (str, tuple)):
        names = (ours,) if isinstance(ours, str) else ours
        if not out.is_dir() or not any((out / name).is_file() for name in names):
            raise SliceGPTError(f"{label} is not a slicegpt output (no {' or '.join(names)}); {flag} replaces only "
                                "those, remove it yourself or choose another path")
    else:
        if _head(out, len(ours)) != ours:
            raise SliceGPTError(f"{label} is not a file slicegpt writes (it does not start with {ours!r}); {flag} "
                                "replaces only those, remove it yourself or choose another path")


def _head(path: Path, n: int) -> bytes:
    """The first `n` bytes of a regular file (b"" for anything else)."""
    if not path.is_file():
        return b""
    with open(path, "rb") as f:
        return f.read(n)


def refuse_overlap(out: Path, source: Path, what: str = "the source model") -> None:
    """An output may not be, contain or lie inside what the run reads (symlinked spellings included)."""
    a, b = Path(os.path.realpath(out)), Path(os.path.realpath(source))
    if a == b or a in b.parents or b in a.parents:
        raise SliceGPTError(f"--out {out} overlaps {what} {source}; write the output somewhere else")


def private_directory(path: Path, marker: str, what: str) -> bool:
    """Make `path` this user's private directory (0700) holding `marker`, or check that an existing one
    is such a directory (or empty); anything else is refused before it is used or emptied. True when made."""
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        os.mkdir(path, 0o700)
        made = True
    except FileExistsError:
        made = False
    except OSError as e:
        raise storage_error(e, path) or SliceGPTError(f"cannot create {what} {path}: {e.strerror}") from None
    if not made:
        check_private(path, marker, what)
    fault_point(f"made {marker}")
    if not (path / marker).is_file():
        with storage_errors(path):
            fd = os.open(path / marker, os.O_WRONLY | os.O_CREAT | os.O_NOFOLLOW, 0o600)
            os.close(fd)
            fsync_path(path)
            fsync_path(path.parent)
    return made


def check_private(path: Path, marker: str, what: str) -> None:
    """Refuse (one line) an existing `path` that is not this user's private directory holding `marker` (or empty)."""
    info = os.lstat(path)
    why = ("is a symbolic link" if stat.S_ISLNK(info.st_mode) else
           "is not a directory" if not stat.S_ISDIR(info.st_mode) else
           "belongs to another user" if info.st_uid != os.geteuid() else
           "is writable by other users" if info.st_mode & 0o022 else "")
    if not why:
        marked = os.path.lexists(path / marker)
        if marked and not stat.S_ISREG(os.lstat(path / marker).st_mode):
            why = f"holds a {marker} that is not a plain file"
        elif not marked and any(path.iterdir()):
            why = f"was not made by slicegpt (no {marker} in it)"
    if why:
        raise SliceGPTError(f"{what} {path} {why}; slicegpt neither uses nor deletes it: remove or move it yourself")


# --- atomic outputs ---

@contextmanager
def atomic_directory(out: Path, force: bool = False, needed: int | None = None) -> Iterator[Path]:
    """Yield an empty temporary sibling of `out`; on success it replaces `out`, on error it vanishes.

    Readers see either the old directory or the complete new one, never a half-written one. A
    failed write inside ends in one line (`storage_errors`).
    """
    refuse_existing(out, force, ours=None)
    if out.exists() and not out.is_dir():
        raise SliceGPTError(f"output path {out} exists and is not a directory")
    with storage_errors(out, needed):
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    try:
        with storage_errors(out, needed):
            yield tmp
            publish(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _exchange(a: Path, b: Path) -> bool:
    """Swap two paths in one step (Linux renameat2 RENAME_EXCHANGE); False where that is not available."""
    import ctypes

    try:
        libc = ctypes.CDLL(None, use_errno=True)
        renameat2 = libc.renameat2
    except (OSError, AttributeError):
        return False
    renameat2.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    at_fdcwd, rename_exchange = -100, 2
    if renameat2(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b), rename_exchange) == 0:
        return True
    code = ctypes.get_errno()
    if code in (errno.ENOSYS, errno.EINVAL, errno.EOPNOTSUPP):
        return False
    raise OSError(code, os.strerror(code), str(b))


def publish(tmp: Path, out: Path) -> None:
    """Rename the finished directory `tmp` (a sibling of `out`) into place, replacing an old `out`.

    With an old `out`, the two are exchanged in one step and the old one (now at `tmp`) deleted.
    Where the platform cannot exchange, the old one is first renamed to ``.OUT.old-*/dir``: a crash
    between the two renames leaves it there and `out` missing (a `slicegpt slice` run redoes the
    publishing from its run directory; otherwise rename it back).
    """
    apply_umask(tmp)
    fsync_tree(tmp)
    fault_point(_point("publish", out))
    if os.path.lexists(out) and _exchange(tmp, out):
        fault_point(_point("exchanged", out))
        fsync_path(out.parent)
        shutil.rmtree(tmp)
        return
    if os.path.lexists(out):
        old = Path(tempfile.mkdtemp(prefix=f".{out.name}.old-", dir=out.parent))
        os.replace(out, old / "dir")
        fault_point(_point("moved aside", out))
        os.replace(tmp, out)
        fsync_path(out.parent)
        shutil.rmtree(old)
    else:
        os.replace(tmp, out)
    fault_point(_point("published", out))
    fsync_path(out.parent)


@contextmanager
def atomic_file(out: Path, force: bool = False, needed: int | None = None) -> Iterator[Path]:
    """Yield a temporary sibling path of `out`; on success it replaces `out` (with the umask's mode),
    durably; on error it vanishes, and a failed write ends in one line."""
    refuse_existing(out, force, ours=None)
    with storage_errors(out, needed):
        out.parent.mkdir(parents=True, exist_ok=True)
        fd, name = tempfile.mkstemp(prefix=f".{out.name}.tmp-", dir=out.parent)
        os.close(fd)
    tmp = Path(name)
    try:
        with storage_errors(out, needed):
            yield tmp
            tmp.chmod(0o666 & ~umask())  # mkstemp makes it private
            fsync_path(tmp)
            fault_point(_point("synced", out))
            os.replace(tmp, out)
            fsync_path(out.parent)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
