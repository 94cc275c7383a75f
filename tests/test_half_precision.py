"""bfloat16 and float16 on CPU: what `slicegpt slice` does on most hub checkpoints (their own dtype).

Slicing tiny random models of three families (Llama; Phi, a LayerNorm family; Gemma) in half
precision completes with float64 statistics, its outputs load (slicegpt.load, and plain transformers
for stock outputs) and generate with the KV cache as without it, and perplexity stays within
TOLERANCE of the float32 run of the same settings on the same float32 source.

The tolerances were measured on 5 weight seeds of llama, phi, gemma and opt (docs/trust.md):
largest |ppl_half / ppl_float32 - 1| of the sliced model, per-layer and uniform rotation
0.60% (bfloat16) and 0.15% (float16); the default recipe 6.85% and 0.43% (the neurons it prunes
are discrete choices among near-equal ones, and flip under rounding: choosing other calibration
windows moves the float32 run's perplexity by up to 18% on the same models); the dense model
0.34% and 0.03%. The limits below have about twice that margin.
"""

from __future__ import annotations

import pytest
import torch

import slicegpt
from conftest import DATA, make_model

TEXT_FILE = str(DATA / "tempest_excerpt.txt")
HALF = (torch.bfloat16, torch.float16)
FAMILIES_HALF = ("llama", "phi", "gemma")
SETTINGS = {"per-layer": dict(recipe="paper", slicing=0.25),
            "uniform": dict(recipe="paper", slicing=0.25, rotation="uniform"),
            "default": dict(size=0.8)}
RUN = dict(calibration=TEXT_FILE, samples=8, seqlen=64, eval_samples=4, eval_seqlen=64, progress=False)
# largest relative perplexity change allowed against the float32 run: (sliced, dense)
TOLERANCE = {(torch.bfloat16, "rotation"): 0.015, (torch.bfloat16, "default"): 0.12, (torch.bfloat16, "dense"): 0.01,
             (torch.float16, "rotation"): 0.004, (torch.float16, "default"): 0.01, (torch.float16, "dense"): 0.001}
PROMPT = torch.randint(3, 300, (1, 6), generator=torch.Generator().manual_seed(5))


def _source(path, family: str, tokenizer, dtype=torch.float32):
    """Weights at a larger scale than conftest's default, so the logits are peaked and rounding shows in
    the perplexity (at initializer_range 0.02 every model predicts nearly the uniform distribution)."""
    make_model(family, initializer_range=0.1).to(dtype).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def float32_runs(tmp_path_factory, tokenizer):
    """The float32 source of each family and, computed once on demand, its float32 run per setting."""
    root = tmp_path_factory.mktemp("half-sources")
    sources = {f: _source(root / f, f, tokenizer) for f in FAMILIES_HALF}
    runs: dict = {}

    def get(family: str, setting: str):
        if (family, setting) not in runs:
            runs[family, setting] = slicegpt.slice_and_save(sources[family], root / f"{family}-{setting}", dtype="float32",
                                                            **SETTINGS[setting], **RUN)
        return sources[family], runs[family, setting]
    return get


def _watch_statistics(monkeypatch) -> list[tuple]:
    """(input dtype, accumulator dtypes) of every covariance and least-squares update of the run."""
    from slicegpt.core.bases import Covariance
    from slicegpt.core.compensation import LeastSquares

    seen: list[tuple] = []
    covariance, least_squares = Covariance.update, LeastSquares.update

    def cov_update(self, x, mask=None):
        seen.append((x.dtype, self.matrix.dtype))
        return covariance(self, x, mask)

    def ls_update(self, x, y=None, mask=None):
        seen.append((x.dtype, self._xx.dtype, self.xy.dtype))
        return least_squares(self, x, y, mask)
    monkeypatch.setattr(Covariance, "update", cov_update)
    monkeypatch.setattr(LeastSquares, "update", ls_update)
    return seen


def greedy_without_cache(model, prompt: torch.Tensor, steps: int) -> torch.Tensor:
    """Greedy decoding recomputing the whole sequence each step (no KV cache)."""
    ids = prompt
    with torch.no_grad():
        for _ in range(steps):
            logits = model(ids, use_cache=False).logits[:, -1]
            ids = torch.cat([ids, logits.argmax(-1, keepdim=True)], dim=1)
    return ids


def assert_generates(model, dtype: torch.dtype) -> None:
    assert {p.dtype for p in model.parameters()} == {dtype}
    cached = model.generate(PROMPT, max_new_tokens=8, do_sample=False, use_cache=True, pad_token_id=0)
    assert torch.equal(cached, greedy_without_cache(model, PROMPT, 8))


