"""Benchmark: the size/quality frontier of GGUF files, dense against sliced, measured in llama.cpp.

At one file size, is a pruned model better than a more quantized dense one? The dense model (`--model`)
and each sliced output (`--sliced`: slicegpt stock outputs of that model, several at once) are exported
at every `--types` GGUF type, each `slicegpt export` in its own process (its wall time includes loading
the model); a file's size and tensor types come from the file. Perplexity is llama.cpp's own
(node-llama-cpp's CPU build, scripts/llama_cpp_perplexity.mjs) on the same held-out windows for every
file (BOS first where the tokenizer starts with one), each window evaluated in one batch as llama.cpp's
own perplexity tool does (quantized files give slightly different figures token by token: other kernels).

It prints a table sorted by file size with the Pareto frontier marked (no other file is at most as large
and at most as perplexing), then one line saying where pruning+quantization is on the frontier and where
not. The raw figures go to bench/results/gguf_quant-<model>-<date>-<commit>.json (kind "gguf_frontier"),
which `slicegpt report` draws as a size/quality plot.

    slicegpt slice default --size 0.9 --no-eval --out out/default-0.9
    slicegpt slice default --size 0.8 --no-eval --out out/default-0.8
    .venv/bin/python bench/gguf_quant.py --sliced out/default-0.9,out/default-0.8 --work out/gguf-frontier
    slicegpt report bench/results/gguf_quant-default-DATE-COMMIT.json --out out/frontier-report
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from common import same_model, save_results  # bench/common.py

TYPES = ("f16", "q8_0", "q5_k_m", "q4_k_m", "q4_0")


def export(model: str, dtype: str, out: Path) -> dict:
    """One `slicegpt export` (the slicegpt this script imports) in a fresh process: its figures and wall time;
    {"error": its last line of stderr} when it fails."""
    src = Path(importlib.util.find_spec("slicegpt").origin).parents[1]
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(p for p in (str(src), os.environ.get("PYTHONPATH")) if p))
    start = time.perf_counter()
    done = subprocess.run([sys.executable, "-m", "slicegpt", "export", model, "--dtype", dtype, "--out", str(out),
                           "--force", "--json"], capture_output=True, text=True, env=env)
    if done.returncode:
        return {"error": (done.stderr.strip().splitlines() or [f"exit status {done.returncode}"])[-1]}
    return dict(json.loads(done.stdout.strip().splitlines()[-1]), seconds=time.perf_counter() - start)


def perplexities(files: list[Path], windows: list[list[int]], threads: int) -> dict[str, dict]:
    """llama.cpp's perplexity of each file on the windows, in one llama.cpp process: {file: its result}."""
    from slicegpt.formats.llama_cpp import run_node_script

    result = run_node_script("llama_cpp_perplexity.mjs", {"files": [str(f) for f in files], "windows": windows,
                                                          "threads": threads})
    return {r["file"]: r for r in result}


def sliced_output(directory: str, model: str) -> dict:
    """A stock output of `model`, described from its slicegpt.json; SystemExit (one line) otherwise."""
    path = Path(directory)
    manifest = path / "slicegpt.json"
    if not manifest.is_file():
        raise SystemExit(f"{directory} is not a slicegpt output directory (no slicegpt.json)")
    slicing = json.loads(manifest.read_text()).get("slicing") or {}
    source = str(slicing.get("source_model") or "")
    if not same_model(source, model):
        raise SystemExit(f"{directory} was sliced from {source or 'an unrecorded model'}, not from --model {model}: "
                         "every --sliced output must come from the dense model it is compared with")
    if not slicing.get("standard") and not slicing.get("mlp_neurons_per_layer"):
        raise SystemExit(f"{directory} is a per-layer output (a matrix on every skip connection), which GGUF cannot "
                         "hold: give stock outputs (the default recipe where MLP neurons alone meet the size, or "
                         "--rotation uniform)")
    recipe = slicing.get("recipe") or slicing.get("method") or "?"
    amount = (f"{slicing['size']:g}" if slicing.get("size") is not None
              else f"slicing {slicing.get('slicing') or slicing.get('sparsity', 0):g}")
    label = f"{recipe} {amount}"  # a stock output's rotation is uniform: not part of the label
    dense, sliced = slicing.get("parameters_dense"), slicing.get("parameters_sliced")
    return {"label": label, "dir": str(path), "recipe": recipe, "size": slicing.get("size"),
            "slicing": slicing.get("slicing"), "rotation": slicing.get("rotation"), "source_model": source,
            "parameters_dense": dense, "parameters_sliced": sliced,
            "parameter_ratio": sliced / dense if dense and sliced else None}


def unique_labels(outputs: list[dict]) -> None:
    """Two outputs with one label (one recipe and size, sliced twice) are told apart by their directory."""
    for output in outputs:
        if sum(o["label"] == output["label"] for o in outputs) > 1:
            output["label"] = f"{output['label']} ({Path(output['dir']).name})"
    seen = [o["label"] for o in outputs]
    if len(set(seen)) < len(seen):
        raise SystemExit(f"two --sliced outputs have one recipe, size and directory name ({', '.join(seen)}): "
                         "rename one")


def file_stem(label: str) -> str:
    """A label as part of a file name: "default 0.8" -> "default-0.8"."""
    return re.sub(r"[^\w.-]+", "-", label).strip("-")


def parse_list(values: list[str]) -> list[str]:
    """Repeatable and comma-separated: ["a,b", "c"] -> ["a", "b", "c"]."""
    return [v.strip() for value in values for v in value.split(",") if v.strip()]


