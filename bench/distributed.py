"""Benchmark: one process against N ranks under torchrun (Gloo on this machine's CPUs).

    .venv/bin/python bench/distributed.py                  # default model, --size 0.8, 16 x 1024 calibration tokens
    .venv/bin/python bench/distributed.py --nproc 2 --samples 32 --recipe paper   # --slicing 0.25

Each configuration is a fresh `slicegpt slice` process (or N of them under torchrun) with every
rank on one CPU thread per process-share of the machine (OMP_NUM_THREADS = cores / N), so one
process and N ranks use the same cores. Printed per run: wall time of the whole command, the
slicing time, peak RSS per rank (VmHWM of each whole process at its end, which the perplexity
evaluation's vocabulary-wide logits set on small models; and, in brackets, the peak during
slicing alone), the float64 bytes
all-reduced per layer (measured, and from the shapes by `reduced_per_layer`), and the
perplexities, which must agree. Then the same formula for LLaMA-2-70B, the scale the
distributed engine is for.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

WRAPPER = """
import os, sys
from slicegpt.cli import main
code = main(sys.argv[1:])
peak = next(int(line.split()[1]) for line in open("/proc/self/status") if line.startswith("VmHWM:"))
print(f"PEAK_RSS_KIB {os.environ.get('RANK', '0')} {peak}", flush=True)
sys.exit(code)
"""


def reduced_per_layer(hidden: int, attention: int, intermediate: int, compensate: bool) -> int:
    """Float64 bytes one sequential (attention, MLP) layer all-reduces with per-layer rotation.

    A covariance (d x d) per residual step; with compensation of the writers, the fit's X^T X
    and X^T Y for o_proj (inputs: heads x head_dim) and down_proj (inputs: the MLP width).
    Token counts and error sums add a few bytes."""
    values = 2 * hidden * hidden
    if compensate:
        values += attention * attention + attention * hidden + intermediate * intermediate + intermediate * hidden
    return 8 * values


def run(nproc: int, slice_args: list[str], out: Path) -> dict:
    cores = os.cpu_count() or 1
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": str(max(1, cores // nproc))}
    launcher = ([sys.executable, "-c", WRAPPER] if nproc == 1 else
                [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}",
                 "--no-python", sys.executable, "-c", WRAPPER])
    start = time.perf_counter()
    done = subprocess.run([*launcher, "slice", *slice_args, "--out", str(out), "--json"], capture_output=True,
                          text=True, env=env)
    wall = time.perf_counter() - start
    if done.returncode != 0:
        errors = [line for line in done.stderr.splitlines() if "error" in line.lower()]
        sys.exit(f"{nproc} process(es) failed: {(errors or done.stderr.splitlines() or ['?'])[-1]}")
    peaks = {}
    for line in done.stdout.splitlines():
        if line.startswith("PEAK_RSS_KIB"):
            _, rank, kib = line.split()
            peaks[int(rank)] = int(kib) * 1024
    figures = json.loads([line for line in done.stdout.splitlines() if line.startswith("{")][-1])
    return {"nproc": nproc, "wall": wall, "peaks": [peaks[r] for r in sorted(peaks)], "figures": figures}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="default")
    p.add_argument("--nproc", type=int, default=2)
    size = p.add_mutually_exclusive_group()
    size.add_argument("--size", default=None, help="share of the dense parameters kept (default recipe: 0.8)")
    size.add_argument("--slicing", default=None, help="share of the hidden width removed (paper recipe: 0.25)")
    p.add_argument("--samples", type=int, default=16)
    p.add_argument("--seqlen", type=int, default=1024)
    p.add_argument("--eval-samples", type=int, default=4)
    p.add_argument("--recipe", default="default", choices=("default", "paper"))
    args = p.parse_args()
    if args.size is None and args.slicing is None:
        args.size, args.slicing = ("0.8", None) if args.recipe == "default" else (None, "0.25")
    measure = ["--size", args.size] if args.size is not None else ["--slicing", args.slicing]
    slice_args = [args.model, *measure, "--samples", str(args.samples), "--seqlen", str(args.seqlen),
                  "--eval-samples", str(args.eval_samples), "--recipe", args.recipe]
    import slicegpt
    from slicegpt.core.onload import read_config
    from slicegpt.formats.loading import checkpoint_directory

    config = read_config(checkpoint_directory(args.model)[0])
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    hidden, layers = text.hidden_size, text.num_hidden_layers
    attention = text.num_attention_heads * getattr(text, "head_dim", hidden // text.num_attention_heads)
    formula = reduced_per_layer(hidden, attention, text.intermediate_size, args.recipe == "default")

    with tempfile.TemporaryDirectory(prefix="slicegpt-bench-") as tmp:
        rows = [run(1, slice_args, Path(tmp) / "one"), run(args.nproc, slice_args, Path(tmp) / "ranks")]
    base = rows[0]
    mib = 2 ** 20
    print(f"\n{args.model}: {layers} layers, d={hidden}, {args.samples} x {args.seqlen} calibration tokens, "
          f"recipe {args.recipe} ({' '.join(measure)}), {os.cpu_count()} cores, slicegpt {slicegpt.__version__}")
    print("| processes | wall s | slicing s | wall vs 1 | peak RSS per rank MiB (process / slicing) "
          "| all-reduced per layer MiB | perplexity dense -> sliced |")
    print("|---|---|---|---|---|---|---|")
    for row in rows:
        f = row["figures"]
        per_layer = f.get("allreduce_bytes_per_layer", 0)
        slicing_peaks = f.get("peak_memory_bytes_per_rank", [f["peak_memory_bytes"]])
        print(f"| {row['nproc']} | {row['wall']:.1f} | {f['slicing_seconds']:.1f} | {row['wall'] / base['wall']:.2f}x "
              f"| {' / '.join(f'{p / mib:.0f}' for p in row['peaks'])} "
              f"({' / '.join(f'{p / mib:.0f}' for p in slicing_peaks)}) "
              f"| {per_layer / mib:.1f} (formula {formula / mib:.1f}) "
              f"| {f['perplexity_dense']:.3f} -> {f['perplexity_sliced']:.3f} |")
    a, b = (r["figures"]["perplexity_sliced"] for r in rows)
    print(f"sliced perplexity, {args.nproc} ranks vs 1: relative difference {abs(a - b) / a:.1e}")
    d, m, n = 8192, 28672, 80
    for compensate in (False, True):
        per = reduced_per_layer(d, d, m, compensate)
        print(f"LLaMA-2-70B ({n} layers, d={d}, MLP {m}), {'default (writers refitted)' if compensate else 'paper'}: "
              f"{per / 2 ** 30:.2f} GiB all-reduced per layer, {n * per / 2 ** 30:.0f} GiB in all; a ring all-reduce "
              f"on 8 ranks moves {2 * 7 / 8 * per / 2 ** 30:.2f} GiB per rank per layer")


if __name__ == "__main__":
    main()
