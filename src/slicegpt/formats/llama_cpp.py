"""Real llama.cpp from Python: node-llama-cpp's scripts, and llama.cpp's own quantizer.

Both come from what scripts/llama_cpp_setup.sh installs into the slicegpt cache: npm's
node-llama-cpp with its prebuilt CPU build of llama.cpp. `run_node_script` runs one of the
repository's scripts/llama_cpp_*.mjs in that folder (one node process for many files: starting
llama.cpp costs seconds, a small model milliseconds).

The quantizer (`llama_model_quantize`, what `llama-quantize` runs) makes the k-quant mixes: the
`gguf` package quantizes only the simple block types (q8_0, q4_0, ...) and knows nothing of
llama.cpp's per-tensor choices (q4_k_m keeps some attention and FFN tensors in q6_k, falls back
per tensor when a row is not a multiple of 256), so those files come from llama.cpp itself: the
libllama that node-llama-cpp ships, or any libllama named by $SLICEGPT_LIBLLAMA. It runs in a
child process, so an abort inside llama.cpp ends in one line here.

Run as a script (no slicegpt import): python llama_cpp.py LIBLLAMA SRC.gguf DST.gguf FTYPE
"""

from __future__ import annotations

import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

LIBRARY_ENV = "SLICEGPT_LIBLLAMA"
# The repository's scripts/ (beside src/), where llama_cpp_setup.sh and the .mjs scripts live.
SCRIPTS = Path(__file__).resolve().parents[3] / "scripts"
SETUP_HINT = "run scripts/llama_cpp_setup.sh (node-llama-cpp's prebuilt llama.cpp; needs node >= 20 and npm)"


def node_dir() -> Path:
    """Where scripts/llama_cpp_setup.sh installs node-llama-cpp: the slicegpt cache."""
    from slicegpt.formats.loading import cache_dir

    return cache_dir() / "node-llama-cpp"


def node_llama_cpp() -> Path | None:
    """node-llama-cpp's folder when it is installed and node is on PATH, else None."""
    home = node_dir()
    if shutil.which("node") and (home / "node_modules" / "node-llama-cpp").is_dir():
        return home
    return None


def node_llama_cpp_version() -> str:
    """The installed node-llama-cpp's version (its package.json), '?' when unreadable."""
    try:
        package = node_dir() / "node_modules" / "node-llama-cpp" / "package.json"
        return str(json.loads(package.read_text())["version"])
    except (OSError, ValueError, KeyError):
        return "?"


def _place(script: Path, home: Path) -> Path:
    """`script` copied into node-llama-cpp's folder (node resolves `import "node-llama-cpp"` from
    the script's own folder); replaced whole, so a run beside ours never reads half a file."""
    from slicegpt.atomic import atomic_file

    target = home / script.name
    text = script.read_bytes()
    if not target.is_file() or target.read_bytes() != text:
        with atomic_file(target, force=True) as tmp:
            tmp.write_bytes(text)
    return target


def _node_error(stderr: str, returncode: int) -> str:
    """llama.cpp's own words when it gave any (its first error line), else node's error message, else
    node's first line. Node's report of an uncaught error quotes the throwing source line (with a `^`
    marker under it) and a stack: those say nothing to a user and are skipped."""
    lines = [line.strip().removeprefix("[node-llama-cpp]").strip() for line in (stderr or "").splitlines()]
    lines = [line for line in lines if line and not line.startswith(("at ", "throw ", "^", "file://", "node:"))]
    thrown = [line for line in lines if line.startswith("Error:")]
    said = [line for line in lines if "error" in line.lower() and line not in thrown]
    return (said or thrown or lines or [f"exit status {returncode}"])[0]


