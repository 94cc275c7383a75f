"""One budget across layers: MLP neurons shared by measured loss, saved, loaded and exported."""

import copy
import json

import pytest
import torch

import slicegpt
from slicegpt.core.allocation import allocate_neurons, layer_floor
from slicegpt.core.compensation import MIXED_RIDGE, RIDGE, LeastSquares, prune, removal_costs
from slicegpt.core.distributed import Ranks
from slicegpt.errors import SliceGPTError
from conftest import make_model


def test_removals_go_where_they_cost_least_per_parameter_and_free_the_equal_budget():
    cheap, dear = [0.1] * 64, [5.0] * 64
    # equal costs: every removal from the cheap layer first, the total exactly what equal counts remove
    assert allocate_neurons([cheap, dear, dear], 96, 80, 8) == [48, 96, 96]
    # a curve that ends (its floor) sends the rest elsewhere
    assert allocate_neurons([[0.1] * 16, dear, [6.0] * 64], 96, 80, 8) == [80, 64, 96]
    # neurons of the second layer hold three times the parameters: removals free at least what equal
    # counts would (8 x 1 + 8 x 3), here two blocks of the cheap second layer
    assert allocate_neurons([dear, [1.0] * 64], 96, 88, 8, costs=[1, 3]) == [96, 80]
    assert layer_floor(96, 8) == 16 and layer_floor(1536, 8) == 160 and layer_floor(8, 8) == 8


def _ridge_value(fit: LeastSquares, b: torch.Tensor, lam: float, rows: torch.Tensor) -> float:
    """min over W (only `rows` nonzero) of the ridge objective, up to its constant: -b_R^T (H_RR + lam)^-1 b_R."""
    h = fit.xx[rows][:, rows] + lam * torch.eye(len(rows), dtype=torch.float64)
    return -float((b[rows] * torch.linalg.solve(h, b[rows])).sum())


@pytest.mark.parametrize("block", [1, 3, 8])
def test_removal_costs_are_exact_obs_steps_a_block_at_a_time(block):
    """Each removal's cost is what it adds to the refitted ridge objective: one row a step the costs are
    `prune`'s and add up to the objective of the rows kept at the end; a block a step charges each block
    its joint cost. The weights of a linear are the fit of its own outputs, so the Gram alone prices them."""
    torch.manual_seed(0)
    n, tokens = 24, 500
    x = torch.randn(tokens, n, dtype=torch.float64) * torch.linspace(0.2, 2.0, n, dtype=torch.float64)
    w = torch.randn(n, 5, dtype=torch.float64)
    fit = LeastSquares(n, 5)
    fit.update(x, x @ w)  # a linear's own outputs: its weights are the fit (the probe's case)
    fit.reduce(Ranks())
    prior, ridge, keep = w, 0.05, 7
    costs = removal_costs(fit.xx, w, ridge, range(2, n), keep, block, work=torch.float64)
    assert len(costs) == n - 2 - keep and all(c >= 0 for c in costs)
    lam = ridge * float(fit.xx.diagonal().sum()) / n
    b = fit.xy + lam * prior
    searched: list[float] = []
    _, kept, _, _ = prune(copy.deepcopy(fit), prior, ridge, range(2, n), keep, costs=searched, block=1)
    if block == 1:
        assert costs == pytest.approx(searched, rel=1e-9)
        assert sum(costs) == pytest.approx(_ridge_value(fit, b, lam, kept) - _ridge_value(fit, b, lam, torch.arange(n)))
    # the first block alone: the rows greedy OBS removes first, charged their exact joint cost
    one = removal_costs(fit.xx, w, ridge, range(2, n), n - 2 - block, block, work=torch.float64)
    assert sum(one) == pytest.approx(sum(searched[:block]))
    assert one == pytest.approx(costs[:block])
    # a block a step keeps what one row a step keeps: here the same rows, the same total
    assert sum(costs) == pytest.approx(sum(searched))


