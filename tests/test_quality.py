"""The quality levers: compensation, per-boundary widths, a parameter budget (core.compensation, widths, budget)."""

import copy
import json
import random

import pytest
import torch

import slicegpt
from conftest import FAMILIES, make_model
from slicegpt.adapters import get_adapter
from slicegpt.adapters.base import branch_groups
from slicegpt.core.budget import parameter_model
from slicegpt.core.compensation import LeastSquares, dense_first_batches
from slicegpt.core.distributed import Ranks
from slicegpt.core.engine import slice_layers, slice_uniform, uniform_ties
from slicegpt.core.invariance import ties_head
from slicegpt.core.onload import ResidentModel
from slicegpt.core.widths import allocate
from slicegpt.errors import SliceGPTError
from slicegpt.modeling.runtime import get_path

DENSE_FAMILIES = [f for f in FAMILIES if "moe" not in f and f != "mixtral"]
UNIFORM_EXACT = [f for f in DENSE_FAMILIES if f not in ("opt", "opt_project", "gpt2", "gpt_neox",
                                                        "gpt_neox_sequential")]


def _steps(model) -> int:
    adapter = get_adapter(model.config)
    return len(get_path(model, adapter.layers)) * len(branch_groups(adapter.branches))


def test_ridge_fit_toward_the_prior_never_loses_to_it_and_keeps_an_exact_prior():
    torch.manual_seed(0)
    x = torch.randn(500, 12, dtype=torch.float64)
    true = torch.randn(12, 5, dtype=torch.float64)
    fit = LeastSquares(12, 5)
    fit.update(x[:200], x[:200] @ true)
    fit.update(x[200:], x[200:] @ true)  # a running sum over batches
    prior = true + 0.1 * torch.randn_like(true)
    assert fit.error(true) < 1e-10  # per token, against a mean |y|^2 of about 60
    for ridge in (1e-4, 1e-2, 1.0):
        again = copy.deepcopy(fit)  # solving consumes the sums
        w, error_prior, error_fit = again.solve(prior, ridge)
        assert error_prior == pytest.approx(fit.error(prior)) and error_fit == pytest.approx(fit.error(w))
        assert error_fit <= error_prior
    w, _, error_fit = copy.deepcopy(fit).solve(true, 1.0)
    assert torch.allclose(w, true, atol=1e-12) and error_fit < 1e-10  # an exact prior is kept at any ridge
    masked = LeastSquares(12, 5)
    masked.update(x[:4][None], (x[:4] @ true)[None] + 1e3 * torch.tensor([0, 0, 0, 1.0])[None, :, None],
                  mask=torch.tensor([[1, 1, 1, 0]]))
    assert masked.tokens == 3 and masked.error(true) < 1e-10  # padding is not fitted


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_batches_without_targets_are_fitted_to_the_priors_output(dtype):
    """With a prior P, batches may come without targets (the dense stream ran on a share of the
    windows only): the sums are those of the targets X P for them, across merges (ranks) too."""
    torch.manual_seed(0)
    n, m = 9, 4
    prior = torch.randn(n, m, dtype=torch.float64)
    xs = [torch.randn(3, 20, n, dtype=torch.float64) * torch.linspace(0.2, 2, n, dtype=torch.float64)
          for _ in range(5)]
    ys = [x @ prior + 0.3 * torch.randn(3, 20, m, dtype=torch.float64) for x in xs[:2]]
    ys += [x @ prior for x in xs[2:]]  # what the fit takes them to be
    whole = LeastSquares(n, m)  # float64 reference: every target given
    for x, y in zip(xs, ys):
        whole.update(x, y)
    mixed, other = LeastSquares(n, m, prior=prior), LeastSquares(n, m, prior=prior)
    mixed.update(xs[0].to(dtype), ys[0].to(dtype))  # one "rank": a batch with targets, two without
    mixed.update(xs[2].to(dtype))
    mixed.update(xs[3].to(dtype))
    other.update(xs[1].to(dtype), ys[1].to(dtype))  # another: targets only, then one without
    other.update(xs[4].to(dtype))
    mixed.merge(other)
    tol = dict(rtol=1e-10, atol=1e-9) if dtype == torch.float64 else dict(rtol=1e-5, atol=1e-3)
    assert mixed.tokens == whole.tokens == 300
    assert torch.allclose(mixed.xx, whole.xx, **tol) and torch.allclose(mixed.xy, whole.xy, **tol)
    assert mixed.yy == pytest.approx(whole.yy, rel=1e-9 if dtype == torch.float64 else 1e-5)
    w = prior + 0.1
    assert mixed.error(w) == pytest.approx(whole.error(w), rel=1e-8 if dtype == torch.float64 else 1e-4)
    w_mixed, _, error_mixed = copy.deepcopy(mixed).solve(prior)
    w_whole, _, error_whole = copy.deepcopy(whole).solve(prior)
    assert torch.allclose(w_mixed, w_whole, atol=1e-8 if dtype == torch.float64 else 1e-4)
    with pytest.raises(SliceGPTError, match="after one without"):
        late = LeastSquares(n, m, prior=prior)
        late.update(xs[2])
        late.update(xs[0], ys[0])
    with pytest.raises(SliceGPTError, match="needs a prior"):
        LeastSquares(n, m).update(xs[0])
    alone = LeastSquares(n, m, prior=prior)  # no batch with targets at all: the fit is the prior
    for x in xs:
        alone.update(x)
    w, error_prior, error_fit = alone.solve(prior)
    assert torch.allclose(w, prior, atol=1e-10) and error_prior < 1e-9 and error_fit < 1e-9


