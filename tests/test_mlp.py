"""Pruning MLP neurons in compensation's fit (`--neurons`): the OBS math, shapes, budgets, formats."""

import copy
import json

import pytest
import torch

import slicegpt
from conftest import make_model
from slicegpt.adapters import get_adapter
from slicegpt.core.budget import parameter_model
from slicegpt.core.widths import MLP_FLOOR
from slicegpt.core.compensation import LeastSquares, _cholesky_solve, _factor, _inverse, _take, _take_rows, prune
from slicegpt.errors import SliceGPTError


def _fit(n_in: int = 10, n_out: int = 4, tokens: int = 400, seed: int = 0) -> tuple[LeastSquares, torch.Tensor]:
    torch.manual_seed(seed)
    x = torch.randn(tokens, n_in, dtype=torch.float64) * torch.linspace(0.2, 2.0, n_in, dtype=torch.float64)
    w = torch.randn(n_in, n_out, dtype=torch.float64)
    fit = LeastSquares(n_in, n_out)
    fit.update(x, x @ w + 0.05 * torch.randn(tokens, n_out, dtype=torch.float64))
    return fit, w


@pytest.mark.parametrize("ridge", [1e-3, 0.1])
def test_pruned_fit_is_the_ridge_fit_of_the_kept_rows(ridge):
    """OBS's rank-one updates leave exactly the regularised least-squares fit on the rows it keeps."""
    fit, w = _fit()
    prior = w + 0.1 * torch.randn_like(w)
    pruned, kept, error_prior, error_fit = prune(copy.deepcopy(fit), prior, ridge, range(0, 8), keep=5)
    assert kept.tolist() == sorted(kept.tolist()) and len(kept) == 5 + 2 and {8, 9} <= set(kept.tolist())
    lam = ridge * float(fit.xx.diagonal().sum()) / 10
    h = fit.xx[kept][:, kept] + lam * torch.eye(len(kept), dtype=torch.float64)
    direct = torch.linalg.solve(h, fit.xy[kept] + lam * prior[kept])
    assert torch.allclose(pruned, direct, atol=1e-9, rtol=1e-9)
    full = torch.zeros_like(prior)
    full[kept] = pruned
    assert error_fit == pytest.approx(fit.error(full)) and error_prior == pytest.approx(fit.error(prior))


@pytest.mark.parametrize("n,share", [(7, 0.5), (300, 0.1), (300, 0.75), (300, 1.0), (1000, 0.99)])
def test_kept_rows_are_gathered_within_the_matrix_itself(n, share):
    """The kept rows (and columns) of a matrix, moved up within its own storage a block at a time,
    are what fancy indexing gives, for any share kept and either memory layout."""
    torch.manual_seed(n)
    m = torch.randn(n, n, dtype=torch.float64)
    kept = (torch.rand(n) < share).nonzero().flatten()
    expected, expected_rows = m[kept[:, None], kept], m[kept]
    storage = m.clone()
    taken = _take(storage, kept)
    assert torch.equal(taken, expected) and taken.data_ptr() == storage.data_ptr()
    assert torch.equal(_take_rows(m.clone(), kept), expected_rows)
    column_major = m[:, :5].T.contiguous().T
    assert torch.equal(_take_rows(column_major.clone(), kept), column_major[kept])


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_in_place_factor_inverse_and_solve_equal_torchs_own(dtype):
    """The fits factor, invert and solve in the matrix's own storage (LAPACK handed its column-major
    transpose): the same factor, inverse and solution as torch's functions on a copy."""
    torch.manual_seed(0)
    x = torch.randn(200, 64, dtype=torch.float64)
    a, b = x.T @ x, torch.randn(64, 5, dtype=torch.float64)
    shifted = a + 0.5 * torch.eye(64, dtype=torch.float64)
    h = a.clone()
    assert _factor(h, 0.5)
    assert torch.allclose(h, torch.linalg.cholesky(shifted)) and not h.triu(1).any()
    assert torch.allclose(_cholesky_solve(h, b), torch.linalg.solve(shifted, b))
    inverse = _inverse(a.to(dtype), 0.5, dtype)
    assert inverse.dtype == dtype and inverse.is_contiguous()
    tolerance = 1e-10 if dtype == torch.float64 else 1e-4
    assert torch.allclose(inverse.double(), torch.linalg.inv(shifted), rtol=tolerance, atol=tolerance)
    assert not _factor(-a.clone(), 0.5)  # not positive definite: reported, not raised


