"""Benchmark: speed where models run: sliced against dense in PyTorch and in llama.cpp,
each speedup next to the most it could be.

A model is sliced by `slicegpt slice --no-eval` (each output in a fresh process) with the default recipe and
the paper's (`--recipe paper --size F`) at each `--sizes` budget (`--recipes default-equal` adds the default
recipe with `--allocation equal`: one neuron count in every layer, against the default's own count per layer),
then every output is measured against the dense model where it would run:

- PyTorch: `slicegpt bench DIR --compare DENSE --json`, prefill and decode at batch 1 and 8, a 128-token
  prompt, dense and sliced in turns, both loaded in `--dtype` (float32).
- llama.cpp: `slicegpt export` of the dense model and of each stock output as f16, q8_0 and q4_0 GGUF, then
  `slicegpt bench SLICED.gguf --compare DENSE.gguf --json` (batch 1, the same prompt); an output whose MLPs
  differ in width is written as llama.cpp's `deci` architecture (llama, qwen2, mistral). Per-layer outputs
  (the paper recipe, the default one at small sizes: a matrix on every skip connection) have no GGUF form and
  are measured in PyTorch only; their rows say so.

The limits each speedup stands beside: generation (decode) reads every weight once per token, so its limit
is the ratio of the bytes read per decoded token (dense / sliced; PyTorch: the checkpoints' tensors, every
one but an input embedding that is not also the head, both in one dtype; llama.cpp: the file sizes, from
`evaluation.speed.gguf_limits`). Prompt processing (prefill) is arithmetic, so its limit is the ratio of the
weight multiply-adds per prompt token (PyTorch: every matrix but the embedding, skip-connection matrices
included, the head once per prompt since only the last position's logits are computed; llama.cpp:
`gguf_limits`, which leaves the output head out). Attention over the prompt is left out
of both. The targets are marked met or not: llama.cpp generation speedup >= 0.9 x its bytes ratio,
and PyTorch prefill speedup >= 0.9 x its multiply-add ratio on the compute-bound model (`random-llama`).

`--model random-llama` writes a random-weight Llama (slicegpt.testing.write_random_llama: 12 layers,
hidden 2048, MLP 5632, 16 query and 4 key/value heads, 0.74 B parameters with the embedded model's
49,152-token vocabulary and tokenizer) into --work; its slicing calibrates on 8 x 512 tokens (random weights:
the calibration only has to meet the size, the speed depends on the shapes). Outputs already in --work are
reused (a rerun measures again without slicing again); the raw figures go to
bench/results/deploy_speed-<model>-<date>-<commit>.json.

    .venv/bin/python bench/deploy_speed.py --work out/deploy-default                  # embedded SmolLM2-135M
    .venv/bin/python bench/deploy_speed.py --quick --work out/deploy-default          # 0.8, default recipe, 1 repeat
    .venv/bin/python bench/deploy_speed.py --model random-llama --work out/deploy-random --threads 2
    .venv/bin/python bench/deploy_speed.py --skip-llama-cpp --sizes 0.8,0.5 --recipes default
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import math
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from common import same_model, save_results  # bench/common.py

SIZES = (0.9, 0.8, 0.65, 0.5)
RECIPES = ("default", "paper")
# rows beyond the recipes: a name -> (recipe, extra `slicegpt slice` flags, the allocation it records)
VARIANTS = {"default": ("default", (), None), "paper": ("paper", (), None),
            "default-equal": ("default", ("--allocation", "equal"), "equal")}  # one neuron count in every layer
GGUF_TYPES = ("f16", "q8_0", "q4_0")
PROMPT = 128
BATCHES = (1, 8)
TARGET = 0.9  # the targets: this share of each limit
RANDOM_LLAMA = dict(layers=12, hidden=2048, intermediate=5632, heads=16, kv_heads=4)
RANDOM_CALIBRATION = (8, 512)  # samples, seqlen
PER_LAYER_NOTE = "per-layer output (skip-connection matrices): PyTorch only, GGUF holds stock models"


class Failed(Exception):
    """A `slicegpt` command that failed: its last line of stderr."""


def slicegpt_cli(*args: str) -> dict:
    """One `slicegpt` command in a fresh process (the slicegpt this script imports), its --json figures."""
    src = Path(importlib.util.find_spec("slicegpt").origin).parents[1]
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(p for p in (str(src), os.environ.get("PYTHONPATH")) if p))
    done = subprocess.run([sys.executable, "-m", "slicegpt", *args, "--json"], capture_output=True, text=True, env=env)
    if done.returncode:
        lines = done.stderr.strip().splitlines() or [f"exit status {done.returncode}"]
        raise Failed(f"slicegpt {args[0]}: {lines[-1]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def step(what: str, run, *args):
    """`run(*args)` with progress lines on stderr (these runs take minutes to hours)."""
    start = time.perf_counter()
    print(f"{what} ...", file=sys.stderr, flush=True)
    result = run(*args)
    reused = isinstance(result, dict) and result.get("reused")
    print(f"{what}: {'reused from --work' if reused else f'{time.perf_counter() - start:.0f} s'}", file=sys.stderr,
          flush=True)
    return result


# ---------------------------------------------------------------------------------------------
# The limits in PyTorch, from a checkpoint's tensor shapes (transformers names, Llama-style)

def tensor_shapes(directory: Path) -> dict[str, tuple[int, ...]]:
    """Every tensor's shape in a safetensors checkpoint directory, read from the headers only."""
    from safetensors import safe_open

    shapes = {}
    for file in sorted(Path(directory).glob("*.safetensors")):
        with safe_open(str(file), "pt") as f:
            shapes.update({name: tuple(f.get_slice(name).get_shape()) for name in f.keys()})
    if not shapes:
        raise SystemExit(f"{directory} holds no .safetensors weights")
    return shapes


