"""Write the golden numbers of every case in golden_cases.py (see test_golden.py for when).

    .venv/bin/python tests/make_golden.py                 # refuses while src/ or tests/ have uncommitted changes
    .venv/bin/python tests/make_golden.py --allow-dirty   # deliberately: record numbers of uncommitted code

Regenerating is deliberate: the numbers must come from committed code, so the run refuses (one
line, exit status 1) while `git status --porcelain -- src tests` lists anything other than the
golden files themselves; commit first, then regenerate, then commit the data saying why the
numbers moved. golden.json records the commit ("generated_with": "slicegpt_commit"), and
test_golden.py checks that it is an ancestor of HEAD.

It writes tests/data/golden.safetensors (per case: float64 logits at every 4th vocabulary column,
the logsumexp over the whole vocabulary, and the PCA spectra concatenated) and
tests/data/golden.json (per case: its definition, parameter counts, sliced width, tied head,
spectra lengths and the sliced state_dict's names and shapes; the cases slicegpt refuses, with
the message).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import torch  # noqa: E402
import transformers  # noqa: E402
from safetensors.torch import save_file  # noqa: E402

import golden_cases  # noqa: E402
from slicegpt.errors import SliceGPTError  # noqa: E402

GOLDEN_TENSORS = HERE / "data" / "golden.safetensors"
GOLDEN_JSON = HERE / "data" / "golden.json"
REPOSITORY = HERE.parent
GOLDEN_FILES = {f"tests/data/{GOLDEN_TENSORS.name}", f"tests/data/{GOLDEN_JSON.name}"}


def meta() -> dict:
    """The shared inputs; the test checks they are unchanged before comparing numbers."""
    g = golden_cases
    return {"weight_seed": g.WEIGHT_SEED, "calibration_seed": g.CALIBRATION_SEED, "eval_seed": g.EVAL_SEED,
            "calibration_shape": list(g.CALIBRATION_SHAPE), "eval_shape": list(g.EVAL_SHAPE),
            "logit_columns": [g.LOGIT_COLUMNS.start, g.LOGIT_COLUMNS.stop, g.LOGIT_COLUMNS.step]}


def source() -> dict:
    """Which slicegpt made the numbers: the git commit of the imported package, and whether its
    src/ differed from that commit (golden data should come from a clean, committed tree)."""
    import subprocess

    import slicegpt

    package = Path(slicegpt.__file__).resolve().parent

    def git(*args: str) -> str:
        try:
            return subprocess.run(["git", *args], cwd=package, capture_output=True, text=True,
                                  check=True).stdout.strip()
        except (OSError, subprocess.CalledProcessError):
            return ""

    commit = git("rev-parse", "HEAD")
    return {"slicegpt_commit": commit or None,
            "slicegpt_src_dirty": bool(git("status", "--porcelain", "--", ".")) if commit else None}


def uncommitted() -> list[str]:
    """The paths under src/ and tests/ that differ from the commit (the golden files themselves aside).

    Raises RuntimeError when git cannot tell (git missing, not a checkout)."""
    try:
        status = subprocess.run(["git", "status", "--porcelain", "--", "src", "tests"], cwd=REPOSITORY,
                                capture_output=True, text=True, check=True).stdout
    except (OSError, subprocess.CalledProcessError) as error:
        detail = getattr(error, "stderr", "") or str(error)
        raise RuntimeError(detail.strip().splitlines()[0] if detail.strip() else "git status failed") from None
    paths = []
    for line in status.splitlines():
        path = line[3:].split(" -> ")[-1].strip('"')  # "XY path" or "XY old -> new"
        if path not in GOLDEN_FILES:
            paths.append(path)
    return paths


def check_clean(allow_dirty: bool) -> None:
    """Refuse (one line, exit status 1) to record numbers of code that is not committed."""
    if allow_dirty:
        return
    try:
        paths = uncommitted()
    except RuntimeError as error:
        sys.exit(f"make_golden: cannot tell whether src/ and tests/ are committed ({error}); "
                 "regenerate from a git checkout, or pass --allow-dirty")
    if paths:
        shown = ", ".join(paths[:5]) + (f" and {len(paths) - 5} more" if len(paths) > 5 else "")
        sys.exit(f"make_golden: src/ or tests/ have uncommitted changes ({shown}); commit them first, "
                 "or pass --allow-dirty to record numbers of uncommitted code")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Regenerate tests/data/golden.{safetensors,json}.")
    parser.add_argument("--allow-dirty", action="store_true",
                        help="regenerate even though src/ or tests/ have uncommitted changes (not the default)")
    args = parser.parse_args(argv)
    check_clean(args.allow_dirty)
    start = time.time()
    tensors: dict[str, torch.Tensor] = {}
    cases: dict[str, dict] = {}
    refused: dict[str, dict] = {}
    for case in golden_cases.CASES:
        try:
            result = golden_cases.run_case(case)
        except SliceGPTError as error:
            refused[case.name] = {**golden_cases.describe(case), "message": str(error)}
            print(f"refused  {case.name}: {error}")
            continue
        tensors.update(golden_cases.tensors(case, result))
        cases[case.name] = {**golden_cases.describe(case), **result.record}
        print(f"ok       {case.name}")
    GOLDEN_TENSORS.parent.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(GOLDEN_TENSORS),
              metadata={"torch": torch.__version__, "transformers": transformers.__version__})
    provenance = source()
    if provenance["slicegpt_src_dirty"]:
        print("WARNING: slicegpt's source differs from its git commit; golden data should come from a clean tree")
    record = {"generated_with": {"torch": torch.__version__, "transformers": transformers.__version__,
                                 **provenance},
              "meta": meta(), "cases": cases, "refused": refused}
    GOLDEN_JSON.write_text(json.dumps(record, indent=1) + "\n")
    print(f"{len(cases)} cases, {len(refused)} refused, {time.time() - start:.1f} s; "
          f"{GOLDEN_TENSORS.stat().st_size} + {GOLDEN_JSON.stat().st_size} bytes")


if __name__ == "__main__":
    main()
