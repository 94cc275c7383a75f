"""Distributed calibration under torchrun (Gloo on loopback): the same model as one process,
half the activations per rank, resume after a killed rank, one-line errors and no hang."""

import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

import slicegpt
from conftest import DATA, make_model
from slicegpt.core.bases import ordered_eigh
from slicegpt.core.distributed import Ranks

TEXT_FILE = str(DATA / "tempest_excerpt.txt")
WORKER = Path(__file__).with_name("distributed_worker.py")
ENV = {"HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
SLICE = dict(calibration=TEXT_FILE, samples=8, seqlen=64, eval_samples=3, eval_seqlen=64, progress=False)
CLI_ARGS = ("--slicing", "0.25", "--neurons", "off", "--calibration", TEXT_FILE, "--samples", "8", "--seqlen", "64",
            "--eval-samples", "3")
STREAM = dict(slicing=0.25, neurons="off")  # the stream sliced (compensated), no MLP neurons pruned
# (family, layout, dtype, settings): both rotations, RMSNorm and LayerNorm, sandwich norms,
# parallel branches, MoE, every quality lever (compensation is the default recipe's)
JOBS = [
    ("llama", "neurons", "float64", {"size": 0.8}),  # the default: MLP neurons pruned, the stream unrotated
    ("llama", "uniform", "float64", {**STREAM, "rotation": "uniform", "head": "fit"}),
    ("qwen2", "per-layer", "float64", {"rotation": "per-layer", "widths": "adaptive", "size": 0.9,
                                       "compensate": "all", "neurons": "off"}),
    ("opt", "per-layer", "float32", {**STREAM, "rotation": "per-layer"}),
    ("phi", "uniform", "float32", {**STREAM, "rotation": "uniform"}),
    ("gemma3_text", "per-layer", "float32", {"recipe": "paper", "slicing": 0.25}),
    ("gemma3_text", "uniform", "float32", {**STREAM, "rotation": "uniform", "accept_deviation": True,
                                           "pooling": "tokens"}),
    ("mixtral", "per-layer", "float32", {**STREAM, "rotation": "per-layer"}),
]
TOLERANCE = {"float64": 1e-6, "float32": 1e-4}  # relative to the largest logit


def torchrun(*args, env=None, timeout=300, nproc=2) -> subprocess.CompletedProcess:
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}", *args]
    return subprocess.run(list(map(str, command)), capture_output=True, text=True, timeout=timeout,
                          env={**os.environ, **ENV, **(env or {})})


def run_cli(*args, env=None, timeout=300) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "slicegpt", *map(str, args)], capture_output=True, text=True,
                          env={**os.environ, **ENV, **(env or {})}, timeout=timeout)


def _model_dir(path: Path, family: str, tokenizer) -> Path:
    if not path.exists():
        make_model(family).save_pretrained(path)
        tokenizer.save_pretrained(path)
    return path


def _logits(directory: Path, dtype: str = "float64") -> torch.Tensor:
    ids = torch.randint(3, 300, (2, 40), generator=torch.Generator().manual_seed(5))
    model = slicegpt.load(directory, dtype=dtype).model
    with torch.no_grad():
        return model(ids).logits


def _assert_same_model(single: Path, distributed: Path, dtype: str) -> None:
    expected, actual = _logits(single, dtype), _logits(distributed, dtype)
    worst = float((actual - expected).abs().max() / expected.abs().max())
    assert worst <= TOLERANCE[dtype], f"{distributed.name}: logits differ by {worst:.2e} relative"


def _no_traceback_of_ours(output: str) -> None:
    ours = [line for line in output.splitlines() if "File " in line and "slicegpt/" in line]
    assert not ours, output[-4000:]


def _errors(output: str) -> list[str]:
    return [line for line in output.splitlines() if line.startswith("slicegpt: error:")]


