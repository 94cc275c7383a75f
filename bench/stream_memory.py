"""Benchmark: peak memory of the streaming engine against model depth and calibration size.

Every slice runs in a fresh process (`python -m slicegpt slice ... --slicing 0.25 --neurons off`: the
default recipe's compensation, the stream sliced with per-layer rotation); its peak RSS is the
process's own high-water mark (VmHWM in /proc/self/status), read at its end.

    .venv/bin/python bench/stream_memory.py depth        # random Llama, width 1024, 8/16/32/64 layers
    .venv/bin/python bench/stream_memory.py calibration  # default model, 32/64/128 x 1024 tokens, --activations-dir
    .venv/bin/python bench/stream_memory.py recipes      # random Llama 1536/24/4096: paper, default, default + heads

depth: the same width at 8, 16, 32 and 64 layers (0.5 to 3.8 GB in float32 on disk); peak RSS
should stay flat as depth grows, and far below the model's size for the deepest one.
calibration: the embedded SmolLM2 with 32, 64 and 128 calibration windows of 1024 tokens and
the activations on disk; peak RSS should stay flat as the calibration set grows.
recipes: one random Llama (hidden 1536, 24 layers, MLP 4096, float32, about 2.4 GB) sliced by the
paper's recipe (`--recipe paper --slicing 0.25`), the default recipe (`--size 0.8`: neurons by
measured loss) and the default with half the query heads pruned as well (`--heads 4x2`); peak
RSS against the model's size, and the peak above what the libraries hold before any model is read
(the CLI, torch, transformers and the Llama class: about 0.37 GiB, the same for any model).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
SLICING = ("--slicing", "0.25", "--neurons", "off")  # the stream sliced, per-layer, with compensation
TEXT = HERE.parent / "tests" / "data" / "tempest_excerpt.txt"
WRAPPER = """
import sys
from slicegpt.cli import main
# what the libraries hold before any model is read: the CLI, torch, transformers and a model class
from transformers import AutoTokenizer, LlamaForCausalLM
print("LIBRARIES_RSS_KIB", next(int(line.split()[1]) for line in open("/proc/self/status")
                               if line.startswith("VmRSS:")))
