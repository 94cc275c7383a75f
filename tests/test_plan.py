"""The plan (`slicegpt.plan`): a dry run reads nothing but the config and predicts the real run; every
option a recipe or a size would ignore is refused in one line; the version is printed and recorded."""

from dataclasses import replace
import json
import re
import shutil
import subprocess
import sys

import pytest

import slicegpt
from conftest import DATA, make_model
from slicegpt import cli

TEXT_FILE = str(DATA / "tempest_excerpt.txt")
RUN = dict(calibration=TEXT_FILE, samples=4, seqlen=32)  # a real run, as small as it gets
RUN_ARGS = ("--calibration", TEXT_FILE, "--samples", "4", "--seqlen", "32")

# (recipe, expert levers): the default (at 0.8 on the tiny Llama: MLP neurons only, a stock model), the
# paper's per-layer rotation, and the paper's with uniform rotation, where the dry run cannot know whether
# the tied head stays tied (that needs the final norm's gain, a weight): make_model's random gain unties it,
# which is what the plan's count assumes.
CASES = {
    "default": ("default", {}),
    "default-heads": ("default", {"heads": "2x1"}),
    "paper": ("paper", {}),
    "paper-uniform": ("paper", {"rotation": "uniform"}),
}


def _flags(levers: dict) -> list[str]:
    return [part for name, value in levers.items() for part in (f"--{name.replace('_', '-')}", str(value))]


def _json(data):
    return json.loads(json.dumps(data))  # as slicegpt.json holds it: tuples become lists


@pytest.fixture
def model_dirs(tmp_path, tokenizer):
    """A tiny Llama saved with its tokenizer, and a copy holding only its config and tokenizer files."""
    dense = tmp_path / "dense"
    make_model("llama").save_pretrained(dense)
    tokenizer.save_pretrained(dense)
    config_only = tmp_path / "config-only"
    shutil.copytree(dense, config_only)
    weights = [p for p in config_only.iterdir() if p.name.endswith((".safetensors", ".safetensors.index.json",
                                                                     ".bin"))]
    assert weights
    for path in weights:
        path.unlink()
    return dense, config_only


@pytest.mark.parametrize("case", sorted(CASES))
def test_a_dry_run_reads_only_the_config_and_predicts_the_real_run(case, model_dirs, tmp_path, capsys):
    recipe, levers = CASES[case]
    dense, config_only = model_dirs
    code = cli.main(["slice", str(config_only), "--size", "0.8", "--recipe", recipe, *_flags(levers), *RUN_ARGS,
                     "--dry-run", "--json"])
    captured = capsys.readouterr()
    assert code == 0, captured.err
    lines = captured.out.splitlines()
    assert lines[0].startswith("plan (dry run")
    printed = _json(json.loads(lines[-1])["plan"])
    assert not (tmp_path / "out").exists()

    plan = slicegpt.plan_slice(config_only, size=0.8, recipe=recipe, **levers, **RUN)
    expected = _json(plan.to_dict())
    assert printed == expected
    assert plan.predicted_parameters is not None and plan.settings.recipe == recipe
    rows = dict(plan.rows())
    assert re.search(rf"parameters\s+{plan.dense_parameters:,} -> {plan.predicted_parameters:,} ", captured.out)
    for key in ("recipe", "compensation", "head", "output"):
        assert f"{key}" in captured.out and rows[key] in captured.out
    if case == "default":
        assert plan.identity and plan.standard and plan.neurons < plan.dense_neurons
        assert "LlamaForCausalLM" in rows["output"]
    elif case == "default-heads":  # one query head per group pruned, the neurons filling the size: a stock model
        assert plan.identity and plan.standard and plan.heads == (2, 1) and plan.dense_heads == (2, 2)
        assert rows["attention heads"] == "4 (2 key/value x 2 query) -> 2 (2 key/value x 1 query) per layer"
    elif case == "paper":
        assert plan.layout == "per-layer" and plan.neurons is None and plan.levers.compensate == "off"
    else:
        assert plan.layout == "uniform" and plan.tied_head is None  # decided by a weight the dry run does not read

    run = slicegpt.slice_and_save(dense, tmp_path / "out", size=0.8, recipe=recipe, **levers, **RUN, evaluate=False,
                                  progress=False)
    assert run.config.parameters_sliced == plan.predicted_parameters
    assert run.config.parameters_sliced == sum(p.numel() for p in slicegpt.load(run.out).model.parameters())
    record = json.loads((run.out / "slicegpt.json").read_text())["slicing"]
    assert record["parameters_sliced"] == plan.predicted_parameters
    same = {k: v for k, v in expected.items() if k != "model"}
    if case == "paper-uniform":  # known once the weights are read: the random final gain unties the head
        assert record["plan"]["tied_head"] is False and record["tied_head"] is False
        same.pop("tied_head")
    if plan.measured:  # each layer's neuron count is measured at run time; their mean is the plan's
        assert expected["layer_neurons"] is None and record["plan"]["layer_neurons"] == record["mlp_neurons_per_layer"]
        assert sum(record["mlp_neurons_per_layer"]) == plan.neurons * len(record["mlp_neurons_per_layer"])
        same.pop("layer_neurons")
    if plan.heads_by_loss:  # heads weighed against neurons at run time: here keeping every head costs least
        costs = record["plan"]["head_costs"]
        assert expected["head_costs"] is None and "all" in costs and len(costs) > 1
        assert min(costs, key=costs.get) == "all"
        same.pop("head_costs")
    for carried in (_json(run.config.plan), record["plan"], _json(run.plan.to_dict())):
        assert {k: carried[k] for k in same} == same
    assert record["plan"]["model"] == str(dense) and record["recipe"] == record["method"] == recipe
    assert record["size"] == 0.8 and record["slicing"] is None
    if case == "default-heads":
        assert record["attention_heads"] == [2, 1] and record["heads"] == "2x1"
        assert json.loads((run.out / "config.json").read_text())["num_attention_heads"] == 2


