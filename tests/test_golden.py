"""Golden numbers: slicing must keep producing exactly the numbers it produced when they were recorded.

Each case of tests/golden_cases.py (every family per-layer and uniform, the stock-model
export, head options, pooling, a fitted tied head) builds a tiny float64 model with seeded
weights, slices it on seeded calibration ids and runs the result on a seeded eval input. The
test recomputes and compares with tests/data/golden.safetensors and golden.json:

- logits (every 4th vocabulary column, and the logsumexp over all of them) and the PCA
  spectra, to rtol 1e-9 / atol 1e-10 -- float64 all the way (golden_cases.exact_float64), so
  only a reordering of floating-point operations (~1e-13 here) is tolerated;
- parameter counts, sliced width, tied head, spectra lengths and the name and shape of every
  tensor of the sliced model's state_dict, exactly;
- the cases slicegpt refuses (uniform standard export of the LayerNorm families) still raise
  SliceGPTError.

A refactor of the algorithm must pass this unchanged. Regenerate the data ONLY when a change
of the numbers is intended, and say in the change why the numbers moved (and by how much):

    .venv/bin/python tests/make_golden.py        # rewrites tests/data/golden.{safetensors,json}
    .venv/bin/python -m pytest -q tests/test_golden.py

make_golden.py refuses while src/ or tests/ have uncommitted changes (`--allow-dirty` overrides
it, deliberately), so the commit it records in golden.json ("generated_with": "slicegpt_commit")
names the code that made the numbers; a test checks that commit is an ancestor of HEAD.

Adding or editing a case in golden_cases.py also needs a regeneration (the test checks the stored
case definitions and inputs match golden_cases.py). The numbers were made with the torch and
transformers versions recorded in golden.json ("generated_with"); a new transformers release may
legitimately change the dense models' forward, in which case regenerate on the old code first
to confirm it is the dependency, not slicegpt, that moved them.
"""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import golden_cases
from make_golden import GOLDEN_JSON, GOLDEN_TENSORS, meta
from slicegpt.errors import SliceGPTError

RTOL, ATOL = 1e-9, 1e-10
# Per-case tolerance overrides (case name -> (rtol, atol)); none needed. Every case is bit-identical
# from run to run except uniform-standard/llama/fit-tied-head, whose logits vary by ~5e-15 between
# calls (torch.linalg.lstsq's default CPU driver, gelsy, is not bit-reproducible even on one thread),
# five orders of magnitude inside the shared tolerance. (The thread count moves some cases by
# ~5e-15 too, hence golden_cases.one_thread.)
TOLERANCE: dict[str, tuple[float, float]] = {}

GOLDEN = json.loads(GOLDEN_JSON.read_text())
TENSORS = load_file(str(GOLDEN_TENSORS))


def test_golden_data_covers_every_case():
    assert GOLDEN["meta"] == meta(), "golden_cases.py inputs changed: regenerate (see the docstring)"
    assert not set(GOLDEN["cases"]) & set(GOLDEN["refused"])
    assert set(GOLDEN["cases"]) | set(GOLDEN["refused"]) == set(golden_cases.BY_NAME), \
        "the cases in golden_cases.py differ from the stored ones: regenerate (see the docstring)"
    keys = {f"{kind}/{name}" for name in GOLDEN["cases"] for kind in ("logits", "logsumexp", "spectra")}
    assert set(TENSORS) == keys


def _git(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(["git", *args], cwd=Path(__file__).resolve().parent, capture_output=True, text=True)


def test_golden_data_commit_is_an_ancestor_of_head():
    """The numbers were made by code in this history (not by a branch that was rebased away, or by
    uncommitted code that then changed): golden.json's recorded commit is an ancestor of HEAD."""
    commit = GOLDEN["generated_with"].get("slicegpt_commit")
    assert commit, "golden.json records no slicegpt_commit: regenerate from a git checkout (tests/make_golden.py)"
    try:
        inside = _git("rev-parse", "--is-inside-work-tree")
    except OSError:
        pytest.skip("git is not installed: cannot check which commit made the golden data")
    if inside.returncode != 0 or inside.stdout.strip() != "true":
        pytest.skip("not a git checkout: cannot check which commit made the golden data")
    shallow = _git("rev-parse", "--is-shallow-repository").stdout.strip() == "true"
    if _git("cat-file", "-e", f"{commit}^{{commit}}").returncode != 0:
        if shallow:
            pytest.skip(f"shallow clone without the golden data's commit {commit[:12]} (fetch with --unshallow)")
        pytest.fail(f"golden.json was made by commit {commit[:12]}, which this repository does not have "
                    "(rewritten history?): regenerate from a clean checkout with tests/make_golden.py")
    result = _git("merge-base", "--is-ancestor", commit, "HEAD")
    if result.returncode == 1 and shallow:
        pytest.skip(f"shallow clone: the history between {commit[:12]} and HEAD is not available")
    assert result.returncode == 0, (
        f"golden.json was made by commit {commit[:12]}, which is not an ancestor of HEAD "
        f"({result.stderr.strip() or 'another branch'}): regenerate from a clean checkout with tests/make_golden.py")


def _close(name: str, what: str, actual: torch.Tensor, expected: torch.Tensor, rtol: float, atol: float) -> None:
    assert actual.dtype == expected.dtype == torch.float64, what
    assert actual.shape == expected.shape, f"{name}: {what} shape {tuple(actual.shape)} != {tuple(expected.shape)}"
    worst = (actual - expected).abs().max().item() if actual.numel() else 0.0
    assert torch.allclose(actual, expected, rtol=rtol, atol=atol), f"{name}: {what} moved (max |diff| {worst:.3e})"


@pytest.mark.parametrize("case", golden_cases.CASES, ids=[c.id for c in golden_cases.CASES])
def test_golden(case):
    name = case.name
    if name in GOLDEN["refused"]:
        assert GOLDEN["refused"][name] | {"message": ""} == golden_cases.describe(case) | {"message": ""}
        with pytest.raises(SliceGPTError):
            golden_cases.run_case(case)
        return
    stored = GOLDEN["cases"][name]
    expected_record = {k: v for k, v in stored.items() if k not in golden_cases.describe(case)}
    assert {k: stored[k] for k in golden_cases.describe(case)} == golden_cases.describe(case), \
        f"{name}: the case definition changed: regenerate (see the docstring)"

    result = golden_cases.run_case(case)
    rtol, atol = TOLERANCE.get(name, (RTOL, ATOL))
    for key, actual in golden_cases.tensors(case, result).items():
        _close(name, key.split("/")[0], actual, TENSORS[key], rtol, atol)

    record = dict(result.record)
    deviation, expected_deviation = record.pop("max_logit_deviation", None), expected_record.pop(
        "max_logit_deviation", None)
    if expected_deviation is None:
        assert deviation is None, f"{name}: max_logit_deviation appeared"
    else:  # |stock - exact| logits on one calibration window: compare like the logits
        assert deviation == pytest.approx(expected_deviation, rel=rtol, abs=atol), f"{name}: max_logit_deviation"
    # exact: parameter counts, sliced width, tied head, spectra lengths, state_dict names and shapes
    assert record == expected_record
