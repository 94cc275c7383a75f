"""bench/gpu_check.sh, the GPU check, as CI can run it: without a GPU its GPU steps are skipped and
the rest (install, the CPU reference, one-rank torchrun over Gloo, bench) runs and is checked."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
SMALL = {"HIDDEN": 128, "LAYERS": 2, "INTERMEDIATE": 256, "HEADS": 4, "KV_HEADS": 2, "VOCAB": 1000, "SAMPLES": 8,
         "SEQLEN": 64, "BENCH_BATCHES": "1", "BENCH_SEQLENS": "16", "BENCH_DECODE": 4}


def gpu_check(tmp_path, **settings) -> tuple[subprocess.CompletedProcess, dict]:
    env = {**os.environ, "PYTHON": sys.executable, "OMP_NUM_THREADS": "1", "GPU_CHECK_WORKDIR": str(tmp_path / "work"),
           **{f"GPU_CHECK_{k}": str(v) for k, v in settings.items()}}
    result = subprocess.run(["bash", str(ROOT / "bench" / "gpu_check.sh")], capture_output=True, text=True, env=env,
                            timeout=900, cwd=tmp_path)
    lines = result.stdout.strip().splitlines()
    assert lines, result.stderr
    return result, json.loads(lines[-1])


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the run without a GPU")
def test_without_a_gpu_the_gpu_steps_are_skipped_and_the_rest_passes(tmp_path):
    result, summary = gpu_check(tmp_path)
    assert result.returncode == 0, result.stderr
    checks = summary["checks"]
    assert summary["gpu_check"] == "ok" and summary["device"] == "cpu" and summary["gpu"] is None
    assert checks["install"]["status"] == "ok"
    assert checks["prepare"]["slicegpt_from"].startswith(str(tmp_path / "work" / "site"))  # the installed copy
    assert checks["reference_cpu"]["status"] == "ok"
    gloo = checks["torchrun_gloo"]
    assert gloo["status"] == "ok" and gloo["backend"] == "gloo" and gloo["allreduce_bytes"] > 0
    assert gloo["relative_rms_deviation_from_single_process"] == 0.0
    for name in ("reference_cuda", "torchrun_nccl", "big_model", "slice_default", "slice_paper", "bench_default",
                 "bench_paper"):
        assert checks[name]["status"] == "skipped" and "no GPU" in checks[name]["reason"], name
    bench = checks["bench_cpu"]
    assert bench["status"] == "ok" and bench["prefill_b1_p16"]["speedup"] > 0 and bench["decode_b1_p16"]["speedup"] > 0
    assert 0.7 < bench["weight_bytes_ratio"] < 0.85
    assert not any("deprecation_warnings" in c for c in checks.values())


def test_a_step_past_its_timeout_is_ended_and_the_summary_still_printed(tmp_path):
    result, summary = gpu_check(tmp_path, STEP_TIMEOUT=1, INSTALL=0)
    assert result.returncode == 1
    assert summary["gpu_check"] == "failed"
    prepare = summary["checks"]["prepare"]
    assert prepare["status"] == "failed" and "timed out after 1 s" in prepare["error"]
    assert summary["checks"]["install"]["status"] == "skipped"
    assert summary["seconds"] < 60


@pytest.mark.slow
def test_the_gpu_steps_run_on_the_cpu_at_small_sizes(tmp_path):
    """GPU_CHECK_DEVICE=cpu runs every "cuda" step on the CPU: the whole script, as on a GPU (NCCL aside)."""
    result, summary = gpu_check(tmp_path, DEVICE="cpu", **SMALL)
    assert result.returncode == 0, result.stderr
    checks = summary["checks"]
    assert [n for n, c in checks.items() if c["status"] != "ok"] == ["torchrun_nccl"]
    assert set(checks["reference_cuda"]["deviations"]) == {"default", "paper"}
    assert checks["big_model"]["parameters"] > 0
    assert 0.75 < checks["slice_default"]["size"] < 0.85 and checks["slice_paper"]["sliced_hidden_size"] == 96
    for recipe in ("default", "paper"):
        bench = checks[f"bench_{recipe}"]
        assert bench["prefill_b1_p16"]["speedup"] > 0 and bench["decode_b1_p16"]["ms_per_token"] > 0