# Default recipe at --size 0.8 on the tiny Llama: MLP neurons alone meet it (nothing rotated), so every
# lever about rotation, the head, pooling or per-boundary widths would do nothing.
DEFAULT_REFUSALS = [
    (["--rotation", "uniform"], r"prunes MLP neurons only.*--rotation would do nothing"),
    (["--rotation", "per-layer"], r"prunes MLP neurons only.*--rotation would do nothing"),
    (["--head", "untied"], r"prunes MLP neurons only.*--head would do nothing"),
    (["--head", "sliced"], r"prunes MLP neurons only.*--head would do nothing"),
    (["--pooling", "tokens"], r"--pooling applies to --rotation uniform only"),
    (["--accept-deviation"], r"--accept-deviation applies to --rotation uniform only"),
    (["--widths", "adaptive"], r"prunes MLP neurons only.*--widths adaptive would do nothing"),
    (["--compensate", "off"], r"pruning MLP neurons refits the down projection.*needs compensation"),
    (["--slicing", "0.25"], r"--slicing is the paper's measure.*--size"),
]
# The paper recipe (per-layer rotation, no compensation, no neurons) at --slicing 0.25 (or a --size).
PAPER_REFUSALS = [
    (["--ridge", "0.01"], r"--ridge applies to compensation, which is off here"),
    (["--dense-share", "0.5"], r"--dense-share applies to compensation, which is off here"),
    (["--size", "0.8", "--neurons", "0.5"], r"pruning MLP neurons refits the down projection.*needs compensation"),
    (["--neurons", "0.5"], r"pruning MLP neurons refits the down projection.*add --compensate writers"),
    (["--neurons", "0.5", "--compensate", "writers"], r"--neurons 0.5 prunes MLP neurons, so the run's size is --size"),
    (["--heads", "0.5"], r"pruning attention heads refits the output projection.*add --compensate writers"),
    (["--heads", "2x1", "--compensate", "writers"], r"--heads 2x1 prunes attention heads, so the run's size is --size"),
    (["--pooling", "tokens"], r"--pooling applies to --rotation uniform only"),
    (["--head", "fit"], r"--head fit applies to --rotation uniform only"),
    (["--accept-deviation"], r"--accept-deviation applies to --rotation uniform only"),
    (["--rotation", "uniform", "--widths", "adaptive"], r"--widths adaptive applies to per-layer rotation"),
    (["--rotation", "uniform", "--head", "untied"], r"--head untied applies to per-layer rotation"),
]
SIZE_REFUSALS = [
    (["--size", "1"], r"--size is the share of the dense parameters to keep, in \(0, 1\)"),
    (["--size", "0"], r"--size is the share of the dense parameters to keep, in \(0, 1\)"),
    (["--recipe", "paper", "--slicing", "0"], r"--slicing is the share of the hidden width to remove, in \(0, 1\)"),
    (["--recipe", "paper", "--slicing", "1"], r"--slicing is the share of the hidden width to remove, in \(0, 1\)"),
]


