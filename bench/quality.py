"""Benchmark: the quality levers against the paper's algorithm and against removing whole blocks.

Per model and size (the share of the dense parameters kept, `--size`), every row in a fresh
process, on the same calibration (32 x 1024 Shakespeare tokens by default) and held-out text:

- paper: `--recipe paper --size F` (equal widths, no compensation);
- compensation alone, adaptive widths alone, compensation with the stream sliced (equal or
  adaptive widths, `--neurons off`), and the default recipe (MLP neurons pruned in
  compensation's fit, the stream sliced only past the neuron floor), also with the dense model
  on every calibration window or on none (`--dense-share 1 / 0`; the default runs it on 1/8);
- uniform rotation (stock model) with the paper's algorithm and with compensation (`--rotation
  uniform`); "uniform default" is refused where MLP neurons alone meet the size (nothing rotated);
- the default recipe with one MLP neuron count in every layer (`--allocation equal`: a stock class);
- the default recipe with one stream width where the stream is sliced (`--widths equal`);
- the default recipe with whole attention heads pruned (row `default + heads GxR`: `--heads GxR`), the
  neurons filling the rest of the size;
- ShortGPT (Men et al. 2024), the obvious alternative: drop the decoder blocks whose input and
  output are most alike (angular distance on the calibration tokens) until at most F of the
  parameters remain. Implemented here only, as a baseline.

Every parameter is counted (skip, entry and branch-output matrices, an untied head). "x floor"
is slicing wall time over one dense forward pass through the decoder over the calibration tokens,
timed in the row's own process just before it slices (`common.dense_floor`).

    .venv/bin/python bench/quality.py                                 # SmolLM2 at 0.9, 0.8, 0.65, 0.5
    .venv/bin/python bench/quality.py --sizes 0.8 --rows paper,default
    .venv/bin/python bench/quality.py --model gemma3-270m --eval-samples 8 --rows paper,default,shortgpt

The raw figures are kept in bench/results/quality-<model>-<date>-<commit>.json.
"""

from __future__ import annotations

import argparse
import json
import math
import re
import subprocess
import sys
import time

import torch

from common import add_data_arguments, dense_floor, evaluation, save_results  # bench/common.py

# Each row's settings (with `size`, the share of the dense parameters kept).
ROWS = {
    "paper": {"recipe": "paper"},
    "compensation": {"recipe": "paper", "compensate": "writers"},
    "adaptive widths": {"recipe": "paper", "widths": "adaptive"},
    "default": {"recipe": "default"},  # --neurons auto: neurons first, each layer's count by measured loss
    "default equal neurons": {"recipe": "default", "allocation": "equal"},  # one neuron count in every layer
    "default equal widths": {"recipe": "default", "widths": "equal"},  # one stream width where it is sliced
    "default dense everywhere": {"recipe": "default", "dense_share": 1.0},  # the dense model on every window
    "default no dense targets": {"recipe": "default", "dense_share": 0.0},  # targets X P only: OBS, no correction
    "stream sliced": {"recipe": "default", "neurons": "off"},  # compensation, the stream sliced (no neurons)
    "stream sliced adaptive": {"recipe": "default", "neurons": "off", "widths": "adaptive"},
    "uniform paper": {"recipe": "paper", "rotation": "uniform", "standard": False},
    "uniform compensation": {"recipe": "default", "rotation": "uniform", "standard": False, "neurons": "off"},
    "uniform default": {"recipe": "default", "rotation": "uniform"},
    "shortgpt": None,
}
# and "default + heads GxR", any G and R: attention heads pruned (--heads GxR: G key/value heads of R query heads
# each; SmolLM2 has 3x3, Gemma 3 270M 1x4), the neurons filling the rest of the size
HEADS_ROW = re.compile(r"default \+ heads (\d+x\d+)")
# and "default + neurons F": the default recipe with F of the MLP neurons kept on average (--neurons F), the stream
# sliced for the rest of the size (where --neurons auto keeps 0.4 once neurons alone cannot meet it)
NEURONS_ROW = re.compile(r"default \+ neurons (0?\.\d+)")


def row_settings(name: str) -> dict | None:
    """A row's settings: ROWS[name], or the default recipe with --heads GxR or --neurons F."""
    if found := HEADS_ROW.fullmatch(name):
        return {"recipe": "default", "heads": found.group(1)}
    if found := NEURONS_ROW.fullmatch(name):
        return {"recipe": "default", "neurons": float(found.group(1))}
    return ROWS[name]


def _load(args):
    import slicegpt

    loaded = slicegpt.load_model(args.model)
    calibration = slicegpt.calibration_data(loaded.tokenizer, args.data, args.samples, args.seqlen, args.seed)
    return loaded.model, loaded.tokenizer, calibration


@torch.no_grad()
def block_distances(model, calibration, batch_size: int) -> list[float]:
    """ShortGPT's score per block: mean angular distance between its input and output (padding excluded)."""
    layers = model.model.layers
    sums = torch.zeros(len(layers), dtype=torch.float64)
    tokens = 0
    for ids, mask in calibration.batches(batch_size):
        hidden = model(input_ids=ids, attention_mask=mask, output_hidden_states=True, use_cache=False).hidden_states
        keep = mask.reshape(-1).bool()
        for i in range(len(layers)):
            a = hidden[i].reshape(-1, hidden[i].shape[-1])[keep].double()
            b = hidden[i + 1].reshape(-1, hidden[i + 1].shape[-1])[keep].double()
            cos = torch.nn.functional.cosine_similarity(a, b, dim=-1).clamp(-1, 1)
            sums[i] += (torch.arccos(cos) / math.pi).sum()
        tokens += int(keep.sum())
    return (sums / tokens).tolist()