def test_two_ranks_slice_like_one_process_on_every_family_and_both_rotations(tmp_path, tokenizer):
    jobs, expected = [], []
    for i, (family, layout, dtype, settings) in enumerate(JOBS):
        source = _model_dir(tmp_path / family, family, tokenizer)
        kwargs = dict(model=str(source), dtype=dtype, **SLICE, **settings)
        jobs.append({"api": "slice_and_save", "kwargs": {**kwargs, "out": str(tmp_path / f"ranks-{i}")}})
        expected.append(slicegpt.slice_and_save(out=tmp_path / f"single-{i}", **kwargs))
    # slice_model (the in-memory API) inside the process group as well
    model_job = dict(model=str(tmp_path / "llama"), calibration=TEXT_FILE, size=0.8, samples=8, seqlen=64,
                     dtype="float64", progress=False)
    jobs.append({"api": "slice_model", "kwargs": {**model_job, "out": str(tmp_path / "ranks-model")}})
    (tmp_path / "jobs.json").write_text(json.dumps(jobs))

    done = torchrun(WORKER, tmp_path / "jobs.json", timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]

    for i, ((family, layout, dtype, settings), single) in enumerate(zip(JOBS, expected)):
        out = tmp_path / f"ranks-{i}"
        _assert_same_model(single.out, out, dtype)
        record = json.loads((out / "slicegpt.json").read_text())
        reference = json.loads((single.out / "slicegpt.json").read_text())
        assert record["slicing"]["distributed"]["world_size"] == 2
        assert record["slicing"]["distributed"]["samples_per_rank"] == [4, 4]
        assert sum(record["slicing"]["distributed"]["tokens_per_rank"]) == reference["slicing"]["calibration"]["tokens"]
        assert record["slicing"]["widths"] == reference["slicing"]["widths"]
        assert record["slicing"]["rotation"] == ("uniform" if layout == "neurons" else layout)
        assert record["slicing"]["plan"]["layout"] == reference["slicing"]["plan"]["layout"]
        assert record["slicing"]["parameters_sliced"] == reference["slicing"]["parameters_sliced"]
        results, alone = record["results"], reference["results"]
        for key in ("perplexity_dense", "perplexity_sliced"):  # the evaluation windows were shared too
            assert results[key] == pytest.approx(alone[key], rel=TOLERANCE[dtype]), (family, layout, key)
        assert results["allreduce_bytes"] > 0 and len(results["peak_memory_bytes_per_rank"]) == 2

    from slicegpt.formats.loading import load_model

    loaded = load_model(model_job["model"], dtype="float64")
    single_model, _ = slicegpt.slice_model(loaded.model, loaded.tokenizer, **{
        k: v for k, v in model_job.items() if k not in ("model", "dtype")})
    ids = torch.randint(3, 300, (2, 40), generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        reference_logits = single_model(ids).logits
    worst = float((_logits(tmp_path / "ranks-model") - reference_logits).abs().max() / reference_logits.abs().max())
    assert worst <= TOLERANCE["float64"]


def _snapshot_bytes(root: Path, pattern: str) -> dict[str, int]:
    return {p.name: sum(f.stat().st_size for f in p.glob("x-*.safetensors")) for p in sorted(root.glob(pattern))}


def test_a_killed_rank_ends_the_job_in_one_line_and_the_same_command_resumes(tmp_path, tokenizer):
    source = _model_dir(tmp_path / "llama", "llama", tokenizer)
    single = run_cli("slice", source, *CLI_ARGS, "--out", tmp_path / "single", "--json")
    assert single.returncode == 0, single.stderr
    # a single process stopped after layer 1 holds all the activations; each rank holds its share
    alone = run_cli("slice", source, *CLI_ARGS, "--out", tmp_path / "alone",
                    env={"SLICEGPT_TEST_KILL_AFTER_LAYER": "1"})
    assert alone.returncode == -9
    whole = _snapshot_bytes(tmp_path / ".alone.slicegpt-run", "activations-*")
    assert list(whole) == ["activations-layers-1"]

    out = tmp_path / "out"
    start = time.monotonic()
    killed = torchrun("-m", "slicegpt", "slice", source, *CLI_ARGS, "--out", out,
                      env={"SLICEGPT_TEST_KILL_AFTER_LAYER": "1", "SLICEGPT_TEST_KILL_RANK": "1"})
    assert time.monotonic() - start < 120  # no hang
    assert killed.returncode != 0
    errors = _errors(killed.stderr)
    assert len(errors) == 1 and "rank 0:" in errors[0] and "run the same command again to resume" in errors[0]
    _no_traceback_of_ours(killed.stderr)
    assert not out.exists()  # nothing half-written is visible
    run_dir = tmp_path / ".out.slicegpt-run"
    record = json.loads((run_dir / "progress.json").read_text())
    assert record["next_layer"] == 1 and record["settings"]["world_size"] == 2
    shares = _snapshot_bytes(run_dir, "activations-layers-1.rank*")
    assert list(shares) == ["activations-layers-1.rank0", "activations-layers-1.rank1"]
    for size in shares.values():  # each rank holds about half of one process's activations
        assert 0.4 < size / whole["activations-layers-1"] < 0.6

    resumed = torchrun("-m", "slicegpt", "slice", source, *CLI_ARGS, "--out", out, "--json",
                       "--report", tmp_path / "report")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert (tmp_path / "report" / "index.html").is_file()  # written once, by rank 0
    figures = json.loads(resumed.stdout.splitlines()[-1])  # rank 0 alone prints
    assert figures["resumed_from_layer"] == 1 and figures["world_size"] == 2
    assert len([line for line in resumed.stdout.splitlines() if line.startswith("{")]) == 1
    assert not run_dir.exists()
    _assert_same_model(tmp_path / "single", out, "float32")
    assert figures["perplexity_sliced"] == pytest.approx(json.loads(single.stdout.splitlines()[-1])["perplexity_sliced"],
                                                         rel=1e-4)

    # a different number of processes is another job: refused, not mixed with the old progress
    killed_again = run_cli("slice", source, *CLI_ARGS, "--out", tmp_path / "three",
                           env={"SLICEGPT_TEST_KILL_AFTER_LAYER": "1"})
    assert killed_again.returncode == -9
    other = torchrun("-m", "slicegpt", "slice", source, *CLI_ARGS, "--out", tmp_path / "three")
    errors = _errors(other.stderr)
    assert other.returncode != 0 and len(errors) == 1 and "world_size" in errors[0] and "--restart" in errors[0]

    # slicegpt eval shares its windows too, and gives the one-process number
    alone_eval = run_cli("eval", out, "--data", TEXT_FILE, "--samples", "3", "--seqlen", "64", "--json")
    ranks_eval = torchrun("-m", "slicegpt", "eval", out, "--data", TEXT_FILE, "--samples", "3", "--seqlen", "64",
                          "--json")
    assert alone_eval.returncode == 0 and ranks_eval.returncode == 0, ranks_eval.stderr[-2000:]
    a, b = (json.loads(r.stdout.splitlines()[-1]) for r in (alone_eval, ranks_eval))
    assert b["world_size"] == 2 and b["tokens"] == a["tokens"]
    assert b["perplexity"] == pytest.approx(a["perplexity"], rel=1e-5)


def test_ranks_started_with_different_arguments_are_refused_in_one_line(tmp_path, tokenizer):
    source = _model_dir(tmp_path / "llama", "llama", tokenizer)
    script = tmp_path / "mismatch.sh"  # rank 1 asks for another slicing
    script.write_text(f'S=0.25; [ "$RANK" = 1 ] && S=0.3\nexec {sys.executable} -m slicegpt slice {source} '
                      f'--slicing $S --neurons off --calibration {TEXT_FILE} --samples 8 --seqlen 64 '
                      f'--out {tmp_path / "out"}\n')
    done = torchrun("--no-python", "bash", script, timeout=120)
    errors = _errors(done.stderr)
    assert done.returncode != 0
    assert len(errors) == 1 and "different arguments" in errors[0] and "slicing" in errors[0], done.stderr[-2000:]
    _no_traceback_of_ours(done.stderr)
    assert not (tmp_path / "out").exists()


def test_a_hung_rank_times_out_with_one_line(tmp_path, tokenizer):
    source = _model_dir(tmp_path / "llama", "llama", tokenizer)
    start = time.monotonic()
    done = torchrun("-m", "slicegpt", "slice", source, *CLI_ARGS, "--out", tmp_path / "out", "--dist-timeout", "5",
                    env={"SLICEGPT_TEST_KILL_AFTER_LAYER": "1", "SLICEGPT_TEST_KILL_RANK": "1",
                         "SLICEGPT_TEST_KILL_SIGNAL": "STOP"}, timeout=180)
    assert time.monotonic() - start < 150
    errors = _errors(done.stderr)
    assert done.returncode != 0 and len(errors) == 1 and "rank 0:" in errors[0], done.stderr[-2000:]
    assert not (tmp_path / "out").exists()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_a_rendezvous_that_cannot_form_ends_in_one_line(tmp_path, tiny_model_dir):
    env = {"WORLD_SIZE": "2", "RANK": "0", "LOCAL_RANK": "0", "MASTER_ADDR": "127.0.0.1",
           "MASTER_PORT": str(_free_port())}  # rank 1 never comes
    start = time.monotonic()
    done = run_cli("slice", tiny_model_dir, *CLI_ARGS, "--out", tmp_path / "out", "--dist-timeout", "3", env=env)
    assert time.monotonic() - start < 60
    assert done.returncode == 1
    assert done.stderr.strip().splitlines() == [done.stderr.strip()]
    assert "could not meet" in done.stderr and "within 3 s" in done.stderr
    # commands that run in one process say so under torchrun
    other = run_cli("generate", tiny_model_dir, "To be", env={**env, "TORCHELASTIC_RUN_ID": "test"})
    assert other.returncode == 1 and "runs in one process" in other.stderr


def test_single_process_ranks_do_nothing():
    ranks = Ranks()
    t = torch.arange(4.0)
    ranks.sum_(t)
    ranks.same(t)
    assert torch.equal(t, torch.arange(4.0)) and ranks.reduced_bytes == 0
    assert ranks.share(5) == [0, 1, 2, 3, 4] and ranks.gather(3) == [3] and ranks.on_writer(lambda: 7) == 7
    assert Ranks(rank=1, world_size=3).share(8) == [1, 4, 7]


def test_eigenvector_signs_do_not_depend_on_rounding():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(200, 12, dtype=torch.float64, generator=g)
    cov = x.T @ x
    values, vectors = ordered_eigh(cov)
    assert torch.all(values[:-1] >= values[1:])
    pivots = vectors.abs().argmax(dim=0)
    assert torch.all(vectors[pivots, torch.arange(12)] > 0)
    # the same statistics summed in another order give the same basis, signs included
    other = (x[100:].T @ x[100:]) + (x[:100].T @ x[:100])
    assert torch.allclose(ordered_eigh(other)[1], vectors, atol=1e-10)