code = main(sys.argv[1:])
# VmHWM, not getrusage's ru_maxrss: on Linux that one keeps the peak of the parent's memory the
# child had between fork and exec (a test process holding a loaded model would be counted)
peak = next(int(line.split()[1]) for line in open("/proc/self/status") if line.startswith("VmHWM:"))
print("PEAK_RSS_KIB", peak)
sys.exit(code)
"""


def slice_process(*args) -> tuple[float, int, int, dict]:
    """Wall seconds, peak RSS in bytes, the RSS of the libraries alone (before any model is read) and the
    JSON figures of one `slicegpt slice` process."""
    start = time.perf_counter()
    result = subprocess.run([sys.executable, "-c", WRAPPER, "slice", *map(str, args), "--json"], capture_output=True,
                            text=True, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    seconds = time.perf_counter() - start
    if result.returncode != 0:
        sys.exit(f"slice failed: {result.stderr.strip().splitlines()[-1]}")
    lines = result.stdout.splitlines()
    peak, libraries = (int(next(line for line in lines if line.startswith(key)).split()[1]) * 1024
                       for key in ("PEAK_RSS_KIB", "LIBRARIES_RSS_KIB"))
    figures = json.loads([line for line in lines if line.startswith("{")][-1])
    return seconds, peak, libraries, figures


def depth(args) -> None:
    from slicegpt.testing import write_random_llama

    from slicegpt.testing import train_tokenizer

    tokenizer = train_tokenizer(TEXT.read_text())
    rows = []
    with tempfile.TemporaryDirectory(dir=args.workdir) as work:
        for layers in args.layers:
            model = Path(work) / f"llama-{layers}"
            size = write_random_llama(model, layers=layers, hidden=args.hidden, intermediate=4 * args.hidden,
                                      tokenizer=tokenizer)
            seconds, peak, _, figures = slice_process(model, *SLICING, "--calibration", TEXT, "--samples", "8",
                                                   "--seqlen", "256", "--no-eval", "--out", Path(work) / "out",
                                                   "--force")
            rows.append((layers, size, peak, seconds, figures["slicing_seconds"]))
            shutil.rmtree(model)
            shutil.rmtree(Path(work) / "out", ignore_errors=True)
            print(f"{layers} layers done", file=sys.stderr)
    base = rows[0][2]
    print(f"random Llama, hidden {args.hidden}, ffn {4 * args.hidden}, float32; 8 x 256 calibration tokens; "
          "per-layer rotation, slicing 0.25 (--neurons off)")
    print("| layers | model on disk | peak RSS | RSS / model | RSS vs 8 layers | slicing s | process s |")
    print("|---|---|---|---|---|---|---|")
    for layers, size, peak, seconds, slicing in rows:
        print(f"| {layers} | {size / 2**30:.2f} GiB | {peak / 2**30:.2f} GiB | {peak / size:.2f} | "
              f"{peak / base - 1:+.1%} | {slicing:.1f} | {seconds:.1f} |")


def calibration(args) -> None:
    rows = []
    with tempfile.TemporaryDirectory(dir=args.workdir) as work:
        for samples in args.samples:
            seconds, peak, _, figures = slice_process(args.model, *SLICING, "--samples", samples, "--seqlen",
                                                   "1024", "--no-eval", "--activations-dir",
                                                   Path(work) / "acts", "--out", Path(work) / "out", "--force")
            rows.append((samples, peak, figures["slicing_seconds"], seconds))
            print(f"{samples} samples done", file=sys.stderr)
    base = rows[0][1]
    print(f"{args.model}, per-layer rotation, slicing 0.25 (--neurons off), --activations-dir, calibration windows "
          "of 1024 tokens")
    print("| samples | tokens | peak RSS | RSS vs 32 samples | slicing s | process s |")
    print("|---|---|---|---|---|---|")
    for samples, peak, slicing, seconds in rows:
        print(f"| {samples} | {samples * 1024:,} | {peak / 2**30:.2f} GiB | {peak / base - 1:+.1%} | {slicing:.1f} | "
              f"{seconds:.1f} |")


RECIPES = {"paper": ("--recipe", "paper", "--slicing", "0.25"), "default": ("--size", "0.8"),
           "default + heads 4x2": ("--size", "0.8", "--heads", "4x2")}


def recipes(args) -> None:
    from slicegpt.testing import train_tokenizer, write_random_llama

    tokenizer = train_tokenizer(TEXT.read_text())
    rows = []
    with tempfile.TemporaryDirectory(dir=args.workdir) as work:
        model = Path(work) / "llama"
        size = write_random_llama(model, layers=args.layers, hidden=args.hidden, intermediate=args.intermediate,
                                  tokenizer=tokenizer)
        for name in args.rows.split(","):
            seconds, peak, libraries, figures = slice_process(
                model, *RECIPES[name], "--calibration", TEXT, "--samples", "8", "--seqlen", "256", "--no-eval",
                "--out", Path(work) / "out", "--force")
            rows.append((name, peak, libraries, figures["parameters_sliced"] / figures["parameters_dense"],
                         figures["slicing_seconds"], seconds))
            shutil.rmtree(Path(work) / "out", ignore_errors=True)
            print(f"{name} done", file=sys.stderr)
    print(f"random Llama, hidden {args.hidden}, {args.layers} layers, MLP {args.intermediate}, float32, "
          f"{size / 2**30:.2f} GiB on disk; 8 x 256 calibration tokens, streamed from disk")
    print("| recipe | peak RSS | RSS / model | libraries | peak above libraries / model | parameters kept | "
          "slicing s | process s |")
    print("|---|---|---|---|---|---|---|---|")
    for name, peak, libraries, kept, slicing, seconds in rows:
        print(f"| {name} | {peak / 2**30:.2f} GiB | {peak / size:.2f} | {libraries / 2**30:.2f} GiB | "
              f"{(peak - libraries) / size:.2f} | {kept:.3f} | {slicing:.1f} | {seconds:.1f} |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="which", required=True)
    p = sub.add_parser("depth")
    p.add_argument("--layers", type=int, nargs="+", default=[8, 16, 32, 64])
    p.add_argument("--hidden", type=int, default=1024)
    p.add_argument("--workdir", default=None, help="where the random models are written (default: system temp)")
    p.set_defaults(func=depth)
    p = sub.add_parser("calibration")
    p.add_argument("--model", default="default")
    p.add_argument("--samples", type=int, nargs="+", default=[32, 64, 128])
    p.add_argument("--workdir", default=None)
    p.set_defaults(func=calibration)
    p = sub.add_parser("recipes")
    p.add_argument("--layers", type=int, default=24)
    p.add_argument("--hidden", type=int, default=1536)
    p.add_argument("--intermediate", type=int, default=4096)
    p.add_argument("--rows", default=",".join(RECIPES))
    p.add_argument("--workdir", default=None)
    p.set_defaults(func=recipes)
    args = parser.parse_args()
    args.func(args)


if __name__ == "__main__":
    main()