def _refused(argv, pattern, capsys, out):
    code = cli.main(argv)
    captured = capsys.readouterr()
    lines = [line for line in captured.err.splitlines() if line.strip()]
    assert code == 1, captured.err
    assert "Traceback" not in captured.err
    assert len(lines) == 1 and lines[0].startswith("slicegpt: error: "), captured.err
    assert re.search(pattern, lines[0]), lines[0]
    assert not out.exists()


@pytest.mark.parametrize("extra, pattern", DEFAULT_REFUSALS, ids=[" ".join(a) for a, _ in DEFAULT_REFUSALS])
@pytest.mark.parametrize("dry_run", [False, True])
def test_the_default_recipe_refuses_what_its_layout_ignores(extra, pattern, dry_run, tiny_model_dir, tmp_path,
                                                           capsys):
    size = [] if "--slicing" in extra else ["--size", "0.8"]
    out = tmp_path / "out"
    _refused(["slice", str(tiny_model_dir), *size, *extra, *RUN_ARGS, "--out", str(out),
              *(["--dry-run"] if dry_run else [])], pattern, capsys, out)


@pytest.mark.parametrize("extra, pattern", PAPER_REFUSALS, ids=[" ".join(a) for a, _ in PAPER_REFUSALS])
@pytest.mark.parametrize("dry_run", [False, True])
def test_the_paper_recipe_refuses_what_it_ignores(extra, pattern, dry_run, tiny_model_dir, tmp_path, capsys):
    out = tmp_path / "out"
    size = [] if "--size" in extra else ["--slicing", "0.25"]
    _refused(["slice", str(tiny_model_dir), "--recipe", "paper", *size, *extra, *RUN_ARGS,
              "--out", str(out), *(["--dry-run"] if dry_run else [])], pattern, capsys, out)


@pytest.mark.parametrize("extra, pattern", SIZE_REFUSALS, ids=[" ".join(a) for a, _ in SIZE_REFUSALS])
def test_sizes_outside_zero_to_one_are_refused(extra, pattern, tiny_model_dir, tmp_path, capsys):
    out = tmp_path / "out"
    _refused(["slice", str(tiny_model_dir), *extra, *RUN_ARGS, "--out", str(out)], pattern, capsys, out)


def test_a_refusal_is_one_line_from_the_real_command_too(tiny_model_dir, tmp_path):
    from test_cli import assert_one_line_error, run

    result = run("slice", tiny_model_dir, "--size", "0.8", "--head", "untied", *RUN_ARGS, "--out", tmp_path / "o")
    assert result.returncode == 1
    assert_one_line_error(result, r"prunes MLP neurons only.*--head would do nothing")
    assert not (tmp_path / "o").exists()


def test_the_version_is_printed_and_recorded_in_every_output(tiny_model_dir, tmp_path):
    result = subprocess.run([sys.executable, "-m", "slicegpt", "--version"], capture_output=True, text=True,
                            timeout=120)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == f"slicegpt {slicegpt.__version__}"
    assert re.fullmatch(r"\d+\.\d+\.\d+\S*", slicegpt.__version__)

    run = slicegpt.slice_and_save(tiny_model_dir, tmp_path / "out", size=0.8, **RUN, evaluate=False, progress=False)
    manifest = json.loads((run.out / "slicegpt.json").read_text())
    assert manifest["slicing"]["version"] == slicegpt.__version__
    assert manifest["slicing"]["plan"]["version"] == slicegpt.__version__
    assert manifest["slicegpt_version"] == slicegpt.__version__
    assert run.config.version == slicegpt.__version__
    assert slicegpt.load(run.out).sliced["slicing"]["version"] == slicegpt.__version__


def test_the_max_recipe_is_the_default_with_every_window_dense_and_four_times_the_calibration(calibration):
    """`--recipe max`: the default's levers, the dense model on every calibration window, 128 windows unless
    --samples says otherwise; the plan shows the calibration it will read."""
    default = slicegpt.plan_slice(make_model("llama"), size=0.5)
    best = slicegpt.plan_slice(make_model("llama"), recipe="max", size=0.5)
    assert best.levers == replace(default.levers, dense_share=1.0)
    assert best.settings.calibration_samples == 128 and default.settings.calibration_samples == 32
    assert dict(best.rows())["calibration"] == "128 x 1024 tokens of shakespeare"
    assert slicegpt.plan_slice(make_model("llama"), recipe="max", size=0.5, samples=64).settings.calibration_samples == 64
    model, config = slicegpt.slice_model(make_model("llama"), None, calibration.input_ids, recipe="max", size=0.5,
                                         progress=False)
    assert config.recipe == "max" and config.dense_share == 1.0 and config.widths_rule == "adaptive"
    assert config.parameters_sliced == slicegpt.count_parameters(model)