def test_pruning_drops_the_rows_that_carry_least():
    torch.manual_seed(1)
    x = torch.randn(600, 6, dtype=torch.float64)
    x[:, 5] = x[:, 0] + 1e-3 * torch.randn(600, dtype=torch.float64)  # a near copy of row 0
    w = torch.tensor([[1.0], [2.0], [0.01], [3.0], [1.5], [1.0]], dtype=torch.float64)
    fit = LeastSquares(6, 1)
    fit.update(x, x @ w)
    _, kept, _, error_fit = prune(fit, w, 1e-6, range(6), keep=4)
    assert 2 not in kept.tolist()  # a tiny weight goes first
    assert len({0, 5} & set(kept.tolist())) == 1  # of two copies one goes, the other takes its weight
    assert error_fit < 1e-3


@pytest.mark.parametrize("family", ["llama", "gemma3_text"])
def test_mlp_width_prunes_neurons_into_a_stock_model_that_saves_loads_and_decodes(family, tmp_path, tokenizer,
                                                                                   calibration):
    """Only neurons pruned: nothing rotated, the stock class with a smaller intermediate_size (Gemma 3:
    its branch-output norms kept as they are), every parameter predicted, save and reload exact,
    KV-cache generation equal to no cache."""
    from transformers import AutoModelForCausalLM

    dense = make_model(family)
    ids = calibration.input_ids[:2]
    # a size that half the neurons alone meet: the stream keeps its width
    model, config = slicegpt.slice_model(copy.deepcopy(dense), None, calibration.input_ids, size=0.8, neurons=0.5,
                                         allocation="equal", progress=False)
    assert type(model) is type(dense) and config.standard and config.rotation == "uniform"
    assert not config.deviations and config.max_logit_deviation < 1e-5
    assert config.mlp_neurons == 48 and config.mlp_neurons_dense == 96 and config.mlp_width == 0.5
    assert model.config.intermediate_size == 48 and model.config.hidden_size == 64
    assert all(layer.mlp.down_proj.weight.shape == (64, 48) and layer.mlp.gate_proj.weight.shape == (48, 64)
               for layer in model.model.layers)
    assert model.lm_head.weight is model.model.embed_tokens.weight  # the tied head stays tied
    adapter = get_adapter(dense.config)
    # the unrotated stream keeps the dense model's own norm gains and reader columns (not folded, not
    # re-equalized): the split of each coordinate's scale that quantized inputs need (docs/outputs.md)
    for layer, source in zip(model.model.layers, dense.model.layers):
        for norm in adapter.norm_names():
            assert torch.equal(layer.get_submodule(norm).weight, source.get_submodule(norm).weight)
        assert torch.equal(layer.self_attn.q_proj.weight, source.self_attn.q_proj.weight)
        kept = [next(i for i, row in enumerate(source.mlp.up_proj.weight) if torch.equal(row, r))
                for r in layer.mlp.up_proj.weight]
        assert torch.equal(layer.mlp.gate_proj.weight, source.mlp.gate_proj.weight[kept])
    predicted = parameter_model(dense, adapter, rotation="none", tied=True, source_tied=True, slice_head=True)
    assert predicted.count([64] * 7, 48) == slicegpt.count_parameters(model) == config.parameters_sliced
    assert config.parameters_sliced < slicegpt.count_parameters(dense)
    out = slicegpt.save(model, tokenizer, config, tmp_path / "out")
    assert json.loads((out / "config.json").read_text())["intermediate_size"] == 48
    plain = AutoModelForCausalLM.from_pretrained(out).eval()
    with torch.no_grad():
        expected = model(ids).logits
        assert torch.equal(plain(ids).logits, expected)
    prompt = calibration.input_ids[:1, :8]
    cached = plain.generate(prompt, max_new_tokens=6, do_sample=False, pad_token_id=0)
    uncached = prompt
    with torch.no_grad():
        for _ in range(6):
            uncached = torch.cat([uncached, plain(uncached, use_cache=False).logits[:, -1:].argmax(-1)], dim=1)
    assert torch.equal(cached, uncached)


def test_neurons_and_a_sliced_stream_save_and_load_both_ways(tmp_path, tokenizer, calibration):
    from transformers import AutoModelForCausalLM

    dense = make_model("llama")
    adapter = get_adapter(dense.config)
    predicted = parameter_model(dense, adapter, rotation="per-layer", tied=True, source_tied=True, slice_head=False)
    total = slicegpt.count_parameters(dense)
    # the count of width 40 with half the neurons (on this tiny model width 48's skip matrices count more
    # than the unrotated stream with those neurons, which the plan would choose instead)
    size = (predicted.count([40] * 6 + [64], 48) + 0.5) / total
    model, config = slicegpt.slice_model(dense, None, calibration.input_ids, size=size, neurons=0.5,
                                         allocation="equal", progress=False)
    assert config.rotation == "per-layer" and config.widths[0] == 40 and config.mlp_neurons == 48
    ids = calibration.input_ids[:2]
    with torch.no_grad():
        expected = model(ids).logits
    out = slicegpt.save(model, tokenizer, config, tmp_path / "out")
    with torch.no_grad():
        assert torch.equal(slicegpt.load(out).model(ids).logits, expected)
        remote = AutoModelForCausalLM.from_pretrained(out, trust_remote_code=True).eval()
        assert torch.equal(remote(ids).logits, expected)
    assert predicted.count(config.widths, 48) == config.parameters_sliced