def remove_blocks(model, calibration, budget: int, batch_size: int) -> list[int]:
    """Drop the most redundant blocks until the parameter count is at most `budget`; returns them."""
    import slicegpt

    scores = block_distances(model, calibration, batch_size)
    layers = model.model.layers
    order = sorted(range(len(layers)), key=lambda i: scores[i])
    per_block = sum(p.numel() for p in layers[0].parameters())
    dense = slicegpt.count_parameters(model)
    drop = sorted(order[:max(0, math.ceil((dense - budget) / per_block))])
    keep = [i for i in range(len(layers)) if i not in drop]
    model.model.layers = torch.nn.ModuleList(layers[i] for i in keep)
    for new, layer in enumerate(model.model.layers):
        if hasattr(layer.self_attn, "layer_idx"):
            layer.self_attn.layer_idx = new
    config = model.config
    if getattr(config, "layer_types", None):
        config.layer_types = [config.layer_types[i] for i in keep]
    config.num_hidden_layers = len(keep)
    return drop


def child(args) -> dict:
    import slicegpt
    from slicegpt.evaluation.measure import measure

    torch.set_num_threads(args.threads) if args.threads else None
    model, tokenizer, calibration = _load(args)
    windows = evaluation(tokenizer, args)
    floor = dense_floor(model, calibration, args.batch_size).seconds
    if args.child == "dense":
        return {"floor_seconds": floor, "perplexity": slicegpt.perplexity(model, windows, progress=False),
                "parameters": slicegpt.count_parameters(model)}
    size, name = args.child.split("/", 1)
    size = float(size)
    if name == "shortgpt":
        budget = int(size * slicegpt.count_parameters(model))
        with measure() as m, torch.no_grad():
            dropped = remove_blocks(model, calibration, budget, args.batch_size)
        model.config.use_cache = False
        return {"perplexity": slicegpt.perplexity(model, windows, progress=False), "seconds": m.seconds,
                "parameters": slicegpt.count_parameters(model), "dropped": dropped, "floor_seconds": floor}
    options = {**row_settings(name), "size": size}
    if args.ridge is not None:
        options["ridge"] = args.ridge
    with measure() as m:
        model, config = slicegpt.slice_model(model, tokenizer, calibration, batch_size=args.batch_size,
                                             progress=False, **options)
    return {"perplexity": slicegpt.perplexity(model, windows, progress=False), "seconds": m.seconds,
            "parameters": config.parameters_sliced, "widths": config.widths, "compensation": config.compensation,
            "mlp_neurons": config.mlp_neurons, "mlp_neurons_per_layer": config.mlp_neurons_per_layer,
            "attention_heads": config.attention_heads, "floor_seconds": floor}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_data_arguments(p)
    p.add_argument("--sizes", default="0.9,0.8,0.65,0.5", help="shares of the dense parameters to keep")
    p.add_argument("--rows", default="paper,compensation,adaptive widths,stream sliced,default,shortgpt",
                   help=f"comma-separated, from: {', '.join(ROWS)}, default + heads GxR, default + neurons F")
    p.add_argument("--threads", type=int, default=0)
    p.add_argument("--ridge", type=float, default=None, help="compensation's ridge (default: the recipe's)")
    p.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child:
        print(json.dumps(child(args)))
        return
    rows = [r.strip() for r in args.rows.split(",")]
    unknown = [r for r in rows if r not in ROWS and not HEADS_ROW.fullmatch(r) and not NEURONS_ROW.fullmatch(r)]
    if unknown:
        p.error(f"unknown rows: {', '.join(unknown)}")

    def run(which: str) -> dict:
        done = subprocess.run([sys.executable, __file__, "--child", which] + sys.argv[1:], capture_output=True,
                              text=True)
        if done.returncode:  # a row the recipe refuses (e.g. nothing to rotate) is reported, not fatal
            return {"error": (done.stderr.strip().splitlines() or ["failed"])[-1].split("SliceGPTError: ")[-1]}
        return json.loads(done.stdout.strip().splitlines()[-1])

    started = time.time()
    dense = run("dense")
    print(f"model {args.model}; calibration {args.samples} x {args.seqlen} tokens of {args.data}; perplexity on "
          f"{args.eval_samples} x {args.eval_seqlen} held-out tokens; dense perplexity {dense['perplexity']:.2f}, "
          f"{dense['parameters'] / 1e6:.1f}M parameters; floor {dense['floor_seconds']:.1f} s\n", flush=True)
    print("| size | row | ppl | params | x dense | slicing s | x floor |")
    print("|---|---|---|---|---|---|---|", flush=True)
    results = []
    for size in (float(s) for s in args.sizes.split(",")):
        for name in rows:
            r = run(f"{size}/{name}")
            results.append({"size": size, "row": name, **r})
            if "error" in r:
                print(f"| {size:g} | {name} | refused: {r['error']} | | | | |", flush=True)
                continue
            label = f"ShortGPT (drop {len(r['dropped'])} blocks: {r['dropped']})" if name == "shortgpt" else name
            print(f"| {size:g} | {label} | {r['perplexity']:.2f} | {r['parameters'] / 1e6:.1f}M | "
                  f"{r['parameters'] / dense['parameters']:.3f} | {r['seconds']:.1f} | "
                  f"{r['seconds'] / r['floor_seconds']:.2f} |", flush=True)
    print(f"\n(total {time.time() - started:.0f} s)")
    save_results(f"quality-{args.model}", {"dense": dense, "rows": results,
                                            "seconds": round(time.time() - started)})


if __name__ == "__main__":
    main()
