"""GPU check: slicegpt's CUDA paths in one run, for a machine with one NVIDIA GPU and no network.

    bash bench/gpu_check.sh                 # from the repository root; the last stdout line is the JSON summary

Steps, each a fresh process (the real CLI, `python -m slicegpt ...`) under a strict timeout:

  install         pip builds and installs the checkout without dependencies or network into a
                  temporary folder (`--no-deps --no-build-isolation --no-index --target`), which
                  every later step imports; on failure the steps fall back to PYTHONPATH=src
  prepare         python, torch, transformers, the GPU, where slicegpt was imported from; generated
                  text (Zipf-distributed pseudo-words), a BPE tokenizer trained on it, a tiny
                  random Llama in float32
  reference_cpu   the tiny model sliced on the CPU in float32 (default recipe, --size 0.8; with a
                  GPU also the paper recipe, --slicing 0.25): the reference
  reference_cuda  the same commands with --device cuda, float32; the outputs' logits (computed on the
                  CPU in float64) against the reference's, next to how far slicing moved them
  torchrun_gloo   one rank under torchrun on the CPU (Gloo), the tiny model, default recipe
  torchrun_nccl   one rank under torchrun with --device cuda (NCCL), the same
  big_model       a random Llama of ~1.1 B parameters (TinyLlama's shape) written in bfloat16
  slice_default   it sliced in bfloat16 with --device cuda, streamed from disk, --size 0.8
  slice_paper     the same with --recipe paper --slicing 0.25
  bench_default   `slicegpt bench --device cuda` of the default output against the dense model
  bench_paper     the same for the paper recipe's output
  bench_cpu       without a GPU only: `slicegpt bench` on the tiny reference (exercises the path)

slicegpt runs a one-rank torchrun job as a single process (no process group, no collectives).
The torchrun steps start the CLI through a small wrapper that turns the collectives on for the one
rank (`Ranks.current` answers a one-rank job whose `distributed` is true), so the engine's
all-reduces, broadcasts and gathers really run through NCCL (Gloo); their output must equal the
single process's.

Without a GPU the CUDA steps are skipped and the rest runs on the CPU in under a minute. Every
setting is an environment variable (defaults in SETTINGS); GPU_CHECK_DEVICE=cpu runs the "cuda"
steps on the CPU instead (with small GPU_CHECK_* sizes: a test of this script). Exit status 0
when no step failed.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

SETTINGS = {  # name: (default, meaning); read from GPU_CHECK_<NAME>
    "BUDGET": (420, "seconds for all steps together (each step's timeout is cut to what is left)"),
    "STEP_TIMEOUT": (240, "seconds one step may take at most"),
    "DEVICE": ("cuda", "where the GPU steps run (cpu: this script's own test, without a GPU)"),
    "HIDDEN": (2048, "big model: hidden size"),
    "LAYERS": (22, "big model: decoder layers"),
    "INTERMEDIATE": (5632, "big model: MLP width"),
    "HEADS": (32, "big model: attention heads"),
    "KV_HEADS": (4, "big model: key/value heads"),
    "VOCAB": (32000, "big model: vocabulary"),
    "SAMPLES": (32, "big model: calibration windows"),
    "SEQLEN": (512, "big model: tokens per calibration window"),
    "BENCH_BATCHES": ("1,8", "bench: batch sizes"),
    "BENCH_SEQLENS": ("128,512", "bench: prompt lengths"),
    "BENCH_DECODE": (32, "bench: decoded tokens per measurement"),
    "TINY_HIDDEN": (256, "tiny model: hidden size"),
    "TINY_LAYERS": (4, "tiny model: decoder layers"),
    "TINY_INTERMEDIATE": (704, "tiny model: MLP width"),
    "TINY_SAMPLES": (16, "tiny model: calibration windows"),
    "TINY_SEQLEN": (128, "tiny model: tokens per calibration window"),
    "TOLERANCE": (1e-2, "largest relative RMS deviation of logits from the reference's (slicing itself "
                        "moves them by ~0.4; a near-tie in the neuron choice decided the other way, far less)"),
    "INSTALL": (1, "0: skip the install, import from src/"),
    "WORKDIR": ("", "where models and outputs go (default: a temporary folder, removed at the end)"),
    "SAVE": ("", "a folder to also write gpu_check.json and gpu_check.log (every step's output) into"),
}


def setting(name: str):
    default, _ = SETTINGS[name]
    value = os.environ.get(f"GPU_CHECK_{name}")
    return default if value in (None, "") else type(default)(value)


# --- helpers that run in child processes (python bench/gpu_check.py _prepare / _compare ...) ---

def make_text(words: int, seed: int = 0) -> str:
    """Pseudo-words of a few syllables, Zipf-distributed, in sentences and lines: text with some
    structure for a tokenizer and calibration, without any corpus (the GPU machine has no network)."""
    rng = random.Random(seed)
    syllables = [a + b for a in "bdfgklmnprstvz" for b in ("a", "e", "i", "o", "u", "ai", "ou")]
    lexicon = ["".join(rng.choice(syllables) for _ in range(rng.randint(1, 3))) for _ in range(2000)]
    weights = [1 / (rank + 1) for rank in range(len(lexicon))]
    chosen = rng.choices(lexicon, weights, k=words)
    out, line = [], []
    for i, word in enumerate(chosen):
        line.append(word.capitalize() if not line else word)
        if rng.random() < 0.08 or i == len(chosen) - 1:
            out.append(" ".join(line) + rng.choice([".", ".", ",", "?", "!", ";"]))
            line = []
    return "\n".join(out) + "\n"


def environment() -> dict:
    import platform

    import torch
    import transformers

    import slicegpt

    cuda = torch.cuda.is_available()
    return {"python": platform.python_version(), "torch": torch.__version__, "transformers": transformers.__version__,
            "slicegpt": slicegpt.__version__, "slicegpt_from": slicegpt.__file__, "cuda": cuda,
            "gpu": torch.cuda.get_device_name(0) if cuda else None,
            "gpu_memory_gib": round(torch.cuda.get_device_properties(0).total_memory / 2**30, 1) if cuda else None,
            "nccl": torch.distributed.is_nccl_available() if cuda else None, "cpus": os.cpu_count()}


def prepare(work: Path, big: bool) -> None:
    from slicegpt.testing import train_tokenizer, write_random_llama
    import torch

    text_file = work / "text.txt"
    if not text_file.exists():
        text_file.write_text(make_text(200_000))
    tokenizer = train_tokenizer(text_file.read_text()[:200_000], vocab_size=300)
    figures = {} if big else environment()
    if big:
        start = time.perf_counter()
        size = write_random_llama(work / "big", layers=setting("LAYERS"), hidden=setting("HIDDEN"),
                                  intermediate=setting("INTERMEDIATE"), heads=setting("HEADS"),
                                  kv_heads=setting("KV_HEADS"), vocab=setting("VOCAB"), dtype=torch.bfloat16,
                                  tokenizer=tokenizer)
        figures.update(bytes=size, parameters=size // 2, write_seconds=round(time.perf_counter() - start, 1))
    else:
        hidden = setting("TINY_HIDDEN")
        write_random_llama(work / "tiny", layers=setting("TINY_LAYERS"), hidden=hidden,
                           intermediate=setting("TINY_INTERMEDIATE"), heads=max(1, hidden // 32),
                           kv_heads=max(1, hidden // 64), vocab=300, dtype=torch.float32, tokenizer=tokenizer)
        figures.update(text_bytes=text_file.stat().st_size)
    print(json.dumps(figures))


def compare(reference: str, other: str, dense: str, text_file: str) -> None:
    """Logits of two sliced outputs (and the dense model) on the same windows, on the CPU in float64."""
    import torch

    from slicegpt.data import tokenize
    from slicegpt.formats.loading import load_model

    ref = load_model(reference, dtype="float64")
    ids = tokenize(ref.tokenizer, Path(text_file).read_text()[-20_000:])[: 4 * 64].reshape(4, 64)

    def logits(path: str) -> torch.Tensor:
        model = ref.model if path == reference else load_model(path, dtype="float64").model
        with torch.no_grad():
            return model(input_ids=ids, use_cache=False).logits

    a, b, d = logits(reference), logits(other), logits(dense)

    def rms(x: torch.Tensor) -> float:
        return float(x.pow(2).mean().sqrt())

    print(json.dumps({"relative_rms_deviation": rms(b - a) / rms(a), "max_abs_deviation": float((b - a).abs().max()),
                      "slicing_relative_rms_change": rms(a - d) / rms(d), "tokens": ids.numel()}))


# One-rank torchrun with the collectives on: the path N ranks take (see the module docstring).
ONE_RANK = """
import os, sys
from datetime import timedelta
import torch
import torch.distributed as dist
from slicegpt.core import distributed
from slicegpt.cli import main