def per_token(shapes: dict[str, tuple[int, ...]], prompt: int = PROMPT) -> dict[str, float]:
    """What one token costs a model with these tensors.

    `read`: weight elements read per decoded token: every tensor but an input embedding that is not also
    the head (a lookup reads one row). `multiply_adds`: per prompt token: every matrix but the embedding,
    the head once per prompt of `prompt` tokens (prefill computes the last position's logits only).
    """
    embedding = next((n for n in shapes if n.endswith("embed_tokens.weight")), None)
    if embedding is None:
        raise SystemExit("no embed_tokens.weight among the tensors: this benchmark counts Llama-style checkpoints")
    head = "lm_head.weight" if "lm_head.weight" in shapes else embedding  # tied: the embedding is the head
    size = {name: math.prod(shape) for name, shape in shapes.items()}
    read = sum(size.values()) - (size[embedding] if head != embedding else 0)
    matrices = sum(n for name, n in size.items() if len(shapes[name]) >= 2 and name not in (embedding, head))
    return {"read": read, "multiply_adds": matrices + size[head] / prompt}


def torch_limits(dense: dict[str, float], sliced: dict[str, float]) -> dict[str, float]:
    """decode: bytes read per token (elements, at one dtype); prefill: multiply-adds per prompt token."""
    return {"decode": dense["read"] / sliced["read"], "prefill": dense["multiply_adds"] / sliced["multiply_adds"]}


# ---------------------------------------------------------------------------------------------
# Rows and the table

def target_applies(engine: str, phase: str, compute_bound: bool) -> bool:
    """The targets: llama.cpp generation against its bytes ratio; PyTorch prefill against its
    multiply-add ratio, on a compute-bound model."""
    return (engine == "llama.cpp" and phase == "decode") or (engine == "PyTorch" and phase == "prefill"
                                                              and compute_bound)


def row(output: dict, engine: str, kind: str, phase: str, batch: int, speedup: float, limit: float,
        compute_bound: bool, best: float | None = None) -> dict:
    ratio = speedup / limit
    return {"output": output["label"], "stock": output["stock"], "layout": output.get("layout"),
            "parameter_ratio": output["parameter_ratio"], "engine": engine, "kind": kind, "phase": phase, "batch": batch, "speedup": speedup, "best": best,
            "limit": limit, "limit_of": "multiply-adds" if phase == "prefill" else "bytes", "ratio": ratio,
            "target_met": ratio >= TARGET if target_applies(engine, phase, compute_bound) else None, "note": ""}