@pytest.mark.parametrize("budget", [0.8, 0.6])
def test_auto_meets_a_parameter_budget_with_neurons_first(budget, calibration):
    """auto: neurons alone while at least 40% of them stay (stream untouched); past that, the
    stream is sliced for the rest. Within one round-to step of neurons (or stream width)."""
    dense = make_model("llama")
    total = slicegpt.count_parameters(dense)
    model, config = slicegpt.slice_model(copy.deepcopy(dense), None, calibration.input_ids, size=budget,
                                         progress=False)
    count = slicegpt.count_parameters(model)
    assert count == config.parameters_sliced <= budget * total
    assert config.mlp_width == "auto" and config.mlp_neurons % 8 == 0
    adapter = get_adapter(dense.config)
    if budget == 0.8:
        assert set(config.widths) == {64} and config.rotation == "uniform" and config.mlp_neurons >= 48
        assert config.standard == (len(set(config.mlp_neurons_per_layer)) == 1)  # else each MLP its own width
        unrotated = parameter_model(dense, adapter, rotation="uniform", tied=True, source_tied=True, slice_head=True)
        assert unrotated.count(config.widths, config.mlp_neurons + 8) > budget * total
    else:
        floor = -(-int(MLP_FLOOR * 96) // 8) * 8  # the floor's share of 96 neurons, rounded up to 8
        assert config.mlp_neurons == floor and config.widths[0] < 64 and not config.standard
        per_layer = parameter_model(dense, adapter, rotation="per-layer", tied=True, source_tied=True,
                                    slice_head=False)
        wider = [config.widths[0] + 8] * (len(config.widths) - 1) + config.widths[-1:]
        assert per_layer.count(wider, floor) > budget * total


@pytest.mark.parametrize("sparsity", [0.1, 0.25])
@pytest.mark.parametrize("family", ["llama", "gemma3_text"])
def test_default_size_of_the_papers_share_of_the_decoder_layers(family, sparsity, calibration):
    """The default recipe at the size that removes s of the decoder layers' weights (what --sparsity s
    meant under the default method) gets there by neurons alone (a stock model, the stream unrotated),
    within one round-to step: smaller than the paper's model at slicing s (at 10% that one is even
    larger than the dense model: untied head, skip matrices)."""
    dense = make_model(family)
    total = slicegpt.count_parameters(dense)
    layer_weights = sum(p.numel() for p in dense.model.layers.parameters())
    _, paper = slicegpt.slice_model(copy.deepcopy(dense), None, calibration.input_ids, recipe="paper",
                                    slicing=sparsity, progress=False)
    if sparsity == 0.1:
        assert paper.parameters_sliced > total
    budget = total - int(sparsity * layer_weights)
    model, config = slicegpt.slice_model(copy.deepcopy(dense), None, calibration.input_ids,
                                         size=(budget + 0.5) / total, allocation="equal", progress=False)
    assert int(config.size * total) == budget
    assert type(model) is type(dense) and config.standard and config.mlp_neurons % 8 == 0
    assert config.sparsity == 0.0 and set(config.widths) == {64}
    assert slicegpt.count_parameters(model) == config.parameters_sliced <= budget < paper.parameters_sliced
    unrotated = parameter_model(dense, get_adapter(dense.config), rotation="none", tied=True, source_tied=True,
                                slice_head=True)
    assert unrotated.count(config.widths, config.mlp_neurons) == config.parameters_sliced
    assert unrotated.count(config.widths, config.mlp_neurons + 8) > budget


def test_bad_mlp_settings_are_refused_in_one_line(calibration):
    ids = calibration.input_ids
    with pytest.raises(SliceGPTError, match="fraction of MLP neurons to keep"):
        slicegpt.slice_model(make_model("llama"), None, ids, size=0.8, neurons=1.5)
    with pytest.raises(SliceGPTError, match="auto, off or the fraction"):
        slicegpt.slice_model(make_model("llama"), None, ids, size=0.8, neurons="half")
    with pytest.raises(SliceGPTError, match="needs compensation"):
        slicegpt.slice_model(make_model("llama"), None, ids, size=0.8, neurons=0.5, compensate="off")
    with pytest.raises(SliceGPTError, match="pruned only while the stream keeps its width"):  # half alone: 0.75
        slicegpt.slice_model(make_model("gemma3_text"), None, ids, size=0.6, neurons=0.5, progress=False)
    with pytest.raises(SliceGPTError, match=r"not described for opt models \(llama, .*gemma3_text have it\)"):
        slicegpt.slice_model(make_model("opt"), None, ids, size=0.8, neurons=0.5, progress=False)


@pytest.mark.parametrize("family", ["llama", "qwen2", "gemma3_text"])
def test_an_unrotated_run_without_pruning_changes_nothing(family, exact_norms, calibration):
    """The unrotated path (identity basis) is exact: tied head (its final norm untouched) and untied."""
    from slicegpt.core.engine import slice_uniform
    from slicegpt.core.onload import ResidentModel

    model = make_model(family, torch.float64)
    ids = calibration.input_ids[:2]
    with torch.no_grad():
        expected = model(ids).logits
    slice_uniform(ResidentModel(model), get_adapter(model.config), calibration.batches(4), 64, progress=False,
                  compensate="writers", identity=True)
    with torch.no_grad():
        assert torch.allclose(model(ids).logits, expected, atol=1e-8, rtol=0)


def test_equal_neurons_from_the_command_line_are_a_stock_model_with_fewer_neurons(tiny_model_dir, tmp_path):
    """`slicegpt slice --size 0.8 --allocation equal`: the size met by neurons, one count in every layer,
    a stock model that plain transformers loads (no larger than the paper's at slicing 0.25), whose GGUF
    file transformers reads back with the same logits."""
    from transformers import AutoModelForCausalLM

    from test_cli import TEXT_FILE, run

    out = tmp_path / "default"
    result = run("slice", tiny_model_dir, "--size", "0.8", "--allocation", "equal", "--calibration", TEXT_FILE,
                 "--samples", "8", "--seqlen", "64", "--eval-samples", "4", "--out", out, "--json")
    assert result.returncode == 0, result.stderr
    figures = json.loads(result.stdout.strip().splitlines()[-1])
    assert figures["standard"] is True and figures["mlp_neurons"] < 96 and figures["sliced_hidden_size"] == 64
    assert "MLP neurons" in result.stdout and "stock LlamaForCausalLM" in result.stdout
    paper = run("slice", tiny_model_dir, "--slicing", "0.25", "--recipe", "paper", "--calibration", TEXT_FILE,
                "--samples", "8", "--seqlen", "64", "--no-eval", "--out", tmp_path / "paper", "--json")
    assert paper.returncode == 0, paper.stderr
    assert figures["parameters_sliced"] <= json.loads(paper.stdout.strip().splitlines()[-1])["parameters_sliced"]
    plain = AutoModelForCausalLM.from_pretrained(out).eval()
    assert plain.config.intermediate_size == figures["mlp_neurons"]
    assert sum(p.numel() for p in plain.parameters()) == figures["parameters_sliced"]
    gguf = tmp_path / "default.gguf"
    exported = run("export", out, "--format", "gguf", "--dtype", "f32", "--out", gguf, "--json")
    assert exported.returncode == 0, exported.stderr
    back = AutoModelForCausalLM.from_pretrained(tmp_path, gguf_file=gguf.name, dtype=torch.float32)
    ids = torch.tensor([[5, 17, 42, 99, 123, 7]])
    with torch.no_grad():
        assert torch.allclose(back(ids).logits, plain(ids).logits, atol=1e-5)
    record = json.loads((out / "slicegpt.json").read_text())["slicing"]
    assert record["mlp_width"] == "auto" and record["mlp_neurons"] == figures["mlp_neurons"]
    assert record["sparsity"] == 0.0 and record["size"] == 0.8 and record["recipe"] == "default"


@pytest.mark.parametrize("block", [1, 8])
def test_an_ill_conditioned_search_in_float32_neither_fails_nor_prices_a_row_below_zero(block):
    """Near-copies of neurons at a tiny ridge: rounding takes some of H^-1's diagonal to or below zero in
    float32; such a row is not taken as free (a single-row step once failed on it). The Gram summed from
    float32 products is itself indefinite here on some CPUs (an Intel Xeon: least eigenvalue -161 against
    the ridge's shift of 21, so no inverse factored and the search stopped): the shift grows until one does."""
    torch.manual_seed(3)
    n = 192
    x = torch.randn(1000, n) * torch.logspace(0, 3, n)[torch.randperm(n)]
    for i in range(0, 60, 2):
        x[:, i + 1] = x[:, i] * (1 + 1e-4 * torch.randn(1))
    prior = torch.randn(n, 16, dtype=torch.float64)
    fit = LeastSquares(n, 16, prior=prior)
    fit.update(x)
    costs: list[float] = []
    _, kept, _, _ = prune(fit, prior, 3e-7, range(n), 15, work=torch.float32, costs=costs, block=block)
    assert len(kept) == 15 and len(costs) == n - 15 and min(costs) >= 0