def main(argv: list[str] | None = None) -> dict:
    import slicegpt
    from slicegpt.formats.gguf import DTYPES

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="default", help="the dense model: default (the embedded SmolLM2-135M), "
                   "gemma3-270m, a directory or a .gguf file; every --sliced output must be sliced from it")
    p.add_argument("--sliced", action="append", required=True, metavar="DIR[,DIR...]",
                   help="slicegpt stock outputs of --model (repeatable or comma-separated)")
    p.add_argument("--types", default=",".join(TYPES), help=f"GGUF types, comma-separated (any of {', '.join(DTYPES)})")
    p.add_argument("--data", default="shakespeare", help="held-out text (slicegpt's data sources)")
    p.add_argument("--eval-samples", type=int, default=4)
    p.add_argument("--eval-seqlen", type=int, default=128)
    p.add_argument("--threads", type=int, default=2, help="llama.cpp threads")
    p.add_argument("--work", default=None, help="where the GGUF files go, kept (default: a temporary directory, "
                   "removed at the end)")
    args = p.parse_args(argv)
    types = parse_list([args.types])
    if unknown := [t for t in types if t not in DTYPES]:
        p.error(f"unknown GGUF type {unknown[0]!r}: choose from {', '.join(DTYPES)}")
    try:
        given: dict[Path, str] = {}
        for d in parse_list(args.sliced):  # each output once, however spelled
            given.setdefault(Path(d).resolve(), d)
        outputs = [sliced_output(d, args.model) for d in given.values()]
    except slicegpt.SliceGPTError as e:  # an embedded model that is not installed
        raise SystemExit(str(e)) from None
    unique_labels(outputs)
    if args.work:
        Path(args.work).mkdir(parents=True, exist_ok=True)
        return measure(args, Path(args.work), types, outputs)
    with tempfile.TemporaryDirectory(prefix="gguf-quant-") as work:
        return measure(args, Path(work), types, outputs)


def measure(args, work: Path, types: list[str], outputs: list[dict]) -> dict:
    import slicegpt
    from slicegpt.evaluation.frontier import FRONTIER_KIND, mark_frontier, markdown_table, summary
    from slicegpt.formats.llama_cpp import node_llama_cpp_version
    from slicegpt.formats.loading import checkpoint_directory

    started = time.perf_counter()
    models = [{"label": "dense", "role": "dense", "source": args.model, "parameter_ratio": 1.0}]
    models += [{"label": o["label"], "role": "sliced", "source": o["dir"], "parameter_ratio": o["parameter_ratio"]}
               for o in outputs]
    rows, failed = [], []
    for m in models:
        for dtype in types:
            out = work / f"{file_stem(m['label'])}-{dtype}.gguf"
            print(f"export {m['label']} {dtype} ...", file=sys.stderr, flush=True)
            figures = export(m["source"], dtype, out)
            if "error" in figures:
                print(f"export {m['label']} {dtype}: {figures['error']}", file=sys.stderr, flush=True)
                failed.append({"model": m["label"], "type": dtype, "error": figures["error"]})
                continue
            rows.append({"model": m["label"], "role": m["role"], "parameter_ratio": m["parameter_ratio"],
                         "type": dtype, "bytes": figures["bytes"], "tensor_types": figures["tensor_types"],
                         "mlp_neurons_written": figures.get("mlp_neurons_written"),
                         "export_seconds": round(figures["seconds"], 1), "file": str(out)})
    if not rows:
        raise SystemExit("no file was exported: " + "; ".join(f"{f['model']} {f['type']}: {f['error']}"
                                                              for f in failed))
    try:
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(str(checkpoint_directory(args.model)[0]))
        ids = slicegpt.tokenize(tokenizer, slicegpt.load_text(args.data, "evaluation"))
        bos = slicegpt.bos_token(tokenizer)
        windows = slicegpt.evaluation_windows(ids, args.eval_seqlen, args.eval_samples, bos=bos).input_ids.tolist()
        print(f"llama.cpp perplexity of {len(rows)} files ...", file=sys.stderr, flush=True)
        measured = perplexities([Path(r["file"]) for r in rows], windows, args.threads)
    except slicegpt.SliceGPTError as e:  # llama.cpp not installed, an unreadable file, unknown data
        raise SystemExit(str(e)) from None
    for r in rows:
        result = measured.get(r["file"], {})
        r["perplexity"], r["tokens_scored"] = result.get("perplexity"), result.get("tokens")
    rows = mark_frontier(rows)
    line = summary(rows)

    name = args.model if not Path(args.model).exists() else Path(args.model).name
    print(f"model {args.model}; llama.cpp perplexity on {len(windows)} held-out {args.data} windows of "
          f"{args.eval_seqlen} tokens{' (BOS first)' if bos is not None else ''}; frontier: no other file is at "
          "most as large and at most as perplexing")
    print(markdown_table(rows))
    print(line)
    for f in failed:
        print(f"not measured: {f['model']} {f['type']}: {f['error']}")
    seconds = time.perf_counter() - started
    print(f"(total {seconds:.0f} s)")
    for r in rows:  # a temporary directory's paths mean nothing later
        r["file"] = r["file"] if args.work else Path(r["file"]).name
    data = {"kind": FRONTIER_KIND, "model": args.model, "types": types, "outputs": outputs,
            "evaluation": {"data": args.data, "samples": len(windows), "seqlen": args.eval_seqlen,
                           "bos": bos is not None},
            "llama_cpp": f"node-llama-cpp {node_llama_cpp_version()} (CPU build)", "threads": args.threads,
            "work": str(work) if args.work else None, "rows": rows, "failed": failed, "summary": line,
            "seconds": round(seconds)}
    data["path"] = str(save_results(f"gguf_quant-{name}", data))
    return data


if __name__ == "__main__":
    main()
