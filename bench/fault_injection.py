"""Kill `slicegpt slice` with SIGKILL at durability points chosen at random, then run the same command again.

Every write, fsync and rename of a run (shards, state, activation snapshots, the progress record,
publishing) is a durability point (`slicegpt.atomic.fault_point`); so is the end of every
checkpoint. An uninterrupted run counts them (and gives the reference output); then, for each
point drawn (seeded), the command is killed there (a write in progress is cut to half its bytes
first) and run again. Each outcome is one of:

- resumed: the rerun finished with an output byte-identical to the reference's (the run record
  `slicegpt.json` differs only in measured times and memory, as between any two runs);
- refused: the rerun ended in one `slicegpt: error:` line naming --restart;
- published: the kill came after the output was complete at --out (identical to the reference),
  and the rerun refused to overwrite it;
- BAD: anything else (a different or missing output, a traceback, another error).

    .venv/bin/python bench/fault_injection.py --points 200 --seed 0

The points are shared among the runs; a run with fewer points than its share has each tried once.

Prints one line per point and the counts; exits non-zero when any outcome is BAD.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
TEXT_FILE = ROOT / "tests" / "data" / "tempest_excerpt.txt"
# the stream sliced with compensation, activations on disk (their snapshots are hard links), and
# the default recipe's stock output, and one rotation for all layers (a stock output with the stream
# sliced, activations in memory): between them every kind of write a resume depends on
RUNS = {
    "per-layer": ["--slicing", "0.25", "--neurons", "off", "--activations-dir", "{work}/acts"],
    "default": ["--size", "0.8"],
    "uniform": ["--slicing", "0.25", "--neurons", "off", "--rotation", "uniform"],
}
CALIBRATE = ["--calibration", str(TEXT_FILE), "--samples", "8", "--seqlen", "64", "--eval-samples", "2"]


def make_source(path: Path) -> Path:
    """A tiny random Llama with its tokenizer (the tests' model)."""
    sys.path.insert(0, str(ROOT / "tests"))
    from conftest import TEXT, make_model

    from slicegpt.testing import train_tokenizer

    make_model("llama").save_pretrained(path)
    train_tokenizer(TEXT).save_pretrained(path)
    return path


def slice_command(source: Path, out: Path, run: str, work: Path) -> list[str]:
    args = [a.format(work=work) for a in RUNS[run]]
    return [sys.executable, "-m", "slicegpt", "slice", str(source), *args, *CALIBRATE, "--out", str(out)]


def _run(command: list[str], env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(command, capture_output=True, text=True, timeout=900,
                          env={**os.environ, "HF_HUB_OFFLINE": "1", **(env or {})})


def _files(directory: Path) -> dict[str, bytes]:
    return {p.relative_to(directory).as_posix(): p.read_bytes() for p in sorted(directory.rglob("*")) if p.is_file()}


def same_output(a: Path, b: Path) -> bool:
    """Byte-equal files; slicegpt.json equal but for what it measured (time, memory, the resume)."""
    if not a.is_dir() or not b.is_dir():
        return False
    fa, fb = _files(a), _files(b)
    if set(fa) != set(fb) or any(fa[n] != fb[n] for n in fa if n != "slicegpt.json"):
        return False
    ma, mb = json.loads(fa["slicegpt.json"]), json.loads(fb["slicegpt.json"])
    keys = ("perplexity_dense", "perplexity_sliced", "parameters_sliced")
    return ma["slicing"] == mb["slicing"] and ma["files"] == mb["files"] and all(
        ma["results"].get(k) == mb["results"].get(k) for k in keys)


def reference(source: Path, run: str, work: Path) -> tuple[Path, list[str]]:
    """The uninterrupted run's output and the names of its durability points, in order."""
    log = work / "points.log"
    out = work / "reference"
    done = _run(slice_command(source, out, run, work / "ref"), {"SLICEGPT_TEST_FAULTS": str(log)})
    if done.returncode != 0:
        raise SystemExit(f"the uninterrupted run failed:\n{done.stderr}")
    points = [line.strip() for line in log.read_text().splitlines()]
    log.unlink()
    return out, points


def _one_line_error(result: subprocess.CompletedProcess) -> str | None:
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    if result.returncode == 0 or "Traceback" in result.stderr or not lines:
        return None
    last = lines[-1]
    return last if last.startswith("slicegpt: error: ") and sum("error" in x.lower() for x in lines) == 1 else None


def try_point(source: Path, run: str, n: int, ref: Path, work: Path) -> tuple[str, str]:
    """Kill the run at point `n`, run it again; (outcome, detail)."""
    out = work / "out"
    command = slice_command(source, out, run, work)
    killed = _run(command, {"SLICEGPT_TEST_FAULTS": str(work / "points.log"), "SLICEGPT_TEST_FAULT_AT": str(n)})
    if killed.returncode != -9:
        return "BAD", f"the run was not killed (exit status {killed.returncode}): {killed.stderr[-300:]}"
    if out.exists() and not same_output(ref, out):
        return "BAD", "a published output differs from the reference"
    again = _run(command)
    if again.returncode == 0:
        return ("resumed", "") if same_output(ref, out) else ("BAD", "the resumed output differs")
    error = _one_line_error(again)
    if error and "--restart" in error:
        return "refused", error
    if error and "already exists" in error and same_output(ref, out):
        return "published", error
    return "BAD", (error or again.stderr[-500:])


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--points", type=int, default=200, help="points to try, shared among the runs")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--runs", nargs="+", default=sorted(RUNS), choices=sorted(RUNS))
    args = p.parse_args()
    rng = random.Random(args.seed)
    outcomes: Counter = Counter()
    start = time.time()
    with tempfile.TemporaryDirectory(prefix="slicegpt-faults-") as scratch:
        source = make_source(Path(scratch) / "dense")
        for r, run in enumerate(args.runs):
            base = Path(scratch) / run
            base.mkdir()
            ref, points = reference(source, run, base)
            share = args.points // len(args.runs) + (r < args.points % len(args.runs))
            chosen = sorted(rng.sample(range(1, len(points) + 1), min(share, len(points))))
            print(f"{run}: {len(points)} durability points in an uninterrupted run; trying {len(chosen)}", flush=True)
            for n in chosen:
                work = base / f"point-{n}"
                work.mkdir()
                outcome, detail = try_point(source, run, n, ref, work)
                outcomes[outcome] += 1
                print(f"  {run} point {n:4d} ({points[n - 1]}): {outcome}{': ' + detail if detail else ''}", flush=True)
                shutil.rmtree(work, ignore_errors=True)
    total = sum(outcomes.values())
    print(f"{total} points in {(time.time() - start) / 60:.1f} min: " +
          ", ".join(f"{k} {outcomes[k]}" for k in ("resumed", "refused", "published", "BAD")))
    return 1 if outcomes["BAD"] else 0


if __name__ == "__main__":
    sys.exit(main())