def note_row(output: dict, engine: str, kind: str, note: str) -> dict:
    return {"output": output["label"], "stock": output["stock"], "layout": output.get("layout"),
            "parameter_ratio": output["parameter_ratio"], "engine": engine, "kind": kind, "phase": None, "batch": None, "speedup": None, "best": None, "limit": None,
            "limit_of": None, "ratio": None, "target_met": None, "note": note}


def bench_rows(output: dict, record: dict, engine: str, kind: str, limits: dict[str, float],
               compute_bound: bool) -> list[dict]:
    """The sliced model's rows of a `slicegpt bench --json` record, each with its limit and, where the record
    has every turn's time (llama.cpp), the speedup of the fastest turns (dense's over sliced's): on a busy or
    small machine the median carries the noise of the slower turns."""
    return [row(output, engine, kind, r["phase"], r["batch"], r["speedup"], limits[r["phase"]], compute_bound,
                best_turn(record["rows"], r)) for r in record["rows"] if r["role"] == "sliced"]


def best_turn(rows: list[dict], sliced: dict) -> float | None:
    """min(dense turn seconds) / min(sliced turn seconds) for the sliced row's setting, None without turns."""
    dense = [r for r in rows if r["role"] == "dense" and (r["phase"], r["batch"], r.get("seqlen"))
             == (sliced["phase"], sliced["batch"], sliced.get("seqlen"))]
    if not dense or not dense[0].get("seconds") or not sliced.get("seconds"):
        return None
    return min(dense[0]["seconds"]) / min(sliced["seconds"])


def layout_name(slicing: dict) -> str:
    """How an output is laid out, as the table names it."""
    if slicing.get("standard"):
        return "stock"
    if slicing.get("rotation") == "per-layer":  # the stream sliced with a basis per layer (skip matrices)
        return "per-layer, own MLP widths" if slicing.get("mlp_neurons_per_layer") else "per-layer"
    return "own MLP widths" if slicing.get("mlp_neurons_per_layer") else "per-layer"


def has_gguf_form(slicing: dict) -> bool:
    """Whether GGUF holds the output: a stock model, or the family's layers with their own MLP widths
    (not a stream sliced per layer, whose skip matrices no llama.cpp graph has)."""
    return bool(slicing.get("standard") or (slicing.get("mlp_neurons_per_layer")
                                            and slicing.get("rotation") != "per-layer"))


