"""Benchmark: quantized GGUF export of the embedded default, dense and sliced, measured in llama.cpp.

Each `slicegpt export` runs in its own process (wall time includes loading the model); the file's
size and tensor types come from the file. Perplexity is llama.cpp's own (node-llama-cpp's CPU
build, scripts/llama_cpp_perplexity.mjs) on the same held-out Shakespeare windows for every file.

    .venv/bin/python bench/gguf_quant.py --sliced OUT_DIR     # OUT_DIR: `slicegpt slice default --size 0.8`
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

TYPES = ("f16", "q8_0", "q4_0", "q4_k_m")


def export(model: str, dtype: str, out: Path) -> dict:
    """One `slicegpt export` in a fresh process: its figures and wall time."""
    start = time.perf_counter()
    done = subprocess.run([sys.executable, "-m", "slicegpt", "export", model, "--dtype", dtype, "--out", str(out),
                           "--force", "--json"], capture_output=True, text=True)
    if done.returncode:
        sys.exit(done.stderr.strip().splitlines()[-1])
    return dict(json.loads(done.stdout.strip().splitlines()[-1]), seconds=time.perf_counter() - start)


def perplexities(files: list[Path], windows: list[list[int]]) -> dict:
    """llama.cpp's perplexity of each file on the windows, in one llama.cpp process."""
    from slicegpt.formats.llama_cpp import run_node_script

    result = run_node_script("llama_cpp_perplexity.mjs", {"files": [str(f) for f in files], "windows": windows,
                                                          "threads": 2})
    return {r["file"]: r["perplexity"] for r in result}


def main() -> None:
    import slicegpt

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--sliced", required=True, help="the default recipe's output of the default model (a stock model)")
    p.add_argument("--eval-samples", type=int, default=4)
    p.add_argument("--eval-seqlen", type=int, default=128)
    p.add_argument("--work", default=None, help="where the files go (default: a temporary directory)")
    args = p.parse_args()
    work = Path(args.work or tempfile.mkdtemp(prefix="gguf-quant-"))
    work.mkdir(parents=True, exist_ok=True)
    rows = []
    for label, model in (("dense", "default"), ("default 0.8", args.sliced)):
        for dtype in TYPES:
            out = work / f"{label.split()[0]}-{dtype}.gguf"
            rows.append(dict(export(model, dtype, out), label=label, path=out))
    tokenizer = slicegpt.load_model("default").tokenizer
    ids = slicegpt.tokenize(tokenizer, slicegpt.load_text("shakespeare", "evaluation"))
    windows = slicegpt.evaluation_windows(ids, args.eval_seqlen, args.eval_samples).input_ids.tolist()
    ppl = perplexities([r["path"] for r in rows], windows)
    print(f"| model | type | MiB | export s | llama.cpp perplexity | tensor types |\n|---|---|---|---|---|---|")
    for r in rows:
        types = ", ".join(f"{n} {k}" for k, n in r["tensor_types"].items())
        print(f"| {r['label']} | {r['dtype']} | {r['bytes'] / 2**20:.1f} | {r['seconds']:.1f} | "
              f"{ppl[str(r['path'])]:.2f} | {types} |")


if __name__ == "__main__":
    main()
