"""Benchmark: the default recipe's quality and slicing time against calibration size, window length
and compensation's ridge.

Every row is the default recipe (`bench/quality.py`'s "default" row, in a fresh process) on the
same held-out windows (16 x 1024 Shakespeare tokens by default); only the calibration changes:

- windows: 16, 32, 64, 128, 256 windows of 1024 tokens (`--samples`);
- window length at a fixed 32,768 tokens: 128 x 256, 64 x 512, 32 x 1024, 16 x 2048 (`--seqlen`);
- the ridge (relative to the mean input energy; the recipe's is 0.1) at a small and a large
  calibration set: more tokens should want less regularisation.

"x floor" is slicing time over one dense forward pass over the same calibration tokens, timed in
the row's own process (`common.dense_floor`), so it is comparable between rows of different sizes.

    .venv/bin/python bench/calibration.py                       # every part, sizes 0.8 and 0.5
    .venv/bin/python bench/calibration.py --parts windows --sizes 0.8

The raw figures are kept in bench/results/calibration-<model>-<date>-<commit>.json.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

from common import save_results  # bench/common.py

QUALITY = Path(__file__).resolve().parent / "quality.py"
PARTS = {
    # part: (samples, seqlen, ridge) rows; ridge None is the recipe's own
    "windows": [(16, 1024, None), (32, 1024, None), (64, 1024, None), (128, 1024, None), (256, 1024, None)],
    "length": [(128, 256, None), (64, 512, None), (16, 2048, None)],
    "ridge": [(16, 1024, 0.03), (16, 1024, 0.3), (64, 1024, 0.03)],
}


def run(args, which: str, samples: int, seqlen: int, ridge: float | None) -> dict:
    command = [sys.executable, str(QUALITY), "--child", which, "--model", args.model, "--data", args.data,
               "--samples", str(samples), "--seqlen", str(seqlen), "--seed", str(args.seed),
               "--eval-samples", str(args.eval_samples), "--eval-seqlen", str(args.eval_seqlen)]
    if ridge is not None:
        command += ["--ridge", str(ridge)]
    done = subprocess.run(command, capture_output=True, text=True)
    if done.returncode:
        return {"error": (done.stderr.strip().splitlines() or ["failed"])[-1]}
    return json.loads(done.stdout.strip().splitlines()[-1])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="default")
    p.add_argument("--data", default="shakespeare")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--eval-samples", type=int, default=16)
    p.add_argument("--eval-seqlen", type=int, default=1024)
    p.add_argument("--sizes", default="0.8,0.5", help="shares of the dense parameters to keep")
    p.add_argument("--parts", default="windows,length,ridge", help=f"comma-separated, from: {', '.join(PARTS)}")
    p.add_argument("--windows", default=None, help="override the windows part's counts, e.g. 16,64")
    args = p.parse_args()
    parts = [s.strip() for s in args.parts.split(",")]
    if unknown := [s for s in parts if s not in PARTS]:
        p.error(f"unknown parts: {', '.join(unknown)}")
    if args.windows:
        PARTS["windows"] = [(int(n), 1024, None) for n in args.windows.split(",")]

    started = time.time()
    dense = run(args, "dense", 32, 1024, None)
    if "error" in dense:
        sys.exit(f"dense model failed: {dense['error']}")
    print(f"model {args.model}; perplexity on {args.eval_samples} x {args.eval_seqlen} held-out tokens of "
          f"{args.data}; dense {dense['perplexity']:.2f}\n", flush=True)
    print("| size | part | windows x tokens | ridge | ppl | slicing s | x floor |")
    print("|---|---|---|---|---|---|---|", flush=True)
    rows = []
    for size in (float(s) for s in args.sizes.split(",")):
        for part in parts:
            for samples, seqlen, ridge in PARTS[part]:
                r = run(args, f"{size}/default", samples, seqlen, ridge)
                rows.append({"size": size, "part": part, "samples": samples, "seqlen": seqlen, "ridge": ridge, **r})
                shown = "recipe's" if ridge is None else f"{ridge:g}"
                if "error" in r:
                    print(f"| {size:g} | {part} | {samples} x {seqlen} | {shown} | failed: {r['error']} | | |",
                          flush=True)
                    continue
                print(f"| {size:g} | {part} | {samples} x {seqlen} | {shown} | {r['perplexity']:.2f} | "
                      f"{r['seconds']:.1f} | {r['seconds'] / r['floor_seconds']:.2f} |", flush=True)
    print(f"\n(total {time.time() - started:.0f} s)")
    save_results(f"calibration-{args.model}", {"dense": dense, "rows": rows, "seconds": round(time.time() - started)})


if __name__ == "__main__":
    main()