argv = sys.argv[1:]
cuda = "--device" in argv and argv[argv.index("--device") + 1].startswith("cuda")
if cuda:
    os.environ.setdefault("TORCH_NCCL_BLOCKING_WAIT", "1")  # as slicegpt's own init sets it
    torch.cuda.set_device(int(os.environ["LOCAL_RANK"]))
dist.init_process_group("nccl" if cuda else "gloo", timeout=timedelta(seconds=120))

class OneRank(distributed.Ranks):
    distributed = property(lambda self: True)  # collectives on, although there is one rank

ranks = OneRank(0, 1, torch.device("cuda", int(os.environ["LOCAL_RANK"])) if cuda else torch.device("cpu"))
distributed.Ranks.current = classmethod(lambda cls: ranks)
print("BACKEND", dist.get_backend(), flush=True)
sys.exit(main(argv))  # which leaves the process group at its end
"""


# --- the orchestrator ---

class Check:
    def __init__(self, work: Path, python_path: str):
        self.work = work
        self.logs = work / "logs"
        self.logs.mkdir(parents=True, exist_ok=True)
        self.env = {**os.environ, "PYTHONPATH": python_path, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1",
                    "HF_DATASETS_OFFLINE": "1", "PYTHONUNBUFFERED": "1", "TOKENIZERS_PARALLELISM": "false"}
        self.start = time.monotonic()
        self.budget = float(setting("BUDGET"))
        self.results: dict[str, dict] = {}

    def left(self) -> float:
        return self.budget - (time.monotonic() - self.start)

    def run(self, name: str, command: list[str], limit: float | None = None) -> tuple[int, str, str, float]:
        """(exit status, stdout, stderr, seconds) of `command`; killed with its whole process group
        at its timeout (min of its limit, GPU_CHECK_STEP_TIMEOUT and the budget left): exit status 124."""
        timeout = max(1.0, min(limit or 1e9, float(setting("STEP_TIMEOUT")), self.left()))
        command = [str(c) for c in command]
        log = self.logs / f"{len(list(self.logs.glob('*.log'))):02d}-{name}.log"
        start = time.monotonic()
        with open(log, "w") as out, open(log.with_suffix(".err"), "w") as err:
            out.write(f"$ {' '.join(command)}\n")
            out.flush()
            proc = subprocess.Popen(command, stdout=out, stderr=err, env=self.env, cwd=self.work,
                                    start_new_session=True)
            try:
                code = proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
                code = 124
        seconds = time.monotonic() - start
        stdout = log.read_text().split("\n", 1)[1]
        stderr = log.with_suffix(".err").read_text()
        if code == 124:
            stderr += f"\ntimed out after {timeout:.0f} s"
        return code, stdout, stderr, seconds

    def step(self, name: str, command: list[str], limit: float | None = None) -> dict | None:
        """Run one step; record ok (with its JSON figures) or failed (with the error's last line)."""
        if self.left() < 5:
            return self.skip(name, "the budget (GPU_CHECK_BUDGET) is spent")
        print(f"[gpu-check] {name} ...", file=sys.stderr, flush=True)
        code, stdout, stderr, seconds = self.run(name, command, limit)
        warned = sorted({line.strip()[:200] for line in stderr.splitlines()
                         if "Warning:" in line and ("Future" in line or "Deprecat" in line)})
        result = {"status": "ok" if code == 0 else "failed", "seconds": round(seconds, 1)}
        if warned:
            result["deprecation_warnings"] = warned[:5]
        figures = None
        if code == 0:
            json_lines = [line for line in stdout.splitlines() if line.startswith("{")]
            figures = json.loads(json_lines[-1]) if json_lines else {}
            result["_stdout"] = stdout
        else:
            lines = [line for line in stderr.replace("\r", "\n").splitlines() if line.strip() and "/s]" not in line]
            ours = [line for line in lines if "slicegpt: error" in line or "timed out after" in line]
            errors = [line for line in lines if "error" in line.lower() and "ChildFailedError" not in line
                      and "elastic" not in line]
            result["error"] = ((ours or errors or lines)[-1] if lines else f"exit status {code}").strip()[:300]
        self.results[name] = result
        print(f"[gpu-check] {name}: {result['status']} in {seconds:.1f} s"
              + (f" ({result['error']})" if code else ""), file=sys.stderr, flush=True)
        return figures

    def skip(self, name: str, reason: str) -> None:
        self.results[name] = {"status": "skipped", "reason": reason}
        print(f"[gpu-check] {name}: skipped ({reason})", file=sys.stderr, flush=True)
        return None

    def fail(self, name: str, reason: str) -> None:
        self.results[name]["status"] = "failed"
        self.results[name]["error"] = reason
        print(f"[gpu-check] {name}: failed ({reason})", file=sys.stderr, flush=True)


def same_weights(a: Path, b: Path) -> bool:
    """Whether two outputs hold byte-identical safetensors files."""
    names = sorted(p.name for p in a.glob("*.safetensors"))
    return bool(names) and names == sorted(p.name for p in b.glob("*.safetensors")) and all(
        (a / n).read_bytes() == (b / n).read_bytes() for n in names)


def slicegpt_command(*args) -> list[str]:
    return [sys.executable, "-m", "slicegpt", *map(str, args)]


def install(work: Path) -> tuple[dict, str]:
    """pip-install the checkout (a copy of its sources, so the checkout gets no build/ or egg-info)."""
    src_path = str(ROOT / "src")
    if not setting("INSTALL"):
        return {"status": "skipped", "reason": "GPU_CHECK_INSTALL=0: imported from src/"}, src_path
    source, target = work / "source", work / "site"
    shutil.copytree(ROOT / "src", source / "src", ignore=shutil.ignore_patterns("__pycache__", "*.egg-info"))
    for name in ("pyproject.toml", "README.md", "LICENSE"):
        if (ROOT / name).exists():
            shutil.copy2(ROOT / name, source / name)
    start = time.monotonic()
    try:
        done = subprocess.run([sys.executable, "-m", "pip", "install", "--no-deps", "--no-build-isolation",
                               "--no-index", "--no-compile", "--disable-pip-version-check", "-q", "--target",
                               str(target), str(source)], capture_output=True, text=True, timeout=180)
        code, err = done.returncode, done.stderr
    except subprocess.TimeoutExpired:
        code, err = 124, "pip timed out after 180 s"
    seconds = round(time.monotonic() - start, 1)
    if code != 0 or not (target / "slicegpt" / "__init__.py").exists():
        lines = [line for line in err.splitlines() if line.strip()]
        return {"status": "failed", "seconds": seconds, "error": (lines[-1] if lines else f"exit status {code}")[:300],
                "fallback": "PYTHONPATH=src"}, src_path
    return {"status": "ok", "seconds": seconds, "how": "pip install --no-deps --no-build-isolation --no-index --target"
            }, str(target)


def slice_figures(figures: dict) -> dict:
    keep = ("parameters_dense", "parameters_sliced", "slicing_seconds", "peak_memory_bytes", "hidden_size",
            "sliced_hidden_size", "allreduce_bytes_per_layer")
    out = {k: figures[k] for k in keep if k in figures}
    if "parameters_dense" in out and "parameters_sliced" in out:
        out["size"] = round(out["parameters_sliced"] / out["parameters_dense"], 4)
    if "peak_memory_bytes" in out:
        out["peak_memory_gib"] = round(out.pop("peak_memory_bytes") / 2**30, 2)
    if "slicing_seconds" in out:
        out["slicing_seconds"] = round(out["slicing_seconds"], 1)
    return out


def bench_figures(record: dict) -> dict:
    """Speedups of the sliced model over the dense one, per (batch, prompt)."""
    rows = [r for r in record.get("rows", []) if r.get("role") == "sliced"]
    out = {}
    for r in rows:
        key = f"{r['phase']}_b{r['batch']}_p{r['seqlen']}"
        out[key] = {"speedup": round(r["speedup"], 3) if r.get("speedup") else None,
                    "ms_per_token" if r["phase"] == "decode" else "tokens_per_second":
                        round(r["ms_per_token"], 3) if r["phase"] == "decode" else round(r["tokens_per_second"], 1)}
    dense = [r for r in record.get("rows", []) if r.get("role") == "dense"]
    if dense and rows:
        out["weight_bytes_ratio"] = round(rows[0]["weight_bytes"] / dense[0]["weight_bytes"], 4)
    return out


def main() -> int:
    started = time.monotonic()
    workdir = setting("WORKDIR")
    work = Path(workdir) if workdir else Path(tempfile.mkdtemp(prefix="slicegpt-gpu-check-"))
    work.mkdir(parents=True, exist_ok=True)
    installed, python_path = install(work)
    check = Check(work, python_path)
    check.results["install"] = installed
    print(f"[gpu-check] install: {installed['status']} in {installed.get('seconds', 0):.1f} s", file=sys.stderr,
          flush=True)
    me = [sys.executable, str(Path(__file__).resolve())]
    env = check.step("prepare", [*me, "_prepare", str(work), "tiny"], 120) or {}
    check.results["prepare"].update(env)
    prepared = check.results["prepare"]["status"] == "ok"
    device = setting("DEVICE")
    gpu = bool(env.get("cuda")) if device.startswith("cuda") else True
    no_gpu = "no GPU: torch.cuda.is_available() is false" if prepared else "prepare failed: GPU unknown"
    text = str(work / "text.txt")
    tiny = work / "tiny"
    tiny_args = ["--calibration", text, "--samples", setting("TINY_SAMPLES"), "--seqlen", setting("TINY_SEQLEN"),
                 "--no-eval", "--json", "--force"]
    recipes = {"default": ["--size", "0.8"], "paper": ["--recipe", "paper", "--slicing", "0.25"]}
    cpu_recipes = list(recipes) if gpu else ["default"]  # without a GPU only what the CPU steps use

    def tiny_slice(name, recipe, dev, dtype="float32"):
        out = work / f"{name}-{recipe}"
        figures = check.step(f"{name}_{recipe}", slicegpt_command("slice", tiny, *recipes[recipe], *tiny_args,
                                                                  "--device", dev, "--dtype", dtype, "--out", out), 120)
        return out if figures is not None else None

    def compared(name: str, reference: Path, other: Path) -> tuple[dict | None, str | None]:
        """(the deviations of `other`'s logits from `reference`'s, or None with the error)."""
        if same_weights(reference, other):  # nothing to compute: the same tensors, byte for byte
            return {"relative_rms_deviation": 0.0, "max_abs_deviation": 0.0, "identical_weights": True}, None
        figures = check.step(f"{name}_compare", [*me, "_compare", str(reference), str(other), str(tiny), text], 120)
        result = check.results.pop(f"{name}_compare")
        return figures, result.get("error")

    # reference: the tiny model on the CPU in float32, then the same on cuda
    references = {}
    if prepared:
        for recipe in cpu_recipes:
            references[recipe] = tiny_slice("reference_cpu", recipe, "cpu")
        steps = [check.results.pop(f"reference_cpu_{r}") for r in cpu_recipes]
        check.results["reference_cpu"] = {"status": "ok", "recipes": cpu_recipes,
                                          "seconds": round(sum(r.get("seconds", 0) for r in steps), 1)}
        missing = [f"{recipe}: {r.get('error') or r.get('reason')}" for recipe, r in zip(cpu_recipes, steps)
                   if r["status"] != "ok"]
        if missing:
            check.fail("reference_cpu", missing[0])
    else:
        check.skip("reference_cpu", "prepare failed")

    if not gpu:
        check.skip("reference_cuda", no_gpu)
    elif not references:
        check.skip("reference_cuda", "no CPU reference")
    else:
        deviations, seconds, errors = {}, 0.0, []
        for recipe, reference in references.items():
            out = tiny_slice("reference_cuda", recipe, device)
            step = check.results.pop(f"reference_cuda_{recipe}")
            seconds += step.get("seconds", 0)
            if out is None or reference is None:
                errors.append(f"{recipe}: " + (step.get("error") or step.get("reason") or "no CPU reference"))
                continue
            figures, error = compared("reference_cuda", reference, out)
            if figures is None:
                errors.append(f"comparing the logits: {error}")
                continue
            deviations[recipe] = {k: round(v, 8) if isinstance(v, float) else v for k, v in figures.items()}
        worst = max((d["relative_rms_deviation"] for d in deviations.values()), default=None)
        tolerance = setting("TOLERANCE")
        check.results["reference_cuda"] = {"status": "ok", "seconds": round(seconds, 1), "tolerance": tolerance,
                                           "deviations": deviations}
        if errors:
            check.fail("reference_cuda", errors[0])
        elif worst > tolerance:
            check.fail("reference_cuda", f"cuda's logits deviate from the CPU's by {worst:.2e} (relative RMS) "
                                         f"> {tolerance:g}")

    # torchrun, one rank, collectives on: Gloo on the CPU, NCCL on the GPU; output == the single process's
    def one_rank(name: str, dev: str, single: Path | None):
        if single is None:
            return check.skip(name, "its single-process output is missing")
        out = work / name
        command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "1",
                   "--no-python", sys.executable, "-c", ONE_RANK, "slice", str(tiny), *recipes["default"], *tiny_args,
                   "--device", dev, "--dtype", "float32", "--out", str(out), "--dist-timeout", "120"]
        figures = check.step(name, command, 180)
        if figures is None:
            return None
        result = check.results[name]
        words = result.pop("_stdout").split()
        backend = words[words.index("BACKEND") + 1] if "BACKEND" in words else None
        reduced = figures.get("allreduce_bytes", 0)
        result.update(backend=backend, allreduce_bytes=reduced, world_size=figures.get("world_size"))
        deviation, error = compared(name, single, out)
        if deviation is None:
            return check.fail(name, f"comparing the logits: {error}")
        result["relative_rms_deviation_from_single_process"] = deviation["relative_rms_deviation"]
        expected = "nccl" if dev.startswith("cuda") else "gloo"
        if backend != expected or reduced <= 0:
            check.fail(name, f"expected {expected} collectives, ran {backend} with {reduced} bytes all-reduced")
        elif deviation["relative_rms_deviation"] > setting("TOLERANCE"):
            check.fail(name, f"its output deviates from the single process's by "
                             f"{deviation['relative_rms_deviation']:.2e} (relative RMS)")
        return None

    one_rank("torchrun_gloo", "cpu", references.get("default"))
    if not gpu:
        check.skip("torchrun_nccl", no_gpu)
    elif device.startswith("cuda"):
        cuda_single = work / "reference_cuda-default"
        one_rank("torchrun_nccl", device, cuda_single if (cuda_single / "slicegpt.json").exists() else None)
    else:
        check.skip("torchrun_nccl", f"GPU_CHECK_DEVICE={device}: no NCCL")

    # the big model: bfloat16, streamed from disk, both recipes, then the bench
    big = work / "big"
    big_steps = ["big_model", "slice_default", "slice_paper", "bench_default", "bench_paper"]
    if not gpu:
        for name in big_steps:
            check.skip(name, no_gpu)
    else:
        figures = check.step("big_model", [*me, "_prepare", str(work), "big"], 180)
        if figures is not None:
            check.results["big_model"].update(figures, layers=setting("LAYERS"), hidden=setting("HIDDEN"),
                                              intermediate=setting("INTERMEDIATE"), vocab=setting("VOCAB"))
        big_args = ["--calibration", text, "--samples", setting("SAMPLES"), "--seqlen", setting("SEQLEN"),
                    "--no-eval", "--json", "--force", "--device", device, "--dtype", "bfloat16"]
        outputs = {}
        for recipe in recipes:
            if figures is None:
                check.skip(f"slice_{recipe}", "no big model")
                continue
            done = check.step(f"slice_{recipe}", slicegpt_command("slice", big, *recipes[recipe], *big_args,
                                                                  "--out", work / f"big-{recipe}"), 240)
            if done is not None:
                check.results[f"slice_{recipe}"].update(slice_figures(done))
                outputs[recipe] = work / f"big-{recipe}"
        for recipe in recipes:
            if recipe not in outputs:
                check.skip(f"bench_{recipe}", f"slice_{recipe} did not finish")
                continue
            record = check.step(f"bench_{recipe}", slicegpt_command(
                "bench", outputs[recipe], "--compare", big, "--device", device, "--dtype", "bfloat16",
                "--batch-sizes", setting("BENCH_BATCHES"), "--seqlens", setting("BENCH_SEQLENS"),
                "--decode-tokens", setting("BENCH_DECODE"), "--repeats", 3, "--json"), 180)
            if record is not None:
                check.results[f"bench_{recipe}"].update(bench_figures(record))

    if gpu and device.startswith("cuda"):
        check.skip("bench_cpu", "a GPU is present: bench_default measures on it")
    elif references.get("default") is None:
        check.skip("bench_cpu", "no tiny reference")
    else:
        record = check.step("bench_cpu", slicegpt_command(
            "bench", references["default"], "--compare", tiny, "--device", "cpu", "--batch-sizes", "1", "--seqlens",
            "16", "--decode-tokens", "4", "--repeats", "1", "--json"), 120)
        if record is not None:
            check.results["bench_cpu"].update(bench_figures(record))

    for result in check.results.values():
        result.pop("_stdout", None)
    statuses = [r["status"] for r in check.results.values()]
    summary = {"gpu_check": "failed" if "failed" in statuses else "ok", "gpu": env.get("gpu"),
               "device": device if gpu else "cpu", "torch": env.get("torch"), "transformers": env.get("transformers"),
               "seconds": round(time.monotonic() - started, 1), "budget_s": check.budget,
               "counts": {s: statuses.count(s) for s in ("ok", "failed", "skipped")},
               "work": str(work) if workdir else None, "checks": check.results}
    line = json.dumps(summary)
    save = setting("SAVE")
    if save:
        Path(save).mkdir(parents=True, exist_ok=True)
        (Path(save) / "gpu_check.json").write_text(line + "\n")
        with open(Path(save) / "gpu_check.log", "w") as log:
            for path in sorted(check.logs.iterdir()):
                text = path.read_text()
                log.write(f"===== {path.name} =====\n{text[-20_000:]}\n")
    if not workdir:
        shutil.rmtree(work, ignore_errors=True)
    print(line, flush=True)
    return 1 if "failed" in statuses else 0


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "_prepare":
        prepare(Path(sys.argv[2]), sys.argv[3] == "big")
    elif len(sys.argv) > 1 and sys.argv[1] == "_compare":
        compare(*sys.argv[2:6])
    else:
        sys.exit(main())
