"""Zero-shot accuracy through lm-eval: tasks built from real text, per-layer sliced models, the CLI."""

import json
import os

import pytest
import torch

from conftest import TEXT, make_model
from test_cli import assert_one_line_error, run

TASK = "tempest_next_line"


@pytest.fixture(scope="module")
def tempest_tasks(tmp_path_factory):
    """Two next-line tasks from the two halves of the shipped Tempest excerpt (lm-eval YAML + JSONL)."""
    from slicegpt.evaluation.next_line import write_next_line_task

    directory = tmp_path_factory.mktemp("tasks")
    lines = TEXT.splitlines()
    half = len(lines) // 2
    write_next_line_task(directory, {"tempest": "\n".join(lines[:half])}, TASK, items_per_text=16)
    write_next_line_task(directory, {"tempest": "\n".join(lines[half:])}, TASK + "_b", items_per_text=16, seed=1)
    return directory


def _windows(tokenizer):
    from slicegpt.data import calibration_windows, tokenize

    return calibration_windows(tokenize(tokenizer, TEXT), samples=8, seqlen=64, seed=0)


def _slice(model, tokenizer, **settings):
    from slicegpt import slice_model

    sliced, config = slice_model(model, tokenizer, _windows(tokenizer), progress=False, **settings)
    return sliced, config


def _rotated_at_full_width(model, tokenizer, keep_tied_head=True):
    """A per-layer sliced model that keeps every coordinate (the engine at full width: a size or
    slicing of 0 is no run `slice_model` makes): rotated, skip matrices, compensated, the dense function."""
    from slicegpt.adapters import get_adapter
    from slicegpt.core.engine import slice_layers
    from slicegpt.core.onload import ResidentModel

    adapter = get_adapter(model.config)
    widths = [model.config.hidden_size] * (2 * model.config.num_hidden_layers + 1)
    outcome = slice_layers(ResidentModel(model), adapter, _windows(tokenizer).batches(4), widths,
                           keep_tied_head=keep_tied_head, compensate="writers", progress=False)
    return model, outcome


def _direct_loglikelihood(model, tokenizer, context, choice):
    """log P(choice | context) computed here, split the way lm-eval splits context and continuation."""
    whole = tokenizer(context + "\n" + choice, add_special_tokens=False)["input_ids"]
    n = len(tokenizer(context, add_special_tokens=False)["input_ids"])
    ids = torch.tensor([whole])
    with torch.no_grad():
        logprobs = torch.log_softmax(model(ids).logits[0, :-1].double(), dim=-1)
    return sum(logprobs[i - 1, whole[i]].item() for i in range(n, len(whole)))


def test_per_layer_sliced_model_scores_like_the_dense_one(tempest_tasks, tokenizer, exact_norms):
    """At sparsity 0 a per-layer sliced model is the dense function: same per-choice loglikelihoods.

    Covers lm-eval's right-padded batches (batch 1 vs 5) and its `tie_weights()` call on a
    sliced model whose head was untied from the embeddings.
    """
    import copy
    import json as _json

    from slicegpt.evaluation.zero_shot import load_tasks, zero_shot

    dense = make_model("llama", dtype=torch.float64)
    reference = copy.deepcopy(dense)
    tasks = load_tasks(TASK, include_path=tempest_tasks)
    import random

    import numpy as np

    def draws():
        return random.random(), float(np.random.rand()), float(torch.rand(()))

    random.seed(7), np.random.seed(7), torch.manual_seed(7)
    expected_draws = draws()
    random.seed(7), np.random.seed(7), torch.manual_seed(7)
    base = zero_shot(dense, tokenizer, tasks, batch_size=5, progress=False)
    assert draws() == expected_draws  # lm-eval's reseeding does not leak into the caller's generators
    score = base.score(TASK)
    assert score.samples == 16 and score.metric == "acc_norm" and 0 <= score.acc <= 1
    ll = base.loglikelihoods[TASK]
    assert len(ll) == 16 and all(len(doc) == 4 for doc in ll)

    docs = [_json.loads(line) for line in (tempest_tasks / f"{TASK}.jsonl").read_text().splitlines()]
    for doc, got in list(zip(docs, ll))[:2]:  # what lm-eval reports is log P(choice | context) of this model
        expected = [_direct_loglikelihood(reference, tokenizer, doc["context"], c) for c in doc["choices"]]
        assert got == pytest.approx(expected, abs=1e-9)
    picked = [max(range(4), key=lambda k: doc_ll[k]) for doc_ll in ll]
    assert score.acc == pytest.approx(sum(p == d["label"] for p, d in zip(picked, docs)) / 16)

    sliced, _ = _rotated_at_full_width(copy.deepcopy(reference), tokenizer)
    untied, config = _rotated_at_full_width(copy.deepcopy(reference), tokenizer, keep_tied_head=False)
    assert not config.tied_head and untied.lm_head.weight.data_ptr() != untied.model.embed_tokens.weight.data_ptr()
    for model, batch_size in ((sliced, 1), (sliced, 5), (untied, 3)):
        other = zero_shot(model, tokenizer, load_tasks(TASK, include_path=tempest_tasks), batch_size=batch_size,
                          progress=False)
        assert torch.allclose(torch.tensor(other.loglikelihoods[TASK]), torch.tensor(ll), atol=1e-7)
        assert (other.score(TASK).acc, other.score(TASK).acc_norm) == (score.acc, score.acc_norm)
        assert "tie_weights" not in vars(model)  # lm-eval's re-tying was only shadowed during the run

    smaller, _ = _slice(copy.deepcopy(reference), tokenizer, slicing=0.5,
                        neurons="off")  # the run really uses the model it is given
    changed = zero_shot(smaller, tokenizer, load_tasks(TASK, include_path=tempest_tasks), progress=False)
    assert (torch.tensor(changed.loglikelihoods[TASK]) - torch.tensor(ll)).abs().max() > 1e-3