@pytest.mark.parametrize("setting", SETTINGS)
@pytest.mark.parametrize("dtype", HALF, ids=str)
@pytest.mark.parametrize("family", FAMILIES_HALF)
def test_slicing_in_half_precision(family, dtype, setting, float32_runs, tmp_path, monkeypatch):
    from transformers import AutoModelForCausalLM

    source, reference = float32_runs(family, setting)
    seen = _watch_statistics(monkeypatch)
    run = slicegpt.slice_and_save(source, tmp_path / "out", dtype=dtype, **SETTINGS[setting], **RUN)
    assert run.plan.dtype == str(dtype).removeprefix("torch.")
    assert seen and dtype in {s[0] for s in seen}  # the stream is half precision, the sums are not
    assert all(acc == torch.float64 for s in seen for acc in s[1:])

    tolerance = TOLERANCE[dtype, "default" if setting == "default" else "rotation"]
    for key, limit in (("perplexity_sliced", tolerance), ("perplexity_dense", TOLERANCE[dtype, "dense"])):
        change = run.figures[key] / reference.figures[key] - 1
        assert abs(change) <= limit, f"{key}: {change:+.4f} against float32"

    loaded = slicegpt.load(run.out)
    assert_generates(loaded.model, dtype)
    if run.config.standard:  # a stock model: plain transformers loads it in its own dtype
        stock = AutoModelForCausalLM.from_pretrained(run.out, dtype="auto").eval()
        assert_generates(stock, dtype)
        with torch.no_grad():
            assert torch.equal(stock(PROMPT).logits, loaded.model(PROMPT).logits)


@pytest.mark.parametrize("dtype", HALF, ids=str)
def test_slice_model_in_memory_in_half_precision(dtype, tokenizer, calibration, tmp_path):
    """The in-memory API loading a float32 checkpoint in half precision: the weights stay in it and it
    round-trips. (Loaded, not `model.to(dtype)`: that would also round the rotary tables, which loading
    keeps in float32, so a reloaded model would compute differently.)"""
    source = _source(tmp_path / "dense", "llama", tokenizer)
    sliced, config = slicegpt.slice_model(source, tokenizer, calibration, dtype=dtype, recipe="paper", slicing=0.25,
                                          progress=False)
    assert_generates(sliced, dtype)
    out = slicegpt.save(sliced, tokenizer, config, tmp_path / "sliced")
    loaded = slicegpt.load(out)
    with torch.no_grad():
        assert torch.equal(loaded.model(PROMPT).logits, sliced(PROMPT).logits)
    with pytest.raises(slicegpt.SliceGPTError, match="dtype applies to a model given by name or path"):
        slicegpt.slice_model(loaded.model, tokenizer, calibration, dtype=dtype, recipe="paper", slicing=0.25)


@pytest.mark.parametrize("dtype", HALF, ids=str)
def test_sliced_runtime_rmsnorm_computes_in_float32_like_transformers(dtype):
    """A half-precision input is normalised in float32 and cast back before the gain, as transformers'
    LlamaRMSNorm does: no float16 overflow of x^2 (x = 300 squares past 65504), same result."""
    from transformers.models.llama.modeling_llama import LlamaRMSNorm

    from slicegpt.modeling.runtime import RMSNorm

    g = torch.Generator().manual_seed(0)
    x = (300 * torch.randn(2, 8, 64, generator=g)).to(dtype)
    gain = 1 + 0.3 * torch.randn(64, generator=g)
    norm, stock = RMSNorm(64, eps=1e-5), LlamaRMSNorm(64, eps=1e-5)
    for module in (norm, stock):
        module.weight.data = gain.clone()
    exact = norm(x.float())  # float32 throughout, on the same (rounded) input
    norm, stock = norm.to(dtype), stock.to(dtype)
    with torch.no_grad():
        out = norm(x)
        assert out.dtype == dtype and torch.isfinite(out).all()
        assert torch.equal(out, stock(x))
    rtol = 3 * torch.finfo(dtype).eps  # the gain's rounding, the cast, the product's rounding
    assert torch.allclose(out.float(), exact, rtol=rtol, atol=0), (out.float() - exact).abs().max()