def test_measured_counts_differ_keep_the_budget_and_round_trip_everywhere(tokenizer, calibration, tmp_path):
    """The default recipe where neurons alone meet the size: each layer its own count (their mean the
    equal count, the same parameters), the family's own layers; slicegpt.load and trust_remote_code
    give the same logits, and greedy decoding with the KV cache equals decoding without it."""
    from transformers import AutoModelForCausalLM

    dense = make_model("llama")
    plan = slicegpt.plan_slice(make_model("llama"), size=0.8)
    assert plan.measured and plan.identity and plan.layer_neurons is None
    assert "chosen at run time" in dict(plan.rows())["MLP neurons"]
    model, config = slicegpt.slice_model(dense, tokenizer, calibration, size=0.8, progress=False)
    counts = config.mlp_neurons_per_layer
    assert config.allocation == "measured" and len(set(counts)) > 1 and not config.standard
    assert sum(counts) == config.mlp_neurons * len(counts) and all(n % 8 == 0 and n >= 16 for n in counts)
    assert [layer.mlp.down_proj.weight.shape[1] for layer in model.model.layers] == counts
    assert config.parameters_sliced == plan.predicted_parameters == slicegpt.count_parameters(model)
    ids = calibration.input_ids[:2, :32]
    with torch.no_grad():
        expected = model(ids).logits
    out = slicegpt.save(model, tokenizer, config, tmp_path / "out")
    loaded = slicegpt.load(out)
    assert type(loaded.model) is type(model) and loaded.sliced["slicing"]["mlp_neurons_per_layer"] == counts
    remote = AutoModelForCausalLM.from_pretrained(out, trust_remote_code=True).eval()
    with torch.no_grad():
        assert torch.equal(loaded.model(ids).logits, expected)
        assert torch.allclose(remote(ids).logits, expected, atol=1e-6)
    prompt = ids[:1, :6]
    cached = remote.generate(prompt, max_new_tokens=8, do_sample=False, pad_token_id=0)
    uncached = remote.generate(prompt, max_new_tokens=8, do_sample=False, use_cache=False, pad_token_id=0)
    assert torch.equal(cached, uncached)