def test_cli_on_a_sliced_directory_prints_the_table_and_json(tempest_tasks, tokenizer, tmp_path):
    from slicegpt import load, save
    from slicegpt.evaluation.zero_shot import zero_shot

    model, config = _slice(make_model("llama"), tokenizer, size=0.8)
    out = save(model, tokenizer, config, tmp_path / "sliced")
    result = run("lm-eval", out, "--tasks", f"{TASK},{TASK}_b", "--include-path", tempest_tasks, "--limit", "12",
                 "--batch-size", "4", "--json")
    assert result.returncode == 0, result.stderr
    figures = json.loads(result.stdout.strip().splitlines()[-1])
    assert list(figures["tasks"]) == [TASK, TASK + "_b"] and figures["sliced"] is True
    values = [t["value"] for t in figures["tasks"].values()]
    assert all(t["samples"] == 12 and t["metric"] == "acc_norm" and t["value"] == t["acc_norm"]
               for t in figures["tasks"].values())
    assert figures["average"] == pytest.approx(sum(values) / 2)
    table = result.stdout
    for row in (f"| {TASK} | acc |", f"| {TASK} | acc_norm * |", f"| {TASK}_b | acc_norm * |", "| average |"):
        assert row in table, table
    assert f"{figures['average']:.4f}" in table

    again = load(out)  # the CLI measured the saved sliced model, not something else
    direct = zero_shot(again.model, again.tokenizer, [TASK, TASK + "_b"], include_path=tempest_tasks, limit=12,
                       progress=False)
    assert [s.acc for s in direct.scores] == [t["acc"] for t in figures["tasks"].values()]


def test_hub_task_offline_is_a_one_line_error(tiny_model_dir, tmp_path):
    from slicegpt.formats.loading import hub_reachable

    # unreachable hub: leave HF_HUB_OFFLINE unset so slicegpt must notice by itself; reachable: force offline
    env = {"HF_HOME": str(tmp_path / "hf"), "HF_HUB_OFFLINE": "1" if hub_reachable() else "0"}
    result = run("lm-eval", tiny_model_dir, "--tasks", "piqa,winogrande", env=env)
    assert_one_line_error(result, r"task 'piqa': its dataset 'baber/piqa' could not be fetched from the Hugging "
                                  r"Face hub.*--tasks shakespeare_next_line.*--include-path")
    assert result.returncode == 1 and result.stdout == ""
    assert "Retry" not in result.stderr  # failed at once, not after rounds of retries


def test_unknown_task_names_the_close_ones(tmp_path):
    from slicegpt.errors import SliceGPTError
    from slicegpt.evaluation.zero_shot import load_tasks

    close = r"unknown lm-eval task 'arc_easyy' \(close names: arc_easy.*lm-eval ls tasks"
    with pytest.raises(SliceGPTError, match=close):
        load_tasks("shakespeare_next_line,arc_easyy")
    with pytest.raises(SliceGPTError, match="task directory not found"):
        load_tasks(TASK, include_path=tmp_path / "none")
    with pytest.raises(SliceGPTError, match="no task given"):
        load_tasks(" , ")


def test_unreachable_hub_switches_datasets_offline_and_back(monkeypatch, tmp_path):
    import datasets
    import huggingface_hub

    from slicegpt.evaluation.zero_shot import _hub_offline_if_unreachable

    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.delenv("HF_DATASETS_OFFLINE", raising=False)
    monkeypatch.setattr("slicegpt.formats.loading.hub_reachable", lambda timeout=3.0: False)
    before = (datasets.config.HF_HUB_OFFLINE, huggingface_hub.constants.HF_HUB_OFFLINE)
    with _hub_offline_if_unreachable() as offline:
        assert offline and datasets.config.HF_HUB_OFFLINE and huggingface_hub.constants.HF_HUB_OFFLINE
        with pytest.raises(ConnectionError):  # at once, instead of retrying
            datasets.load_dataset("baber/piqa", cache_dir=str(tmp_path))
    assert (datasets.config.HF_HUB_OFFLINE, huggingface_hub.constants.HF_HUB_OFFLINE) == before
    assert "HF_HUB_OFFLINE" not in os.environ


@pytest.mark.slow
def test_default_model_beats_chance_on_the_shipped_shakespeare_task():
    """SmolLM2-135M picks the true next line of a held-out play far more often than guessing (25%)."""
    import math

    import slicegpt
    from slicegpt.evaluation.zero_shot import zero_shot

    loaded = slicegpt.load_model("default")
    result = zero_shot(loaded.model, loaded.tokenizer, "shakespeare_next_line", limit=60, progress=False)
    score = result.score("shakespeare_next_line")
    assert score.samples == 60
    for accuracy in (score.acc, score.acc_norm):  # chance of doing this well by guessing: below 1 in 1000
        hits = round(accuracy * 60)
        p_value = sum(math.comb(60, k) * 0.25**k * 0.75 ** (60 - k) for k in range(hits, 61))
        assert p_value < 1e-3, (score, p_value)
