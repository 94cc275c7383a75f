"""Benchmark: slice the embedded default model at several slicings (the paper's measure) and print a table.

Both rotations can be compared in one run (`--rotation both`): per-layer (the paper's, skip
matrices) and uniform (one basis, a standard model of the family; its exact-vs-standard
perplexity is shown where the stock class only approximates it, `--accept-deviation`).

For each slicing: dense and sliced perplexity, parameter counts (skip matrices included),
slicing wall time, peak memory during slicing; "x floor" is slicing time over the floor, one
dense forward pass through the decoder over the same calibration tokens, timed in the same
process just before slicing (`common.dense_floor`). Every configuration runs in a fresh
process, so its peak RSS is its own.

    .venv/bin/python bench/slice_default.py                # 32 x 1024 calibration, 10/20/25/30%
    .venv/bin/python bench/slice_default.py --samples 8 --seqlen 256 --slicings 0.25
    .venv/bin/python bench/slice_default.py --model gemma3-270m --slicings 0.25
    .venv/bin/python bench/slice_default.py --rotation both --fit-tied-head   # README trade-off table
    .venv/bin/python bench/slice_default.py --recipe default   # compensation, the stream sliced (--neurons off)
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time

import torch

from common import add_data_arguments, dense_floor, evaluation, save_results  # bench/common.py


def child(args) -> dict:
    """One configuration in this process: 'dense' (floor + dense perplexity) or a slicing."""
    import slicegpt
    from slicegpt.evaluation.measure import measure

    torch.set_num_threads(args.threads) if args.threads else None
    loaded = slicegpt.load_model(args.model)
    model, tokenizer = loaded.model, loaded.tokenizer
    calibration = slicegpt.calibration_data(tokenizer, args.data, args.samples, args.seqlen, args.seed)
    floor = dense_floor(model, calibration, args.batch_size)
    if args.child == "dense":
        ppl = slicegpt.perplexity(model, evaluation(tokenizer, args), progress=False)
        return {"floor_seconds": floor.seconds, "floor_peak_bytes": floor.peak_bytes, "perplexity": ppl,
                "parameters": slicegpt.count_parameters(model)}
    from slicegpt.api import make_standard

    slicing, rotation, variant = (args.child.split("/") + ["", ""])[:3]
    windows = evaluation(tokenizer, args)
    with measure() as m:
        model, config = slicegpt.slice_model(model, tokenizer, calibration, recipe=args.recipe,
                                             slicing=float(slicing), rotation=rotation, standard=False,
                                             head="fit" if variant == "fit" else None,
                                             pooling=args.pooling if rotation == "uniform" else None,
                                             neurons="off" if args.recipe == "default" else None,
                                             batch_size=args.batch_size, progress=False)
    row = {"slicing": float(slicing), "rotation": rotation + (" (fitted tied head)" if variant == "fit" else ""),
           "seconds": m.seconds, "peak_bytes": m.peak_bytes, "floor_seconds": floor.seconds}
    if rotation == "uniform":
        if args.accept_deviation:  # the exact sliced function, before the stock approximation
            row["perplexity_exact"] = slicegpt.perplexity(model, windows, progress=False)
        model = make_standard(model, config, args.accept_deviation, calibration.input_ids[:1])
        row["deviations"] = config.deviations
    row.update(perplexity=slicegpt.perplexity(model, windows, progress=False), parameters=config.parameters_sliced,
               hidden=config.sliced_hidden_size, tied_head=config.tied_head)
    return row


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_data_arguments(p)
    p.add_argument("--slicings", default="0.1,0.2,0.25,0.3")
    p.add_argument("--threads", type=int, default=0)
    p.add_argument("--recipe", choices=("paper", "default"), default="paper",
                   help="the paper's algorithm (these tables) or the default recipe's compensation with the stream "
                        "sliced, --neurons off (MLP neurons: bench/quality.py)")
    p.add_argument("--rotation", choices=("per-layer", "uniform", "both"), default="per-layer")
    p.add_argument("--fit-tied-head", action="store_true",
                   help="uniform: also the fitted tied head variant (--head fit)")
    p.add_argument("--pooling", choices=("unit-trace", "tokens"), default="unit-trace", help="uniform: see slicegpt slice")
    p.add_argument("--accept-deviation", action="store_true",
                   help="uniform on families the stock class only approximates: measure exact and standard")
    p.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child:
        print(json.dumps(child(args)))
        return

    def run(which: str) -> dict:
        cmd = [sys.executable, __file__, "--child", which] + [a for a in sys.argv[1:]]
        out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
        return json.loads(out.strip().splitlines()[-1])

    started = time.time()
    dense = run("dense")
    rotations = ["per-layer", "uniform"] if args.rotation == "both" else [args.rotation]
    configs = [f"{s}/{r}" for s in args.slicings.split(",") for r in rotations]
    if args.fit_tied_head:
        configs += [f"{s}/uniform/fit" for s in args.slicings.split(",")]
    rows = [run(c) for c in configs]
    gib = 2**30
    print(f"model {args.model}; calibration {args.samples} x {args.seqlen} tokens of {args.data}; perplexity on "
          f"{args.eval_samples} x {args.eval_seqlen} held-out tokens; torch threads {torch.get_num_threads()}")
    print(f"floor (one dense decoder forward over the calibration tokens): {dense['floor_seconds']:.1f} s, "
          f"peak {dense['floor_peak_bytes'] / gib:.2f} GiB\n")
    print("| slicing | rotation | d' | ppl dense | ppl sliced | params dense | params sliced | ratio | slicing s "
          "| x floor | peak GiB |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        exact = f" (exact {r['perplexity_exact']:.2f})" if "perplexity_exact" in r else ""
        print(f"| {r['slicing']:.0%} | {r['rotation']} | {r['hidden']} | {dense['perplexity']:.2f} | "
              f"{r['perplexity']:.2f}{exact} | "
              f"{dense['parameters'] / 1e6:.1f}M | {r['parameters'] / 1e6:.1f}M | "
              f"{r['parameters'] / dense['parameters']:.3f} | {r['seconds']:.1f} | "
              f"{r['seconds'] / r['floor_seconds']:.2f} | {r['peak_bytes'] / gib:.2f} |")
    print(f"\n(total {time.time() - started:.0f} s)")
    save_results(f"slice_default-{args.model}", {"dense": dense, "sliced": rows,
                                                  "seconds": round(time.time() - started)})


if __name__ == "__main__":
    main()
