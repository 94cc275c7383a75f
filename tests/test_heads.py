"""Pruning whole attention heads in compensation's fit (`--heads`): the block OBS, shapes, budgets, formats."""

import copy
import json

import pytest
import torch

import slicegpt
from conftest import make_model
from slicegpt.adapters import get_adapter
from slicegpt.core.budget import parameter_model
from slicegpt.core.compensation import LeastSquares, prune_heads
from slicegpt.errors import SliceGPTError


def _greedy(ids: torch.Tensor, model, steps: int = 6) -> torch.Tensor:
    with torch.no_grad():
        for _ in range(steps):
            ids = torch.cat([ids, model(ids, use_cache=False).logits[:, -1:].argmax(-1)], dim=1)
    return ids


def test_pruned_heads_fit_is_the_ridge_fit_of_the_kept_blocks():
    """Block OBS keeps whole heads, the same number per group, and leaves the exact ridge fit on them."""
    torch.manual_seed(0)
    size, groups, per_group, extra = 3, 2, 3, 2  # 6 heads of 3 columns, then 2 other inputs
    n = size * groups * per_group + extra
    x = torch.randn(500, n, dtype=torch.float64) * torch.linspace(0.3, 2.0, n, dtype=torch.float64)
    w = torch.randn(n, 4, dtype=torch.float64)
    fit = LeastSquares(n, 4)
    fit.update(x, x @ w + 0.05 * torch.randn(500, 4, dtype=torch.float64))
    prior = w + 0.1 * torch.randn_like(w)
    pruned, kept, error_prior, error_fit = prune_heads(copy.deepcopy(fit), prior, 0.01, range(0, n - extra), size,
                                                        groups, (2, 2))
    heads = sorted({i // size for i in kept.tolist() if i < n - extra})
    assert len(heads) == 4 and sorted(h // per_group for h in heads) == [0, 0, 1, 1]
    assert set(range(n - extra, n)) <= set(kept.tolist()) and len(kept) == 4 * size + extra
    lam = 0.01 * float(fit.xx.diagonal().sum()) / n
    h = fit.xx[kept][:, kept] + lam * torch.eye(len(kept), dtype=torch.float64)
    assert torch.allclose(pruned, torch.linalg.solve(h, fit.xy[kept] + lam * prior[kept]), atol=1e-9, rtol=1e-9)
    full = torch.zeros_like(prior)
    full[kept] = pruned
    assert error_fit == pytest.approx(fit.error(full)) and error_prior == pytest.approx(fit.error(prior))


@pytest.mark.parametrize("heads, zeroed", [("1x2", [2, 3]), ("2x1", [1, 2])])
def test_heads_that_write_nothing_are_the_ones_removed(heads, zeroed, exact_norms, calibration):
    """With some heads' o_proj columns zero (a whole key/value group, or one query head per group),
    OBS removes exactly those, and the model computes what the dense one does."""
    dense = make_model("llama", torch.float64)
    with torch.no_grad():
        for layer in dense.model.layers:
            for h in zeroed:
                layer.self_attn.o_proj.weight[:, h * 16:(h + 1) * 16] = 0.0
    kept = [h for h in range(4) if h not in zeroed]
    first = dense.model.layers[0]  # its kept query rows times the norm's gain
    expected_q = torch.cat([first.self_attn.q_proj.weight[h * 16:(h + 1) * 16] for h in kept])
    expected_q = expected_q * first.input_layernorm.weight
    ids = calibration.input_ids[:2]
    with torch.no_grad():
        reference = dense(ids).logits
    model, config = slicegpt.slice_model(copy.deepcopy(dense), None, calibration.input_ids, size=0.95, heads=heads,
                                         neurons="off", dense_share=1.0, progress=False)
    assert config.attention_heads == [int(heads[0]), int(heads[2])] and config.mlp_neurons is None
    out = model.model.layers[0]
    assert torch.allclose(out.self_attn.q_proj.weight * out.input_layernorm.weight, expected_q, atol=1e-12, rtol=0)
    with torch.no_grad():
        assert torch.allclose(model(ids).logits, reference, atol=1e-5, rtol=0)


@pytest.mark.parametrize("family, heads", [("llama", "1x2"), ("qwen2", "2x1"), ("gemma3_text", 0.5)])
def test_heads_make_a_stock_model_that_loads_and_decodes(family, heads, tmp_path, tokenizer, calibration):
    """Heads (and neurons filling the size) pruned, the stream unrotated: the stock class with fewer heads,
    every parameter predicted, plain transformers loads it with equal logits, KV-cache generation equals a
    no-cache greedy loop."""
    from transformers import AutoModelForCausalLM

    dense = make_model(family)
    plan = slicegpt.plan_slice(copy.deepcopy(dense), size=0.8, heads=heads, allocation="equal")
    assert plan.identity and plan.standard and plan.neurons is not None
    assert ("attention heads", f"4 (2 key/value x 2 query) -> 2 ({plan.heads[0]} key/value x {plan.heads[1]} query) "
                               "per layer") in plan.rows()
    model, config = slicegpt.slice_model(copy.deepcopy(dense), None, calibration.input_ids, size=0.8, heads=heads,
                                         allocation="equal", progress=False)
    assert type(model) is type(dense) and config.standard and not config.deviations
    assert config.attention_heads == list(plan.heads) and config.attention_heads_dense == [2, 2]
    assert model.config.num_key_value_heads == plan.heads[0] and model.config.num_attention_heads == 2
    assert model.model.layers[0].self_attn.o_proj.weight.shape[1] == 2 * model.config.head_dim
    assert plan.predicted_parameters == slicegpt.count_parameters(model) == config.parameters_sliced
    assert config.parameters_sliced <= 0.8 * slicegpt.count_parameters(dense)
    out = slicegpt.save(model, tokenizer, config, tmp_path / "out")
    assert json.loads((out / "config.json").read_text())["num_key_value_heads"] == plan.heads[0]
    plain = AutoModelForCausalLM.from_pretrained(out).eval()
    ids = calibration.input_ids[:2]
    with torch.no_grad():
        assert torch.equal(plain(ids).logits, model(ids).logits)
    prompt = calibration.input_ids[:1, :8]
    cached = plain.generate(prompt, max_new_tokens=6, do_sample=False, pad_token_id=0)
    assert torch.equal(cached, _greedy(prompt, plain))


def test_heads_with_a_sliced_stream_save_and_load_both_ways(tmp_path, tokenizer, calibration):
    """Per-layer rotation: the head count lives in the layers' attribute, restored on load."""
    from transformers import AutoModelForCausalLM

    dense = make_model("llama")
    levers = dict(size=0.5, heads="2x1", allocation="equal", widths="equal")  # (equal widths: counted in the plan)
    plan = slicegpt.plan_slice(copy.deepcopy(dense), **levers)
    assert plan.layout == "per-layer" and plan.heads == (2, 1)
    model, config = slicegpt.slice_model(dense, None, calibration.input_ids, progress=False, **levers)
    assert plan.predicted_parameters == config.parameters_sliced == slicegpt.count_parameters(model)
    ids = calibration.input_ids[:2]
    with torch.no_grad():
        expected = model(ids).logits
    out = slicegpt.save(model, tokenizer, config, tmp_path / "out")
    remote = AutoModelForCausalLM.from_pretrained(out, trust_remote_code=True).eval()
    with torch.no_grad():
        assert torch.equal(slicegpt.load(out).model(ids).logits, expected)
        assert torch.equal(remote(ids).logits, expected)
    prompt = calibration.input_ids[:1, :8]
    assert torch.equal(remote.generate(prompt, max_new_tokens=6, do_sample=False, pad_token_id=0),
                       _greedy(prompt, remote))


def test_the_parameter_model_counts_pruned_heads():
    dense = make_model("qwen2")  # q/k/v biases, an untied head
    adapter = get_adapter(dense.config)
    counter = parameter_model(dense, adapter, rotation="none", tied=False, source_tied=False, slice_head=True,
                              heads=(1, 1))
    removed = 0
    for layer in dense.model.layers:
        attention = layer.self_attn
        removed += 3 * (attention.q_proj.weight.numel() + attention.q_proj.bias.numel()) // 4  # 3 of 4 query heads
        removed += (attention.k_proj.weight.numel() + attention.k_proj.bias.numel()) // 2 * 2  # 1 of 2 groups: k, v
        removed += 3 * attention.o_proj.weight.numel() // 4
    assert counter.count([64] * 7) == slicegpt.count_parameters(dense) - removed


def test_a_fraction_drops_whole_groups_first():
    from slicegpt.core.widths import head_layout

    assert head_layout(2 / 3, (3, 3), "llama") == (2, 3)
    assert head_layout(1 / 3, (3, 3), "llama") == (1, 3)
    assert head_layout(0.5, (2, 4), "llama") == (1, 4)
    assert head_layout(0.5, (4, 1), "llama") == (2, 1)  # multi-head attention: whole groups
    assert head_layout(0.99, (3, 3), "llama") is None and head_layout("3x3", (3, 3), "llama") is None


def test_bad_heads_settings_are_refused_in_one_line(calibration):
    ids = calibration.input_ids
    cases = [
        (dict(heads="half"), "--heads is off, auto, the fraction"),
        (dict(heads=1.5), r"in \(0, 1\]"),
        (dict(heads="2x"), "GxR keeps G key/value heads"),
        (dict(heads="3x1"), "this model has 2 key/value heads with 2 query heads each"),
        (dict(heads=0.5, compensate="off", neurons="off"), "attention heads .* needs compensation"),
        (dict(heads=0.5, neurons="off", slicing=0.2, size=None), "--slicing sizes a sliced stream alone"),
    ]
    for changes, message in cases:
        settings = {"size": 0.8, **changes}
        with pytest.raises(SliceGPTError, match=message):
            slicegpt.slice_model(make_model("llama"), None, ids, progress=False, **settings)
    with pytest.raises(SliceGPTError, match=r"describes attention heads \(llama, .*gemma3_text\); not phi3"):
        slicegpt.slice_model(make_model("phi3"), None, ids, size=0.8, heads=0.5, progress=False)
    with pytest.raises(SliceGPTError, match="heads are pruned only while the stream keeps its width"):
        slicegpt.slice_model(make_model("gemma3_text"), None, ids, size=0.5, heads=0.5, neurons="off",
                             progress=False)


def test_auto_heads_order_the_layouts_whole_groups_first():
    from slicegpt.plan import head_candidates

    assert head_candidates((3, 3))[:4] == [(2, 3), (3, 2), (2, 2), (1, 3)]
    assert head_candidates((1, 4)) == [(1, 3), (1, 2), (1, 1)]
    assert (3, 3) not in head_candidates((3, 3)) and len(head_candidates((3, 3))) == 8


@pytest.mark.parametrize("family", ["llama", "gemma3_text"])
def test_auto_heads_go_only_past_the_neuron_floor_where_the_stream_cannot_take_the_rest(family, calibration):
    """(Equal neuron counts throughout: a stock model is what is checked.) `--heads auto` (the default recipe's): where neurons alone meet the size nothing changes; past
    their floor, Gemma (neurons not prunable beside a sliced stream) prunes heads instead of slicing
    the stream alone, and stays the stock model with the most heads that meet the size; Llama keeps
    its heads and slices the stream beside the neurons at their floor (measured better)."""
    ids = calibration.input_ids
    kept, auto = slicegpt.slice_model(make_model(family), None, ids, size=0.8, allocation="equal", progress=False)
    plain, config = slicegpt.slice_model(make_model(family), None, ids, size=0.8, heads="off", allocation="equal", progress=False)
    assert auto.heads == "auto" and auto.attention_heads is None and config.attention_heads is None
    assert auto.mlp_neurons == config.mlp_neurons and auto.standard
    for name, param in plain.named_parameters():
        assert torch.equal(param, dict(kept.named_parameters())[name]), name

    sliced, before = slicegpt.slice_model(make_model(family), None, ids, size=0.6, heads="off", allocation="equal", progress=False)
    assert before.rotation == "per-layer" and not before.standard  # past the floor: the stream is sliced
    model, after = slicegpt.slice_model(make_model(family), None, ids, size=0.6, allocation="equal", progress=False)
    if family == "llama":
        assert after.attention_heads is None and after.rotation == "per-layer"
        assert after.mlp_neurons == before.mlp_neurons and after.widths == before.widths
        return
    assert before.mlp_neurons is None  # Gemma without heads: the stream alone, no neuron pruned
    assert after.standard and after.rotation == "uniform" and after.sliced_hidden_size == after.hidden_size
    assert after.attention_heads == [1, 2]  # of 2x2: the most heads that meet 0.6 with the stream whole
    assert after.mlp_neurons >= 0.4 * after.mlp_neurons_dense
    assert after.parameters_sliced <= 0.6 * after.parameters_dense
    assert after.parameters_sliced == slicegpt.count_parameters(model)
    assert type(model).__name__ == type(make_model(family)).__name__  # the family's stock class
    # the choice needs no calibration spectra: a plan before calibration (a dry run) makes it too, and
    # so sees at once that --widths adaptive would do nothing there
    assert slicegpt.plan_slice(make_model(family), size=0.6, allocation="equal").heads == (1, 2)
    with pytest.raises(SliceGPTError, match="--widths adaptive would do nothing"):
        slicegpt.plan_slice(make_model(family), size=0.6, widths="adaptive", allocation="equal")


def test_auto_heads_given_where_they_cannot_apply_are_refused(calibration):
    ids = calibration.input_ids
    with pytest.raises(SliceGPTError, match="describes attention heads .*; not phi3"):
        slicegpt.slice_model(make_model("phi3"), None, ids, size=0.6, heads="auto", progress=False)
    with pytest.raises(SliceGPTError, match="attention heads .* needs compensation"):
        slicegpt.slice_model(make_model("llama"), None, ids, size=0.6, heads="auto", recipe="paper", progress=False)