def table(rows: list[dict]) -> str:
    """The markdown table: each speedup beside its limit, the ratio, and the target where one applies."""
    lines = ["| output | parameters (x dense) | engine | phase | batch | speedup | best turn | limit | speedup / limit | "
             f"target (>= {TARGET} x limit) | note |", "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        name = f"{r['output']} ({r.get('layout') or ('stock' if r['stock'] else 'per-layer')})"
        engine = f"{r['engine']} {r['kind']}".strip()
        if r["speedup"] is None:
            lines.append(f"| {name} | {r['parameter_ratio']:.3f} | {engine} | - | - | - | - | - | - | - | {r['note']} |")
            continue
        target = "-" if r["target_met"] is None else "met" if r["target_met"] else "**not met**"
        best = "-" if r.get("best") is None else f"{r['best']:.2f}x"
        lines.append(f"| {name} | {r['parameter_ratio']:.3f} | {engine} | {r['phase']} | {r['batch']} | "
                     f"{r['speedup']:.2f}x | {best} | {r['limit']:.2f}x {r['limit_of']} | {r['ratio']:.2f} | {target} | "
                     f"{r['note']} |")
    return "\n".join(lines)


def targets_summary(rows: list[dict]) -> list[str]:
    lines = []
    for engine, phase, what in (("llama.cpp", "decode", "llama.cpp generation >= 0.9 x bytes ratio"),
                                ("PyTorch", "prefill", "PyTorch prefill >= 0.9 x multiply-add ratio")):
        marked = [r["target_met"] for r in rows if (r["engine"], r["phase"]) == (engine, phase)
                  and r["target_met"] is not None]
        lines.append(f"{what}: {sum(marked)} of {len(marked)} rows met" if marked else
                     f"{what}: no row measured" + (" (the target is on the compute-bound model, random-llama)"
                                                   if engine == "PyTorch" else ""))
    return lines


# ---------------------------------------------------------------------------------------------
# The models: dense, sliced outputs and GGUF files, each reused from --work when already there

def dense_model(model: str, work: Path) -> tuple[str, Path]:
    """(what `slicegpt` commands get for the dense model, its safetensors directory)."""
    from slicegpt.formats.loading import checkpoint_directory

    if model == "default":
        return "default", checkpoint_directory("default")[0]
    if model == "random-llama":
        path = step("writing the random-weight Llama", random_llama, work / "random-llama")
        return str(path), path
    path = Path(model).resolve()
    return str(path), checkpoint_directory(path)[0]


def random_llama(path: Path) -> Path:
    """The random-weight Llama of RANDOM_LLAMA with the embedded model's tokenizer, written once (renamed
    into place whole, so an interrupted write is redone)."""
    if (path / "model.safetensors.index.json").is_file():
        config = json.loads((path / "config.json").read_text())
        if (config["num_hidden_layers"], config["hidden_size"]) == (RANDOM_LLAMA["layers"], RANDOM_LLAMA["hidden"]):
            return path
        raise SystemExit(f"{path} holds another random Llama; remove it or give another --work")
    from transformers import AutoTokenizer

    from slicegpt.formats.loading import checkpoint_directory
    from slicegpt.testing import write_random_llama

    tokenizer = AutoTokenizer.from_pretrained(checkpoint_directory("default")[0])
    partial = path.with_name(path.name + ".partial")
    shutil.rmtree(partial, ignore_errors=True)
    write_random_llama(partial, tokenizer=tokenizer, vocab=len(tokenizer), **RANDOM_LLAMA)
    partial.rename(path)
    return path


def sliced_output(dense: str, recipe: str, size: float, out: Path, calibration: list[str]) -> dict:
    """The output of `slicegpt slice DENSE --recipe R --size F`, sliced now or found in --work; its
    `slicing` record plus how long slicing took (None: reused)."""
    seconds = None
    reused = (out / "slicegpt.json").is_file()  # outputs are written whole or not at all
    recipe, flags, allocation = VARIANTS[recipe]
    if not reused:
        start = time.perf_counter()
        slicegpt_cli("slice", dense, "--recipe", recipe, "--size", str(size), "--out", str(out), "--no-eval",
                     *flags, *calibration)
        seconds = time.perf_counter() - start
    slicing = json.loads((out / "slicegpt.json").read_text())["slicing"]
    if (slicing.get("recipe"), slicing.get("size")) != (recipe, size) or not same_model(
            slicing.get("source_model", ""), dense) or (allocation and slicing.get("allocation") != allocation):
        held, wanted = ((f" (allocation {slicing.get('allocation')})", f" (allocation {allocation})")
                        if allocation else ("", ""))
        raise SystemExit(f"{out} holds {slicing.get('recipe')} at {slicing.get('size')}{held} of "
                         f"{slicing.get('source_model')}, not {recipe} at {size}{wanted} of {dense}: remove it or "
                         f"give another --work")
    return dict(slicing, slicing_seconds=seconds, reused=reused)


def gguf_file(source: str, marker: Path | None, dtype: str, out: Path) -> dict:
    """`slicegpt export SOURCE --dtype T` to `out`, or the file already there when it is newer than `marker`
    (the source's record: a re-sliced output is exported again)."""
    if out.is_file() and (marker is None or out.stat().st_mtime >= marker.stat().st_mtime):
        return {"out": str(out), "bytes": out.stat().st_size, "reused": True}
    out.parent.mkdir(parents=True, exist_ok=True)
    return dict(slicegpt_cli("export", source, "--dtype", dtype, "--out", str(out), "--force"), reused=False)


# ---------------------------------------------------------------------------------------------

def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="default",
                   help="default (the embedded SmolLM2-135M), random-llama (a compute-bound 0.74 B random-weight "
                        "Llama, written into --work) or a dense Llama directory")
    p.add_argument("--sizes", default=",".join(map(str, SIZES)),
                   help="budgets, comma-separated (slicegpt slice --size)")
    p.add_argument("--recipes", default=",".join(RECIPES),
                   help="default, paper and/or default-equal (the default recipe with --allocation equal: one neuron "
                        "count per layer, a stock model), comma-separated")
    p.add_argument("--threads", type=int, default=None, help="CPU threads of both engines (default: theirs; see "
                   "slicegpt bench --threads)")
    p.add_argument("--repeats", type=int, default=3, help="measurements per setting (the median is used)")
    p.add_argument("--decode-tokens", type=int, default=32, help="tokens generated per decode measurement")
    p.add_argument("--dtype", default="float32", help="PyTorch: the dtype both models are measured in")
    p.add_argument("--gguf-types", default=",".join(GGUF_TYPES), help="GGUF types exported for llama.cpp")
    p.add_argument("--samples", type=int, default=None, help="calibration windows for slicing (default: slicegpt "
                   f"slice's 32; random-llama: {RANDOM_CALIBRATION[0]})")
    p.add_argument("--seqlen", type=int, default=None, help="tokens per calibration window (default: slicegpt "
                   f"slice's 1024; random-llama: {RANDOM_CALIBRATION[1]})")
    p.add_argument("--skip-llama-cpp", action="store_true", help="PyTorch only: no GGUF export, no llama.cpp")
    p.add_argument("--work", default=None, help="where the dense model, outputs and GGUF files go, kept and reused "
                   "by the next run (default: a temporary directory, removed at the end)")
    p.add_argument("--quick", action="store_true", help="one size (0.8), the default recipe, one repeat")
    args = p.parse_args(argv)
    sizes = [0.8] if args.quick else [float(s) for s in args.sizes.split(",")]
    recipes = ["default"] if args.quick else args.recipes.split(",")
    repeats = 1 if args.quick else args.repeats
    types = args.gguf_types.split(",")
    if unknown := set(recipes) - set(VARIANTS):
        p.error(f"unknown recipe {sorted(unknown)[0]!r}: choose from {', '.join(VARIANTS)}")
    if work := args.work:
        Path(work).mkdir(parents=True, exist_ok=True)
        return measure(args, Path(work), sizes, recipes, repeats, types)
    with tempfile.TemporaryDirectory(prefix="deploy-speed-") as work:
        return measure(args, Path(work), sizes, recipes, repeats, types)


