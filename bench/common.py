"""What the slicing benchmarks share: their data options and the held-out evaluation windows."""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import subprocess
import sys
from pathlib import Path

import torch

RESULTS = Path(__file__).resolve().parent / "results"


def add_data_arguments(p: argparse.ArgumentParser) -> None:
    """Model, calibration and held-out evaluation options (the README tables' defaults)."""
    p.add_argument("--model", default="default")
    p.add_argument("--data", default="shakespeare")
    p.add_argument("--samples", type=int, default=32)
    p.add_argument("--seqlen", type=int, default=1024)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--eval-samples", type=int, default=16)
    p.add_argument("--eval-seqlen", type=int, default=1024)


def evaluation(tokenizer, args):
    """The held-out windows every row is measured on."""
    import slicegpt

    ids = slicegpt.tokenize(tokenizer, slicegpt.load_text(args.data, "evaluation"))
    return slicegpt.evaluation_windows(ids, args.eval_seqlen, args.eval_samples, bos=slicegpt.bos_token(tokenizer))


@torch.no_grad()
def dense_floor(model, calibration, batch_size: int):
    """The floor: one dense forward through the decoder over the calibration tokens (logits for the
    last position only: slicing never computes the head, and Gemma's 262k-entry vocabulary would
    dominate), after one untimed batch to warm up. Each sliced row times its own, in its process
    just before slicing: this machine's speed drifts by up to 1.7x between runs, so a ratio is
    only meaningful between two timings taken together. Returns a `Measurement`."""
    from slicegpt.evaluation.measure import measure

    batches = list(calibration.batches(batch_size))
    ids, mask = batches[0]
    model(input_ids=ids, attention_mask=mask, use_cache=False, logits_to_keep=1)
    with measure() as m:
        for ids, mask in batches:
            model(input_ids=ids, attention_mask=mask, use_cache=False, logits_to_keep=1)
    return m


def save_results(name: str, data: dict) -> Path:
    """Keep a run's raw figures as bench/results/<name>-<date>-<commit>.json, with what reproduces them:
    the command, the commit (and whether the tree had changes), the machine and the library versions."""
    import transformers

    import slicegpt

    root = Path(__file__).resolve().parent.parent
    git = lambda *a: subprocess.run(["git", *a], cwd=root, capture_output=True, text=True).stdout.strip()  # noqa: E731
    commit, dirty = git("rev-parse", "--short", "HEAD"), bool(git("status", "--porcelain", "--untracked-files=no"))
    date = datetime.date.today().isoformat()
    record = {"command": " ".join([Path(sys.executable).name, *sys.argv]), "date": date,
              "commit": commit + ("+changes" if dirty else ""),
              "machine": f"{platform.machine()}, {os.cpu_count()} cores, {platform.system()}",
              "torch": torch.__version__, "transformers": transformers.__version__,
              "slicegpt": slicegpt.__version__, **data}
    RESULTS.mkdir(exist_ok=True)
    path = RESULTS / f"{name}-{date}-{commit}.json"
    for n in range(2, 100):  # a second run the same day at the same commit keeps the first one's figures
        if not path.exists():
            break
        path = RESULTS / f"{name}-{date}-{commit}-{n}.json"
    path.write_text(json.dumps(record, indent=1) + "\n")
    print(f"raw figures: {path.relative_to(root) if path.is_relative_to(root) else path}")
    return path


def model_path(name: str) -> Path:
    """A model as a path: the embedded models' names ("default", "gemma3-270m") become their GGUF files."""
    from slicegpt.formats.loading import EMBEDDED_MODELS

    if name in EMBEDDED_MODELS and not Path(name).exists():
        return Path(EMBEDDED_MODELS[name]())
    return Path(name).expanduser()


def same_model(recorded: str, model: str) -> bool:
    """Whether a sliced output's recorded source_model is `model`: the same name or path, or the same
    embedded GGUF file installed elsewhere (a record names the file of the environment that sliced it)."""
    if not recorded:
        return False
    if recorded == model:
        return True
    a, b = model_path(recorded), model_path(model)
    if a.suffix == b.suffix == ".gguf" and a.name == b.name:
        return True
    return a.resolve() == b.resolve() if a.exists() and b.exists() else False