def test_streamed_run_equals_the_in_memory_one_and_exports_to_gguf(tiny_model_dir, tokenizer, tmp_path):
    """`slicegpt slice --size 0.8` (streamed, from disk, activations on disk: the probes' too) probes and
    shares the neurons as the in-memory API does; `slicegpt export` writes each layer's width."""
    from test_cli import TEXT_FILE, run

    out = tmp_path / "default"
    result = run("slice", tiny_model_dir, "--size", "0.8", "--calibration", TEXT_FILE, "--samples", "8",
                 "--seqlen", "64", "--no-eval", "--out", out, "--json", "--activations-dir", tmp_path / "acts")
    assert result.returncode == 0, result.stderr
    assert "by measured loss" in result.stdout and "each MLP its own width" in result.stdout
    figures = json.loads(result.stdout.strip().splitlines()[-1])
    record = json.loads((out / "slicegpt.json").read_text())["slicing"]
    counts = record["mlp_neurons_per_layer"]
    assert figures["mlp_neurons_per_layer"] == counts and figures["standard"] is False
    assert figures["parameters_sliced"] == figures["parameters_predicted"]
    loaded = slicegpt.load(out)
    assert [layer.mlp.down_proj.weight.shape[1] for layer in loaded.model.model.layers] == counts

    from slicegpt.data import calibration_windows, split_text, tokenize

    windows = calibration_windows(tokenize(tokenizer, split_text(open(TEXT_FILE).read())[0]), 8, 64, 0,
                                  bos=slicegpt.bos_token(tokenizer))  # the windows the command line made
    memory, config = slicegpt.slice_model(make_model("llama"), tokenizer, windows, size=0.8, progress=False)
    assert config.mlp_neurons_per_layer == counts
    ids = windows.input_ids[:2]
    with torch.no_grad():
        assert torch.equal(loaded.model(ids).logits, memory(ids).logits)
    gguf = tmp_path / "default.gguf"
    exported = run("export", out, "--format", "gguf", "--dtype", "f32", "--out", gguf, "--json")
    assert exported.returncode == 0, exported.stderr
    written = json.loads(exported.stdout.strip().splitlines()[-1])["mlp_neurons_written"]
    assert written == [-(-n // 32) * 32 for n in counts]  # zero neurons to whole blocks, each layer its own


def test_measured_allocation_with_nothing_to_share_is_refused(calibration):
    with pytest.raises(SliceGPTError, match="--allocation measured shares the pruned MLP neurons"):
        slicegpt.plan_slice(make_model("llama"), size=0.8, neurons="off", allocation="measured")
    with pytest.raises(SliceGPTError, match="--allocation must be one of equal, measured"):
        slicegpt.plan_slice(make_model("llama"), size=0.8, allocation="global")
    # the paper's recipe prunes no neurons: its plan is untouched
    assert not slicegpt.plan_slice(make_model("llama"), recipe="paper", slicing=0.25).measured


@pytest.mark.parametrize("keep", [(3, 2), (2, 3), (1, 1)])
def test_head_removal_cost_is_what_the_heads_add_to_the_ridge_objective(keep):
    """The probe's price of a head layout: `prune_heads`'s search on a linear's own weights (the fit of
    its own outputs, so the Gram alone), the increase of the refitted ridge objective over all its rows."""
    from slicegpt.core.compensation import head_removal_costs, prune_heads

    torch.manual_seed(1)
    head_dim, groups, per_group = 4, 3, 3
    n, tokens = head_dim * groups * per_group, 400
    x = torch.randn(tokens, n, dtype=torch.float64) * torch.linspace(0.3, 2.0, n, dtype=torch.float64)
    w = torch.randn(n, 6, dtype=torch.float64)
    fit = LeastSquares(n, 6)
    fit.update(x, x @ w)
    fit.reduce(Ranks())
    ridge = 0.05
    lam = ridge * float(fit.xx.diagonal().sum()) / n
    b = fit.xy + lam * w
    # the weights the probe prices are the ridge fit itself: W = (X^T X + lam I)^-1 b
    own = torch.linalg.solve(fit.xx + lam * torch.eye(n, dtype=torch.float64), b)
    cost, whole = head_removal_costs(fit.xx, own, ridge, range(0, n), head_dim, groups, [keep, (groups, per_group)])
    _, kept, _, _ = prune_heads(copy.deepcopy(fit), own, ridge, range(0, n), head_dim, groups, keep)
    assert len(kept) == head_dim * keep[0] * keep[1]
    assert cost == pytest.approx(_ridge_value(fit, b, lam, kept) - _ridge_value(fit, b, lam, torch.arange(n)))
    assert whole == 0.0  # (every head kept)


def test_heads_that_carry_nothing_are_pruned_for_neurons_by_measured_loss(tokenizer, calibration, tmp_path):
    """`--heads auto` with measured allocation weighs every layout with fewer whole key/value groups that keeps
    the stream whole against the MLP neurons its parameters would keep: a group whose query heads write
    nothing costs nothing, so the default drops it and keeps more neurons; query heads within groups are not
    weighed; the record holds every layout's cost; the output loads."""
    dense = make_model("llama")
    with torch.no_grad():
        for layer in dense.model.layers:  # 2 key/value groups of 2 query heads, 16 wide: the second group mute
            layer.self_attn.o_proj.weight[:, 32:64] = 0.0
    plan = slicegpt.plan_slice(dense, size=0.8)
    assert plan.heads_by_loss and plan.heads is None
    assert "weighed against MLP neurons by measured loss, chosen at run time" in dict(plan.rows())["attention heads"]
    model, config = slicegpt.slice_model(dense, tokenizer, calibration, size=0.8, progress=False)
    costs = config.plan["head_costs"]
    assert set(costs) == {"all", "1x2"} and costs["1x2"] < costs["all"]
    assert config.attention_heads == [1, 2] and config.heads == "auto" and config.allocation == "measured"
    assert config.parameters_sliced == slicegpt.count_parameters(model) <= int(0.8 * slicegpt.count_parameters(
        make_model("llama")))
    assert config.mlp_neurons > plan.neurons  # the heads' parameters went to the neurons
    ids = calibration.input_ids[:2, :32]
    out = slicegpt.save(model, tokenizer, config, tmp_path / "out")
    loaded = slicegpt.load(out)
    with torch.no_grad():
        assert torch.equal(loaded.model(ids).logits, model(ids).logits)
    attention = [layer.self_attn for layer in loaded.model.model.layers]
    assert [a.o_proj.weight.shape[1] for a in attention] == [32] * 3
    assert [a.k_proj.weight.shape[0] for a in attention] == [16] * 3  # one key head left


def test_past_the_neuron_floor_one_probe_chooses_widths_and_neurons(tokenizer, calibration, tmp_path):
    """The default recipe where neurons at their floor do not meet the size: the stream is sliced beside the
    measured neurons, each boundary its own width (`--widths auto`) from the spectra the neuron probe gathers in
    its own pass (the same as `probe_spectra`'s), within the budget; the model saves, loads and decodes."""
    from slicegpt.core.allocation import probe_costs
    from slicegpt.core.compensation import dense_first_batches
    from slicegpt.core.onload import ResidentModel
    from slicegpt.adapters import get_adapter
    from slicegpt.core.widths import probe_spectra

    plan = slicegpt.plan_slice(make_model("llama"), size=0.5)
    assert plan.width_rule == "adaptive" and plan.widths is None and plan.measured and not plan.identity
    assert slicegpt.plan_slice(make_model("llama"), size=0.5, widths="equal").width_rule == "equal"
    # and the fits pull less toward their priors there, unless --ridge is given; neurons alone keep the default's
    assert plan.levers.ridge == MIXED_RIDGE and "ridge 0.03" in dict(plan.rows())["compensation"]
    assert slicegpt.plan_slice(make_model("llama"), size=0.5, ridge=0.1).levers.ridge == 0.1
    assert slicegpt.plan_slice(make_model("llama"), size=0.8).levers.ridge == RIDGE
    model, config = slicegpt.slice_model(make_model("llama"), tokenizer, calibration, size=0.5, progress=False)
    dense = slicegpt.count_parameters(make_model("llama"))
    assert config.widths_rule == "adaptive" and len(set(config.widths[:-1])) > 1, config.widths
    assert config.parameters_sliced == slicegpt.count_parameters(model) <= 0.5 * dense
    counts = config.mlp_neurons_per_layer
    assert len(set(counts)) > 1 and [layer.mlp.down_proj.weight.shape[1] for layer in model.model.layers] == counts

    dense_model = make_model("llama")
    view, adapter = ResidentModel(dense_model), get_adapter(dense_model.config)
    batches, _ = dense_first_batches(calibration, 4, Ranks())
    probe = probe_costs(view, adapter, batches, 0.1, 16, progress=False, spectra=True)
    alone = probe_spectra(view, adapter, batches[:2], progress=False)
    assert len(probe.spectra) == len(alone) == len(config.widths)
    assert all(torch.equal(a, b) for a, b in zip(probe.spectra, alone))

    ids = calibration.input_ids[:2, :32]
    out = slicegpt.save(model, tokenizer, config, tmp_path / "out")
    with torch.no_grad():
        assert torch.equal(slicegpt.load(out).model(ids).logits, model(ids).logits)
    prompt = ids[:1, :6]
    loaded = slicegpt.load(out).model
    cached = loaded.generate(prompt, max_new_tokens=8, do_sample=False, pad_token_id=0)
    uncached = loaded.generate(prompt, max_new_tokens=8, do_sample=False, use_cache=False, pad_token_id=0)
    assert torch.equal(cached, uncached)


def test_equal_widths_beside_neurons_leave_no_neuron_step_of_the_size_unspent():
    """With one stream width, what the largest equal width leaves of the size goes to the neurons: one more
    `round_to` step of them would break the budget."""
    from slicegpt.core.onload import ResidentModel
    from slicegpt.adapters import get_adapter
    from slicegpt.plan import parameter_counter

    model = make_model("llama")
    plan = slicegpt.plan_slice(model, size=0.5, widths="equal")
    assert not plan.identity and plan.neurons > 40  # above the floor (40% of 96, rounded up to 8)
    counter = parameter_counter(plan, ResidentModel(model), get_adapter(model.config))
    assert plan.predicted_parameters == counter.count(list(plan.widths), plan.neurons) <= plan.budget
    assert counter.count(list(plan.widths), plan.neurons + 8) > plan.budget