def test_cli_slices_a_bfloat16_checkpoint_in_bfloat16_by_default(tmp_path, tokenizer):
    """No --dtype: the checkpoint's own dtype (what --help says); --dtype float16 on it is honoured too."""
    import json

    from test_cli import run as run_cli

    source = _source(tmp_path / "bf16", "llama", tokenizer, torch.bfloat16)
    args = ("--recipe", "paper", "--slicing", "0.25", "--calibration", TEXT_FILE, "--samples", "8", "--seqlen", "64",
            "--eval-samples", "2", "--json")
    for dtype, extra in (("bfloat16", ()), ("float16", ("--dtype", "float16", "--rotation", "uniform"))):
        out = tmp_path / dtype
        result = run_cli("slice", source, *args, *extra, "--out", out)
        assert result.returncode == 0, result.stderr
        figures = json.loads(result.stdout.splitlines()[-1])
        assert figures["perplexity_sliced"] < 1.1 * figures["perplexity_dense"]
        manifest = json.loads((out / "slicegpt.json").read_text())
        assert manifest["slicing"]["plan"]["dtype"] == dtype
        assert json.loads((out / "config.json").read_text())["dtype"] == dtype
    generated = run_cli("generate", tmp_path / "bfloat16", "Full fathom", "--max-new-tokens", "5", "--json")
    assert generated.returncode == 0, generated.stderr
    assert json.loads(generated.stdout.splitlines()[-1])["text"]


def test_slice_help_names_the_default_dtype():
    from slicegpt.cli import build_parser

    slice_parser = build_parser()._subparsers._group_actions[0].choices["slice"]
    help_text = next(a.help for a in slice_parser._actions if "--dtype" in a.option_strings)
    assert "checkpoint's own dtype" in help_text and "bfloat16 for most hub models" in help_text


@pytest.mark.slow
def test_tolerances_hold_over_seeds_and_families(tmp_path, tokenizer):
    """The measurement behind TOLERANCE: 5 weight seeds of 4 families, each setting in float32, bfloat16
    and float16 from one float32 source; prints the largest changes (run with -s) and checks the limits."""
    worst: dict = {}
    for family in ("llama", "phi", "gemma", "opt"):
        for seed in range(5):
            source = tmp_path / f"{family}-{seed}"
            make_model(family, seed=seed, initializer_range=0.1).save_pretrained(source)
            tokenizer.save_pretrained(source)
            for setting in SETTINGS:
                if setting == "uniform" and family == "opt":  # no stock OPT with a sliced hidden size
                    continue
                runs = {dtype: slicegpt.slice_and_save(source, tmp_path / f"o-{family}-{seed}-{setting}-{dtype}",
                                                       dtype=dtype, **SETTINGS[setting], **RUN).figures
                        for dtype in (torch.float32, *HALF)}
                kind = "default" if setting == "default" else "rotation"
                for dtype in HALF:
                    for key, name in (("perplexity_sliced", kind), ("perplexity_dense", "dense")):
                        change = abs(runs[dtype][key] / runs[torch.float32][key] - 1)
                        worst[dtype, name] = max(worst.get((dtype, name), 0.0), change)
    print("\n| dtype | sliced, per-layer and uniform | sliced, default recipe | dense |\n|---|---|---|---|")
    for dtype in HALF:
        print(f"| {str(dtype).removeprefix('torch.')} | "
              + " | ".join(f"{100 * worst[dtype, n]:.2f}%" for n in ("rotation", "default", "dense")) + " |")
    assert all(change <= TOLERANCE[key] for key, change in worst.items()), worst


def test_bfloat16_activations_on_disk_give_the_same_output(tmp_path, tokenizer):
    """bfloat16 activation files round-trip exactly: the output equals the in-memory run's, byte for byte."""
    from test_streaming import _same_output

    source = _source(tmp_path / "bf16", "llama", tokenizer, torch.bfloat16)
    memory = slicegpt.slice_and_save(source, tmp_path / "memory", **SETTINGS["default"], **RUN)
    disk = slicegpt.slice_and_save(source, tmp_path / "disk", activations_dir=tmp_path / "acts", **SETTINGS["default"],
                                   **RUN)
    assert memory.plan.dtype == disk.plan.dtype == "bfloat16"
    _same_output(memory.out, disk.out)


def test_a_killed_bfloat16_run_resumes_to_a_bit_identical_output(tmp_path, tokenizer):
    from test_streaming import CALIBRATE, _same_output, run_cli

    source = _source(tmp_path / "bf16", "llama", tokenizer, torch.bfloat16)
    args = ("--size", "0.8", *CALIBRATE)  # the default recipe: the sliced and the dense stream are snapshotted
    whole = run_cli("slice", source, *args, "--out", tmp_path / "whole")
    assert whole.returncode == 0, whole.stderr
    out = tmp_path / "resumed"
    killed = run_cli("slice", source, *args, "--out", out, env={"SLICEGPT_TEST_KILL_AFTER_LAYER": "weights:2"})
    assert killed.returncode == -9, killed.stderr
    assert sorted(p.name for p in (tmp_path / ".resumed.slicegpt-run").glob("activations-*/x-*"))[:1] == \
        ["x-dense-000000.safetensors"]
    again = run_cli("slice", source, *args, "--out", out)
    assert again.returncode == 0, again.stderr
    _same_output(tmp_path / "whole", out)