def test_the_dense_windows_are_the_same_for_any_number_of_ranks(calibration):
    """The dense stream runs on the first ceil(share * n) windows of all n (whole batches), batched
    ahead of the others on whichever rank holds them, so two ranks fit what one process fits."""
    from types import SimpleNamespace

    ids = calibration.input_ids  # 8 windows in batches of 3: the dense ones are rounded up to whole batches
    for share, k in ((0.125, 3), (0.25, 3), (0.5, 6), (0.8, 8), (0.0, 0)):
        batches, dense = dense_first_batches(calibration, 3, Ranks(), share)
        assert dense == -(-k // 3) and sum(len(b[0]) for b in batches) == len(ids)
        assert torch.equal(torch.cat([b[0] for b in batches[:dense]] or [ids[:0]]), ids[:k])
        seen = []
        for rank in (0, 1):
            ranks = SimpleNamespace(share=lambda n, r=rank: list(range(r, n, 2)))
            batches, dense = dense_first_batches(calibration, 3, ranks, share)
            seen += [row for b in batches[:dense] for row in b[0]]
            assert all(len(b[0]) <= 3 for b in batches)
        assert sorted(map(tuple, seen)) == sorted(map(tuple, ids[:k]))
    batches, dense = dense_first_batches(calibration, 3, Ranks(), 1.0)
    assert dense is None and len(batches) == 3


@pytest.mark.parametrize("n", [7, 300, 600])  # one band of the Gram, several, uneven bands
def test_float32_sums_are_the_gram_of_every_batch_merged_and_symmetric(n):
    """A float32 model's sums: the upper triangle summed band by band, the lower one filled on reading,
    equal to the float64 products within float32 rounding; padding left out; merging and summing go on."""
    torch.manual_seed(0)
    fit, other = LeastSquares(n, 3), LeastSquares(n, 3)
    xx, xy, tokens = torch.zeros(n, n, dtype=torch.float64), torch.zeros(n, 3, dtype=torch.float64), 0
    for i in range(3):
        x, y = torch.randn(2, 40, n) * torch.linspace(0.1, 3, n), torch.randn(2, 40, 3)
        mask = torch.ones(2, 40, dtype=torch.long)
        mask[1, 30:] = 0  # a padded window
        (fit if i < 2 else other).update(x, y, mask)
        keep = mask.reshape(-1).bool()
        x64, y64 = x.reshape(-1, n)[keep].double(), y.reshape(-1, 3)[keep].double()
        xx, xy, tokens = xx + x64.T @ x64, xy + x64.T @ y64, tokens + int(keep.sum())
        if i == 0:
            first = fit.xx.clone()  # read between batches: summing goes on after the fill
    assert torch.equal(first, first.T)
    fit.merge(other)
    assert fit.tokens == tokens and torch.equal(fit.xx, fit.xx.T)
    assert torch.allclose(fit.xx, xx, rtol=1e-5, atol=1e-3) and torch.allclose(fit.xy, xy, rtol=1e-5, atol=1e-3)


@pytest.mark.parametrize("family, rotation", [(f, "per-layer") for f in DENSE_FAMILIES]
                         + [(f, "uniform") for f in ("llama", "gemma3_text", "phi")])
def test_compensation_at_sparsity_zero_changes_nothing(family, rotation, exact_norms, calibration):
    """Every fit returns the paper's weights when they are exact: the 1e-8 invariance holds."""
    model = make_model(family, torch.float64)
    ids = calibration.input_ids[:2]
    with torch.no_grad():
        expected = model(ids).logits
    adapter = get_adapter(model.config)
    d = get_path(model, adapter.embeddings[0]).weight.shape[-1]
    view, batches = ResidentModel(model), calibration.batches(4)
    if rotation == "uniform":
        outcome = slice_uniform(view, adapter, batches, d, progress=False, compensate="all")
    else:
        outcome = slice_layers(view, adapter, batches, [d] * (_steps(model) + 1), progress=False, compensate="all",
                               slice_head=adapter.slice_head_required)
    assert outcome.fits
    with torch.no_grad():
        assert torch.allclose(model(ids).logits, expected, atol=1e-8, rtol=0)


@pytest.mark.parametrize("rotation", ["per-layer", "uniform"])
@pytest.mark.parametrize("family, dense_share", [("llama", 1.0), ("llama", 0.25), ("gemma3_text", 0.25),
                                                 ("phi", 1.0), ("gpt2", 0.25), ("opt", 1.0)])
def test_compensation_never_makes_a_step_worse(family, dense_share, rotation, calibration):
    """Per step, each fit's calibration error (the dense model's output of the step against
    the sliced model's; with a dense share below 1, the dense weights' output on the sliced
    input on the other windows) is at most that of the paper's weights, in the same run."""
    model = make_model(family, torch.float64)
    adapter = get_adapter(model.config)
    view = ResidentModel(model)
    batches, dense = dense_first_batches(calibration, 4, Ranks(), dense_share)
    assert (dense is None) == (dense_share == 1) and len(batches) > (dense or 0)  # windows without the dense stream
    if rotation == "uniform":
        if family in ("gpt2", "opt"):
            pytest.skip("uniform rotation is exact only where the stock class allows it; compensation is the same code")
        outcome = slice_uniform(view, adapter, batches, 40, progress=False, compensate="all", dense_batches=dense)
    else:
        outcome = slice_layers(view, adapter, batches, [40] * (_steps(model) + 1), progress=False,
                               compensate="all", slice_head=adapter.slice_head_required, dense_batches=dense)
    steps = {f.step for f in outcome.fits}
    assert steps == set(range(_steps(model)))
    assert any(f.part == "writers" for f in outcome.fits) and any(f.part.startswith("readers") for f in outcome.fits)
    for f in outcome.fits:
        assert f.error_fitted <= f.error_paper * (1 + 1e-9) + 1e-15, f
    assert sum(f.error_fitted for f in outcome.fits) < sum(f.error_paper for f in outcome.fits)


@pytest.mark.parametrize("family", ["llama", "phi"])
def test_without_dense_targets_the_fits_keep_the_papers_weights(family, exact_norms, calibration):
    """Dense share 0: every target is the dense weights' output on the sliced input, which the
    paper's weights meet exactly, so stream-sliced compensation gives the paper's model; with
    neurons to prune the fit still prunes them (and differs)."""
    ids = calibration.input_ids[:2]
    paper, _ = slicegpt.slice_model(make_model(family, torch.float64), None, calibration.input_ids,
                                    recipe="paper", slicing=0.25, progress=False)
    local, config = slicegpt.slice_model(make_model(family, torch.float64), None, calibration.input_ids,
                                         slicing=0.25, neurons="off", dense_share=0.0, progress=False)
    assert config.compensate == "writers" and config.dense_share == 0.0
    assert config.compensation["writers"]["error_fitted"] == 0.0
    with torch.no_grad():
        expected = paper(ids).logits
        assert torch.allclose(local(ids).logits, expected, atol=1e-10, rtol=0)
    if family == "llama":
        pruned, config = slicegpt.slice_model(make_model(family, torch.float64), None, calibration.input_ids,
                                              size=0.8, dense_share=0.0, progress=False)
        assert config.mlp_neurons is not None and config.mlp_neurons < config.mlp_neurons_dense
        assert config.compensation["writers"]["error_fitted"] > 0.0


@pytest.mark.parametrize("mode", ["tied", "untied", "slice-head", "uniform"])
@pytest.mark.parametrize("family", DENSE_FAMILIES)
def test_parameter_model_counts_every_matrix_before_slicing(family, mode, calibration):
    """The count predicted from the dense shapes equals the sliced model's, unequal widths included."""
    model = make_model(family)
    adapter = get_adapter(model.config)
    n = _steps(model)
    rng = random.Random(family)
    source_tied = ties_head(model, adapter)
    view = ResidentModel(model)
    if mode == "uniform":
        widths = [40] * (n + 1)
        tied = uniform_ties(view, adapter, False)
        predicted = parameter_model(model, adapter, rotation="uniform", tied=tied, source_tied=source_tied,
                                    slice_head=True)
        slice_uniform(view, adapter, calibration.batches(4), 40, progress=False)
    else:
        widths = [rng.choice([24, 32, 40, 48, 56]) for _ in range(n + 1)]
        slice_head = mode == "slice-head" or adapter.slice_head_required
        tied = mode == "tied" and not slice_head and not adapter.entry_writers and source_tied
        predicted = parameter_model(model, adapter, rotation="per-layer", tied=tied, source_tied=source_tied,
                                    slice_head=slice_head)
        slice_layers(view, adapter, calibration.batches(4), widths, slice_head=slice_head,
                     keep_tied_head=mode == "tied", progress=False)
    assert predicted.count(widths) == slicegpt.count_parameters(model)


def test_allocation_meets_the_budget_within_one_round_to_step_and_prefers_steep_spectra():
    from slicegpt.core.budget import ParameterModel

    params = ParameterModel(constant=1000, linear=[100] * 5, skip=True, fixed={4: 64})
    steep = torch.cat([torch.tensor([100.0]), torch.full((63,), 1e-3)])
    flat = torch.ones(64)
    spectra = [flat, steep, flat, steep, flat]
    budget = params.count([48, 48, 48, 48, 64])
    widths = allocate(spectra, params, budget, 8, 64)
    assert params.count(widths) <= budget
    assert all(w % 8 == 0 for w in widths) and widths[4] == 64
    assert widths[1] < widths[0] and widths[3] < widths[2]  # the steep boundaries give up more
    for b in range(4):  # no single step could be given back within the budget
        if widths[b] < 64:
            assert params.count(widths[:b] + [widths[b] + 8] + widths[b + 1:]) > budget
    with pytest.raises(SliceGPTError, match="budget"):
        allocate(spectra, params, 10, 8, 64)


@pytest.mark.parametrize("widths", ["equal", "adaptive"])
def test_a_parameter_budget_is_met_within_one_round_to_step(widths, calibration):
    model = make_model("llama")
    dense = slicegpt.count_parameters(model)
    sliced, config = slicegpt.slice_model(model, None, calibration.input_ids, size=0.8, widths=widths,
                                          compensate="off", neurons="off", progress=False, batch_size=4)
    count = slicegpt.count_parameters(sliced)
    assert count == config.parameters_sliced <= 0.8 * dense
    assert config.parameters_budget == 0.8 and config.widths_rule == widths
    assert all(w % 8 == 0 for w in config.widths)
    adapter = get_adapter(model.config)
    predicted = parameter_model(make_model("llama"), adapter, rotation="per-layer", tied=config.tied_head,
                                source_tied=True, slice_head=False)
    assert predicted.count(config.widths) == count
    if widths == "adaptive":  # one round-to step more at any boundary would break the budget
        for b in range(len(config.widths) - 1):  # the last boundary is the head's (full width)
            if config.widths[b] < 64:
                wider = config.widths[:b] + [config.widths[b] + 8] + config.widths[b + 1:]
                assert predicted.count(wider) > 0.8 * dense, b
    else:
        assert len(set(config.widths[:-1])) == 1  # the next equal width would not fit
        wider = [config.widths[0] + 8] * (len(config.widths) - 1) + config.widths[-1:]
        assert predicted.count(wider) > 0.8 * dense


def test_adaptive_widths_keep_the_paper_count_and_the_model_decodes(tmp_path, tokenizer, calibration):
    """Compensation with adaptive widths on a tiny model: unequal widths, no more parameters than the paper's at the
    same sparsity, saved and loaded both ways, KV-cache generation equal to no cache."""
    from transformers import AutoModelForCausalLM

    paper, paper_config = slicegpt.slice_model(make_model("llama"), None, calibration.input_ids,
                                               recipe="paper", slicing=0.3, progress=False)
    model, config = slicegpt.slice_model(make_model("llama"), None, calibration.input_ids, slicing=0.3,
                                         progress=False, widths="adaptive", neurons="off")
    assert config.method == "default" and config.compensate == "writers" and config.widths_rule == "adaptive"
    assert len(set(config.widths[:-1])) > 1, config.widths
    assert config.parameters_sliced <= paper_config.parameters_sliced
    assert config.compensation["writers"]["error_fitted"] < config.compensation["writers"]["error_paper"]
    out = slicegpt.save(model, tokenizer, config, tmp_path / "out")
    ids = calibration.input_ids[:2]
    expected = model(ids).logits
    assert torch.equal(slicegpt.load(out).model(ids).logits, expected)
    remote = AutoModelForCausalLM.from_pretrained(out, trust_remote_code=True).eval()
    assert torch.equal(remote(ids).logits, expected)
    prompt = calibration.input_ids[:1, :8]
    cached = remote.generate(prompt, max_new_tokens=6, do_sample=False, pad_token_id=0)
    uncached = prompt
    for _ in range(6):
        uncached = torch.cat([uncached, model(uncached).logits[:, -1:].argmax(-1)], dim=1)
    assert torch.equal(cached, uncached)
    again = slicegpt.SlicingConfig.from_dict(json.loads((out / "slicegpt.json").read_text())["slicing"])
    assert again.widths == config.widths and again.compensate == "writers" and again.method == "default"


def test_bad_lever_settings_are_refused_in_one_line(calibration):
    with pytest.raises(SliceGPTError, match="unknown recipe 'best'; choose one of default, max, paper"):
        slicegpt.slice_model(make_model("llama"), None, calibration.input_ids, size=0.8, recipe="best")
    with pytest.raises(SliceGPTError, match="--widths must be one of"):
        slicegpt.slice_model(make_model("llama"), None, calibration.input_ids, size=0.8, widths="random")
    for share in (-0.1, 1.5, float("nan")):
        with pytest.raises(SliceGPTError, match=r"--dense-share must be in \[0, 1\]"):
            slicegpt.slice_model(make_model("llama"), None, calibration.input_ids, size=0.8, dense_share=share)
    with pytest.raises(SliceGPTError, match="--compensate must be one of"):
        slicegpt.slice_model(make_model("llama"), None, calibration.input_ids, size=0.8, compensate="some")
    with pytest.raises(SliceGPTError, match="--widths adaptive applies to per-layer rotation"):
        slicegpt.slice_model(make_model("llama"), None, calibration.input_ids, size=0.6, rotation="uniform",
                             widths="adaptive")
    with pytest.raises(SliceGPTError, match=r"--size is the share of the dense parameters to keep, in \(0, 1\)"):
        slicegpt.slice_model(make_model("llama"), None, calibration.input_ids, size=75)
    with pytest.raises(SliceGPTError, match="budget of .* still holds? .* choose a larger --size"):
        slicegpt.slice_model(make_model("llama"), None, calibration.input_ids, size=0.01, progress=False)
    with pytest.raises(SliceGPTError, match="budget of .* still holds? .* choose a larger --size"):
        slicegpt.plan_slice(make_model("llama"), size=0.01, widths="equal")
