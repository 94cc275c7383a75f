"""The layer-streaming engine: equal to the in-memory path, sharded output, resume, bad input."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import slicegpt
from conftest import DATA, FAMILIES, make_model
from slicegpt.adapters import get_adapter
from slicegpt.adapters.base import branch_groups
from slicegpt.core.engine import Hooks, slice_layers, slice_uniform
from slicegpt.core.onload import CheckpointModel, ResidentModel
from slicegpt.modeling.runtime import get_path

TEXT_FILE = str(DATA / "tempest_excerpt.txt")


class Collect(Hooks):
    def __init__(self):
        self.tensors, self.parts = {}, []

    def write(self, part, tensors):
        self.parts.append(part)
        self.tensors.update({k: v.clone() for k, v in tensors.items()})


def _batches():
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(3, 300, (8, 32), generator=g)
    return [(ids[i:i + 4], torch.ones_like(ids[i:i + 4])) for i in range(0, 8, 4)]


@pytest.mark.parametrize("rotation", ["per-layer", "uniform"])
@pytest.mark.parametrize("family", FAMILIES)
def test_streamed_from_disk_equals_in_memory(family, rotation, tmp_path):
    """Every family, both rotations: one layer onloaded at a time gives the very same tensors."""
    model = make_model(family, torch.float64)
    model.save_pretrained(tmp_path)
    adapter = get_adapter(model.config)
    widths = [48] * (len(get_path(model, adapter.layers)) * len(branch_groups(adapter.branches)) + 1)
    hooks = Collect()
    view = CheckpointModel(tmp_path, dtype=torch.float64)
    if rotation == "uniform":
        streamed = slice_uniform(view, adapter, _batches(), 48, progress=False, hooks=hooks)
        resident = slice_uniform(ResidentModel(model), adapter, _batches(), 48, progress=False)
    else:
        head = adapter.slice_head_required
        streamed = slice_layers(view, adapter, _batches(), widths, slice_head=head, progress=False, hooks=hooks)
        resident = slice_layers(ResidentModel(model), adapter, _batches(), widths, slice_head=head, progress=False)
    n = len(get_path(model, adapter.layers))
    assert sorted(hooks.parts) == list(range(n + 2))  # embeddings, each layer, final norm and head
    state = dict(model.state_dict())
    tied_head = f"{adapter.head}.weight"
    assert set(hooks.tensors) == set(state) - ({tied_head} if resident.tied_head else set())
    for name, tensor in hooks.tensors.items():
        assert torch.equal(tensor, state[name]), name
    assert streamed.module_attributes == resident.module_attributes and streamed.tied_head == resident.tied_head
    assert all(torch.equal(a, b) for a, b in zip(streamed.spectra, resident.spectra))
    assert view.model.config.tie_word_embeddings == model.config.tie_word_embeddings


def _model_dir(path, family, tokenizer, dtype=torch.float32):
    make_model(family, dtype).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


SLICE = dict(calibration=TEXT_FILE, samples=8, seqlen=64, eval_samples=2, eval_seqlen=64, progress=False)
STREAM = dict(slicing=0.25, neurons="off")  # the stream sliced (compensated), no MLP neurons pruned


def _settings(rotation: str) -> dict:
    """The run of each case: the stream sliced with that rotation, or ("neurons") the default recipe
    at a size that MLP neurons alone meet with one count per layer (the stream unrotated, a stock model;
    measured counts: tests/test_allocation.py)."""
    return dict(size=0.8, allocation="equal") if rotation == "neurons" else dict(STREAM, rotation=rotation)


@pytest.mark.parametrize("family,rotation", [("llama", "per-layer"), ("llama", "uniform"), ("llama", "neurons"),
                                             ("gemma2", "per-layer"), ("opt", "per-layer"), ("phi", "uniform"),
                                             ("mixtral", "per-layer")])
def test_slice_and_save_equals_slice_model_and_loads_every_way(family, rotation, tmp_path, tokenizer):
    from transformers import AutoModelForCausalLM

    from slicegpt.data import calibration_windows, split_text, tokenize

    source = _model_dir(tmp_path / "dense", family, tokenizer)
    run = slicegpt.slice_and_save(source, tmp_path / "out", **_settings(rotation), **SLICE)
    out = run.out
    index = json.loads((out / "model.safetensors.index.json").read_text())
    n_layers = make_model(family).config.num_hidden_layers
    assert len(set(index["weight_map"].values())) == n_layers + 2
    assert not any(p.name.endswith(".slicegpt-run") for p in tmp_path.iterdir())  # the run directory is gone

    calibration = calibration_windows(tokenize(tokenizer, split_text(open(TEXT_FILE).read())[0]), 8, 64, 0,
                                      bos=slicegpt.bos_token(tokenizer))
    reference, config = slicegpt.slice_model(make_model(family), tokenizer, calibration, **_settings(rotation),
                                             progress=False)
    assert run.config.rotation == config.rotation == ("uniform" if rotation == "neurons" else rotation)
    for key in ("layout", "widths", "neurons", "predicted_parameters", "tied_head", "standard"):
        assert run.config.plan[key] == config.plan[key], key
    assert run.config.parameters_sliced == config.parameters_sliced
    assert run.config.parameters_dense == config.parameters_dense
    ids = calibration.input_ids[:2]
    expected = reference(ids).logits
    assert torch.equal(slicegpt.load(out).model(ids).logits, expected)
    plain = AutoModelForCausalLM.from_pretrained(out, trust_remote_code=rotation == "per-layer").eval()
    assert torch.equal(plain(ids).logits, expected)
    # the streamed perplexity equals the in-memory one on the saved model
    from slicegpt.data import evaluation_windows

    eval_text = split_text(open(TEXT_FILE).read())[1]
    windows = evaluation_windows(tokenize(tokenizer, eval_text), 64, 2, bos=slicegpt.bos_token(tokenizer))
    assert run.figures["perplexity_sliced"] == pytest.approx(slicegpt.perplexity(plain, windows, 2, progress=False),
                                                             rel=1e-6)
    text = slicegpt.generate(slicegpt.load(out).model, tokenizer, "To be", max_new_tokens=8)
    assert text == slicegpt.generate(reference, tokenizer, "To be", max_new_tokens=8)


@pytest.mark.parametrize("rotation", ["per-layer", "uniform"])
def test_weights_in_memory_give_the_same_files_as_weights_read_from_disk(rotation, tmp_path, tokenizer):
    source = _model_dir(tmp_path / "dense", "gemma2", tokenizer)
    settings = dict(STREAM, rotation=rotation, **SLICE)
    if rotation == "uniform":
        settings["accept_deviation"] = True
    from_disk = slicegpt.slice_and_save(source, tmp_path / "disk", preload=False, **settings)
    in_memory = slicegpt.slice_and_save(source, tmp_path / "cpu", preload=True, **settings)
    _same_output(from_disk.out, in_memory.out)


def run_cli(*args, env=None, timeout=600):
    return subprocess.run([sys.executable, "-m", "slicegpt", *map(str, args)], capture_output=True, text=True,
                          env={**os.environ, "HF_HUB_OFFLINE": "1", **(env or {})}, timeout=timeout)


def _files(directory: Path) -> dict[str, bytes]:
    return {p.relative_to(directory).as_posix(): p.read_bytes() for p in sorted(directory.rglob("*")) if p.is_file()}


def _same_output(a: Path, b: Path) -> None:
    """Byte-equal files; the run record differs only in what it measured (time, memory, the resume)."""
    fa, fb = _files(a), _files(b)
    assert set(fa) == set(fb)
    for name in fa:
        if name != "slicegpt.json":
            assert fa[name] == fb[name], name
    ma, mb = json.loads(fa["slicegpt.json"]), json.loads(fb["slicegpt.json"])
    assert ma["slicing"] == mb["slicing"] and ma["files"] == mb["files"]
    for key in ("perplexity_dense", "perplexity_sliced", "parameters_sliced"):
        assert ma["results"][key] == mb["results"][key]


# the stream sliced (--neurons off): its phases are what these tests interrupt; "neurons" cases take the default
CALIBRATE = ("--calibration", TEXT_FILE, "--samples", "8", "--seqlen", "64", "--eval-samples", "2")
ARGS = ("--slicing", "0.25", "--neurons", "off", *CALIBRATE)


@pytest.mark.parametrize("rotation,kill,offload", [("per-layer", "2", "cpu"), ("per-layer", "1", "disk"),
                                                   ("uniform", "statistics:2", "cpu"), ("uniform", "weights:1", "disk"),
                                                   ("uniform", "weights:2", "weights-in-memory"),
                                                   ("neurons", "weights:2", "cpu"), ("mixed", "2", "disk")])
def test_killed_run_resumes_to_a_bit_identical_output(rotation, kill, offload, tmp_path, tokenizer):
    """"neurons": the default where neurons alone meet the size; "mixed": past their floor, the stream sliced
    per layer beside them, its widths and the neurons from one probe that the resumed run makes again."""
    source = _model_dir(tmp_path / "dense", "llama", tokenizer)
    args = (("--size", "0.8", *CALIBRATE) if rotation == "neurons" else ("--size", "0.5", *CALIBRATE)
            if rotation == "mixed" else (*ARGS, "--rotation", rotation))
    extra = (("--activations-dir", tmp_path / "acts") if offload == "disk"
             else ("--preload",) if offload == "weights-in-memory" else ())
    whole = run_cli("slice", source, *args, *extra, "--out", tmp_path / "whole")
    assert whole.returncode == 0, whole.stderr

    out = tmp_path / "resumed"
    killed = run_cli("slice", source, *args, *extra, "--out", out, env={"SLICEGPT_TEST_KILL_AFTER_LAYER": kill})
    assert killed.returncode == -9, killed.stderr  # SIGKILL: no cleanup ran
    assert not out.exists()  # nothing half-written is visible
    record = json.loads((tmp_path / ".resumed.slicegpt-run" / "progress.json").read_text())
    assert record["next_layer"] == int(kill.rpartition(":")[2])
    again = run_cli("slice", source, *args, *extra, "--out", out, "--json")
    assert again.returncode == 0, again.stderr
    assert json.loads(again.stdout.splitlines()[-1])["resumed_from_layer"] == record["next_layer"]
    _same_output(tmp_path / "whole", out)
    if rotation == "mixed":
        slicing = json.loads((out / "slicegpt.json").read_text())["slicing"]
        assert slicing["widths_rule"] == "adaptive" and slicing["rotation"] == "per-layer"
        assert len(set(slicing["mlp_neurons_per_layer"])) > 1 and slicing["ridge"] == 0.03
    assert not (tmp_path / ".resumed.slicegpt-run").exists()
    if offload == "disk":
        assert not any((tmp_path / "acts").iterdir())  # the activation files are cleaned up


def _interrupted(tmp_path, tokenizer, *extra):
    source = _model_dir(tmp_path / "dense", "llama", tokenizer)
    out = tmp_path / "out"
    killed = run_cli("slice", source, *ARGS, "--no-eval", *extra, "--out", out,
                     env={"SLICEGPT_TEST_KILL_AFTER_LAYER": "1"})
    assert killed.returncode == -9, killed.stderr
    return source, out, tmp_path / ".out.slicegpt-run"


def test_mismatched_or_damaged_progress_is_refused_and_restart_starts_over(tmp_path, tokenizer):
    from test_cli import assert_one_line_error

    source, out, run_dir = _interrupted(tmp_path, tokenizer)
    other = run_cli("slice", source, *ARGS, "--no-eval", "--slicing", "0.5", "--out", out)
    assert_one_line_error(other, r"other settings \(.*slicing.*\).*--restart")
    record = json.loads((run_dir / "progress.json").read_text())
    record["next_layer"] = 2  # edited by hand: the checksum no longer matches
    (run_dir / "progress.json").write_text(json.dumps(record))
    damaged = run_cli("slice", source, *ARGS, "--no-eval", "--out", out)
    assert_one_line_error(damaged, r"damaged progress record.*--restart")
    (run_dir / "progress.json").write_text("{not json")
    assert_one_line_error(run_cli("slice", source, *ARGS, "--no-eval", "--out", out), r"damaged.*--restart")
    restarted = run_cli("slice", source, *ARGS, "--no-eval", "--out", out, "--restart", "--json")
    assert restarted.returncode == 0, restarted.stderr
    assert json.loads(restarted.stdout.splitlines()[-1])["resumed_from_layer"] is None


def test_progress_of_another_model_or_a_changed_shard_is_refused(tmp_path, tokenizer):
    from test_cli import assert_one_line_error

    source, out, run_dir = _interrupted(tmp_path, tokenizer)
    shard = next(run_dir.glob("staging/model-00002-*.safetensors"))
    shard.write_bytes(shard.read_bytes()[:-16] + bytes(16))
    assert_one_line_error(run_cli("slice", source, *ARGS, "--no-eval", "--out", out),
                          r"finished shard model-00002.* missing or changed.*--restart")
    other = _model_dir(tmp_path / "other", "llama", tokenizer, torch.float64)
    assert_one_line_error(run_cli("slice", other, *ARGS, "--no-eval", "--out", out),
                          r"another model.*--restart")


@pytest.fixture
def sharded_llama(tmp_path, tokenizer):
    """A dense tiny Llama saved in several safetensors shards with an index, as big models are."""
    path = tmp_path / "sharded"
    make_model("llama", tie_word_embeddings=False).save_pretrained(path, max_shard_size="60KB")
    tokenizer.save_pretrained(path)
    assert len(list(path.glob("model-*.safetensors"))) > 2
    return path


def test_sharded_source_slices_like_a_single_file(sharded_llama, tmp_path, tokenizer):
    single = _model_dir(tmp_path / "single", "llama", tokenizer)
    make_model("llama", tie_word_embeddings=False).save_pretrained(single)
    a = slicegpt.slice_and_save(sharded_llama, tmp_path / "a", size=0.8, evaluate=False, **{
        k: v for k, v in SLICE.items() if not k.startswith("eval")})
    b = slicegpt.slice_and_save(single, tmp_path / "b", size=0.8, evaluate=False, **{
        k: v for k, v in SLICE.items() if not k.startswith("eval")})
    assert _files(a.out)["model-00003-of-00005.safetensors"] == _files(b.out)["model-00003-of-00005.safetensors"]


def test_bad_sharded_sources_end_in_one_line(sharded_llama, tmp_path):
    from test_cli import assert_one_line_error

    shards = sorted(sharded_llama.glob("model-*.safetensors"))
    index = sharded_llama / "model.safetensors.index.json"
    original = index.read_text()

    def slice_it():
        return run_cli("slice", sharded_llama, *ARGS, "--no-eval", "--out", tmp_path / "out")

    data = shards[1].read_bytes()
    shards[1].write_bytes(data[: len(data) // 2])  # truncated
    assert_one_line_error(slice_it(), rf"{shards[1].name} is corrupted or truncated")
    shards[1].unlink()
    assert_one_line_error(slice_it(), rf"incomplete: {shards[1].name} .*is missing")
    shards[1].write_bytes(data)
    mapping = json.loads(original)
    mapping["weight_map"]["model.layers.0.mlp.not_there.weight"] = shards[0].name
    index.write_text(json.dumps(mapping))
    assert_one_line_error(slice_it(), r"names tensors that .* does not hold: model.layers.0.mlp.not_there.weight")
    index.write_text(original)
    config = json.loads((sharded_llama / "config.json").read_text())
    del config["model_type"]
    (sharded_llama / "config.json").write_text(json.dumps(config))
    assert_one_line_error(slice_it(), r"config.json has no model_type")
    for command in ("eval", "generate"):  # every command reads configs the same way
        result = run_cli(command, sharded_llama, *(["hello"] if command == "generate" else []))
        assert_one_line_error(result, r"config.json has no model_type")
    assert not (tmp_path / "out").exists()


PEAK_RSS = """
import sys
from slicegpt.cli import main
code = main(sys.argv[1:])
# VmHWM, not getrusage's ru_maxrss: on Linux that one keeps the peak of the parent's memory the
# child had between fork and exec (a test process holding a loaded model would be counted)
peak = next(int(line.split()[1]) for line in open("/proc/self/status") if line.startswith("VmHWM:"))
print("PEAK_RSS_KIB", peak)
sys.exit(code)
"""


def peak_rss_of_slice(*args) -> tuple[subprocess.CompletedProcess, int]:
    """Run `slicegpt slice ...` in a fresh process and return its own peak RSS in bytes."""
    result = subprocess.run([sys.executable, "-c", PEAK_RSS, "slice", *map(str, args)], capture_output=True,
                            text=True, env={**os.environ, "HF_HUB_OFFLINE": "1"}, timeout=900)
    lines = [line for line in result.stdout.splitlines() if line.startswith("PEAK_RSS_KIB")]
    return result, int(lines[-1].split()[1]) * 1024 if lines else 0


def test_a_model_twice_the_memory_cap_slices_in_half_its_size(tmp_path, tokenizer):
    """A 1.9 GB random Llama in 34 shards: the slicing process never holds half of it.

    The paper's method: compensation adds float64 least-squares sums as wide as the MLP
    (4096^2 here), 0.52x of this model in all (README, "Quality")."""
    from slicegpt.testing import write_random_llama

    size = write_random_llama(tmp_path / "big", layers=32, tokenizer=tokenizer)
    assert size > 1.8e9
    result, peak = peak_rss_of_slice(tmp_path / "big", "--slicing", "0.25", "--calibration", TEXT_FILE,
                                     "--samples", "4", "--seqlen", "64", "--no-eval", "--out", tmp_path / "out",
                                     "--json", "--recipe", "paper")
    assert result.returncode == 0, result.stderr
    assert 0 < peak < size / 2, f"peak RSS {peak / 2**20:.0f} MiB, model {size / 2**20:.0f} MiB"
    figures = json.loads(result.stdout.splitlines()[-2])
    assert figures["parameters_sliced"] < figures["parameters_dense"]


def test_unequal_widths_per_boundary_save_load_and_generate(tmp_path, tokenizer, calibration):
    """The engine gives every block boundary its own width; such a model saves, loads and decodes."""
    from transformers import AutoModelForCausalLM

    model = make_model("llama")
    adapter = get_adapter(model.config)
    widths = [56, 48, 40, 48, 56, 40, 64]  # after the embeddings, then after each of the 6 steps
    outcome = slice_layers(ResidentModel(model), adapter, calibration.batches(4), widths, progress=False)
    layers = model.model.layers
    assert layers[0].entry_rotation.shape == (64, 56)
    assert [tuple(layer.attn_shortcut.shape) for layer in layers] == [(56, 48), (40, 48), (56, 40)]
    assert [tuple(layer.mlp_shortcut.shape) for layer in layers] == [(48, 40), (48, 56), (40, 64)]
    config = slicegpt.SlicingConfig(sparsity=0.25, hidden_size=64, sliced_hidden_size=max(widths[:-1]),
                                    model_type="llama", family="llama", tied_head=outcome.tied_head)
    out = slicegpt.save(model, tokenizer, config, tmp_path / "out")
    ids = calibration.input_ids[:2]
    expected = model(ids).logits
    loaded = slicegpt.load(out).model
    assert torch.equal(loaded(ids).logits, expected)
    remote = AutoModelForCausalLM.from_pretrained(out, trust_remote_code=True).eval()
    assert torch.equal(remote(ids).logits, expected)
    prompt = calibration.input_ids[:1, :8]  # the KV cache path: greedy decoding, token by token
    cached = loaded.generate(prompt, max_new_tokens=6, do_sample=False, pad_token_id=0)
    uncached = prompt
    for _ in range(6):
        uncached = torch.cat([uncached, model(uncached).logits[:, -1:].argmax(-1)], dim=1)
    assert torch.equal(cached, uncached)


def test_a_second_run_on_the_same_output_is_refused_while_the_first_holds_it(tmp_path):
    from slicegpt.core.resume import RunDirectory

    first = RunDirectory(tmp_path / "out", 5, {"a": 1}, "fingerprint")
    with pytest.raises(slicegpt.SliceGPTError, match="another slicegpt run is writing"):
        RunDirectory(tmp_path / "out", 5, {"a": 1}, "fingerprint")
    first.remove()
    RunDirectory(tmp_path / "out", 5, {"a": 1}, "fingerprint").remove()  # free again