def measure(args, work: Path, sizes: list[float], recipes: list[str], repeats: int, types: list[str]) -> dict:
    from slicegpt.formats.llama_cpp import node_llama_cpp

    started = time.perf_counter()
    name = args.model if args.model in ("default", "random-llama") else Path(args.model).name
    compute_bound = args.model == "random-llama"
    samples, seqlen = args.samples, args.seqlen
    if compute_bound:
        samples, seqlen = samples or RANDOM_CALIBRATION[0], seqlen or RANDOM_CALIBRATION[1]
    calibration = [*(["--samples", str(samples)] if samples else []), *(["--seqlen", str(seqlen)] if seqlen else [])]
    threads = ["--threads", str(args.threads)] if args.threads else []
    timing = ["--repeats", str(repeats), "--decode-tokens", str(args.decode_tokens), "--seqlens", str(PROMPT)]
    llama_cpp = "skipped (--skip-llama-cpp)" if args.skip_llama_cpp else (
        None if node_llama_cpp() else "not installed (bash scripts/llama_cpp_setup.sh installs it)")

    dense, dense_dir = dense_model(args.model, work)
    dense_cost = per_token(tensor_shapes(dense_dir))
    outputs = []
    for recipe in recipes:
        for size in sizes:
            label = f"{recipe} {size:g}"
            out = work / f"{recipe}-{size:g}"
            try:
                slicing = step(f"slicing {label}", sliced_output, dense, recipe, size, out, calibration)
            except Failed as e:
                outputs.append({"label": label, "recipe": recipe, "size": size, "error": str(e)})
                continue
            outputs.append({"label": label, "recipe": recipe, "size": size, "dir": str(out),
                            "stock": has_gguf_form(slicing),
                            "layout": layout_name(slicing), "slicing": slicing,
                            "parameter_ratio": slicing["parameters_sliced"] / slicing["parameters_dense"]})

    rows: list[dict] = []
    dense_gguf: dict[str, dict] = {}
    for output in outputs:
        if "error" in output:
            print(f"{output['label']}: {output['error']}", file=sys.stderr)
            continue
        out = Path(output["dir"])
        cost = per_token(tensor_shapes(out))
        output["per_token"] = {"dense": dense_cost, "sliced": cost}
        output["torch_limits"] = limits = torch_limits(dense_cost, cost)
        try:
            record = step(f"PyTorch {output['label']}", slicegpt_cli, "bench", str(out), "--compare", dense,
                          "--batch-sizes", ",".join(map(str, BATCHES)), "--dtype", args.dtype, *timing, *threads)
            output["torch"] = record
            rows += bench_rows(output, record, "PyTorch", args.dtype, limits, compute_bound)
        except Failed as e:
            output["torch"] = {"error": str(e)}
            rows.append(note_row(output, "PyTorch", args.dtype, str(e)))
        if llama_cpp:
            continue
        if not output["stock"]:
            rows.append(note_row(output, "llama.cpp", "", PER_LAYER_NOTE))
            continue
        output["gguf"] = {}
        for dtype in types:
            try:
                if dtype not in dense_gguf:
                    dense_gguf[dtype] = step(f"GGUF dense {dtype}", gguf_file, dense, None, dtype,
                                             work / "gguf" / f"dense-{dtype}.gguf")
                sliced = step(f"GGUF {output['label']} {dtype}", gguf_file, str(out), out / "slicegpt.json", dtype,
                              work / "gguf" / f"{out.name}-{dtype}.gguf")
                record = step(f"llama.cpp {output['label']} {dtype}", slicegpt_cli, "bench", sliced["out"],
                              "--compare", dense_gguf[dtype]["out"], *timing, *threads)
            except Failed as e:
                output["gguf"][dtype] = {"error": str(e)}
                rows.append(note_row(output, "llama.cpp", dtype, str(e)))
                continue
            output["gguf"][dtype] = {"dense": dense_gguf[dtype], "sliced": sliced, "bench": record}
            rows += bench_rows(output, record, "llama.cpp", dtype, record["limits"], compute_bound)

    print(f"model {args.model} (dense: {dense}); prompt {PROMPT} tokens, {args.decode_tokens} decoded; median of "
          f"{repeats}; threads {args.threads or 'default'}; llama.cpp {llama_cpp or 'measured'}")
    print("limits: decode = bytes read per token (dense / sliced), prefill = weight multiply-adds per prompt token")
    print(table(rows))
    for line in targets_summary(rows):
        print(line)
    failed = [o for o in outputs if "error" in o]
    for o in failed:
        print(f"{o['label']}: not measured: {o['error']}")
    seconds = time.perf_counter() - started
    print(f"(total {seconds:.0f} s)")
    data = {"model": args.model, "dense": dense, "compute_bound": compute_bound, "sizes": sizes, "recipes": recipes,
            "threads": args.threads, "repeats": repeats, "decode_tokens": args.decode_tokens, "prompt": PROMPT,
            "batches": list(BATCHES), "dtype": args.dtype, "gguf_types": types, "llama_cpp": llama_cpp or "measured",
            "target": TARGET, "work": str(work) if args.work else None, "outputs": outputs, "rows": rows,
            "seconds": round(seconds)}
    data["path"] = str(save_results(f"deploy_speed-{name}", data))
    return data


if __name__ == "__main__":
    main()