def run_node_script(name: str, jobs: object, timeout: float | None = None) -> object:
    """Run scripts/NAME (a llama_cpp_*.mjs) on `jobs`, given to it as a JSON file; its last stdout line, parsed.

    A missing install or a failure inside llama.cpp ends in one SliceGPTError line.
    """
    from slicegpt.errors import SliceGPTError

    home = node_llama_cpp()
    if home is None:
        raise SliceGPTError(f"llama.cpp is not installed: {SETUP_HINT}")
    script = SCRIPTS / name
    if not script.is_file():
        raise SliceGPTError(f"{script} is missing: llama.cpp runs from a slicegpt checkout's scripts/")
    target = _place(script, home)
    with tempfile.NamedTemporaryFile("w", suffix=".json", prefix="slicegpt-jobs-") as f:
        json.dump(jobs, f)
        f.flush()
        try:
            done = subprocess.run(["node", target.name, f.name], cwd=home, capture_output=True, text=True,
                                  timeout=timeout)
        except subprocess.TimeoutExpired:
            raise SliceGPTError(f"llama.cpp ({name}) took longer than {timeout:.0f} s") from None
    if done.returncode != 0:
        raise SliceGPTError(f"llama.cpp ({name}) failed: {_node_error(done.stderr, done.returncode)}")
    try:
        return json.loads(done.stdout.strip().splitlines()[-1])
    except (IndexError, ValueError):
        raise SliceGPTError(f"llama.cpp ({name}) printed no JSON result") from None


def _platform_dir() -> str:
    """node-llama-cpp's name for this machine's CPU build (linux-x64, mac-arm64-metal, ...)."""
    system = {"Linux": "linux", "Darwin": "mac", "Windows": "win"}.get(platform.system(), platform.system().lower())
    machine = {"x86_64": "x64", "AMD64": "x64", "aarch64": "arm64"}.get(platform.machine(), platform.machine())
    return f"{system}-{machine}"


def find_libllama() -> Path | None:
    """$SLICEGPT_LIBLLAMA, else the CPU build of libllama inside the node-llama-cpp runner."""
    if os.environ.get(LIBRARY_ENV):
        path = Path(os.environ[LIBRARY_ENV]).expanduser()
        return path if path.is_file() else None
    root = node_dir() / "node_modules" / "@node-llama-cpp"
    name = _platform_dir()
    for build in (name, f"{name}-metal"):  # the plain CPU build first
        found = sorted((root / build / "bins").glob("*/libllama*.*")) if (root / build).is_dir() else []
        if found:
            return found[0]
    return None


def quantize_file(src: Path, dst: Path, ftype: int) -> None:
    """Quantize the GGUF file `src` into `dst` with llama.cpp (`ftype`: a llama_ftype number)."""
    from slicegpt.errors import SliceGPTError

    library = find_libllama()
    if library is None:
        raise SliceGPTError(f"this GGUF type needs llama.cpp's quantizer: run scripts/llama_cpp_setup.sh "
                            f"(node-llama-cpp) or set {LIBRARY_ENV} to a libllama shared library")
    done = subprocess.run([sys.executable, __file__, str(library), str(src), str(dst), str(ftype)],
                          capture_output=True, text=True)
    if done.returncode != 0:
        lines = [line for line in (done.stderr or "").splitlines() if line.strip()] or [f"exit status {done.returncode}"]
        raise SliceGPTError(f"llama.cpp's quantizer ({library.name}) failed: {lines[-1].strip()}")


def _run(library: str, src: str, dst: str, ftype: int) -> int:
    """In the child: call llama_model_quantize with llama.cpp's defaults and our file type."""
    import ctypes

    class Params(ctypes.Structure):  # room for any version's llama_model_quantize_params
        _fields_ = [("raw", ctypes.c_byte * 1024)]

    lib = ctypes.CDLL(library)
    lib.llama_model_quantize_default_params.restype = Params
    lib.llama_model_quantize.argtypes = [ctypes.c_char_p, ctypes.c_char_p, ctypes.POINTER(Params)]
    lib.llama_model_quantize.restype = ctypes.c_uint32
    params = lib.llama_model_quantize_default_params()
    # The two first fields have kept their place since 2023: int32 nthread, enum llama_ftype ftype.
    ctypes.c_int32.from_buffer(params, 0).value = os.cpu_count() or 0
    ctypes.c_int32.from_buffer(params, 4).value = ftype
    return int(lib.llama_model_quantize(src.encode(), dst.encode(), ctypes.byref(params)))


if __name__ == "__main__":
    lib_path, source, target, file_type = sys.argv[1:5]
    status = _run(lib_path, source, target, int(file_type))
    if status:
        print(f"llama_model_quantize returned {status}", file=sys.stderr)
    sys.exit(1 if status else 0)
