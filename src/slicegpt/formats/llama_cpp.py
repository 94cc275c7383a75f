"""llama.cpp's own quantizer (`llama_model_quantize`, what `llama-quantize` runs) for the k-quant mixes.

The `gguf` package quantizes only the simple block types (q8_0, q4_0, ...) and knows nothing of
llama.cpp's per-tensor choices (q4_k_m keeps some attention and FFN tensors in q6_k, falls back
per tensor when a row is not a multiple of 256), so those files come from llama.cpp itself: the
libllama that node-llama-cpp ships (scripts/llama_cpp_setup.sh), or any libllama named by
$SLICEGPT_LIBLLAMA. It runs in a child process, so an abort inside llama.cpp ends in one line here.

Run as a script (no slicegpt import): python llama_cpp.py LIBLLAMA SRC.gguf DST.gguf FTYPE
"""

from __future__ import annotations

import os
import platform
import subprocess
import sys
from pathlib import Path

LIBRARY_ENV = "SLICEGPT_LIBLLAMA"


def _platform_dir() -> str:
    """node-llama-cpp's name for this machine's CPU build (linux-x64, mac-arm64-metal, ...)."""
    system = {"Linux": "linux", "Darwin": "mac", "Windows": "win"}.get(platform.system(), platform.system().lower())
    machine = {"x86_64": "x64", "AMD64": "x64", "aarch64": "arm64"}.get(platform.machine(), platform.machine())
    return f"{system}-{machine}"


def find_libllama() -> Path | None:
    """$SLICEGPT_LIBLLAMA, else the CPU build of libllama inside the node-llama-cpp runner."""
    from slicegpt.formats.loading import cache_dir

    if os.environ.get(LIBRARY_ENV):
        path = Path(os.environ[LIBRARY_ENV]).expanduser()
        return path if path.is_file() else None
    root = cache_dir() / "node-llama-cpp" / "node_modules" / "@node-llama-cpp"
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
