"""Shapes, parameter counts, generation and failure modes of sliced models."""

import math

import pytest
import torch

import slicegpt
from slicegpt.adapters import get_adapter
from slicegpt.data import Windows
from slicegpt.core.bases import Covariance
from slicegpt.core.bases import sliced_dim
from conftest import FAMILIES, clone, make_model

V, D, I, H, KV, HD, L = 300, 64, 96, 4, 2, 16, 3

# how the stream is sliced: the default recipe without MLP neurons (neurons: test_mlp.py)
STREAM = dict(neurons="off")


@pytest.mark.parametrize("sparsity,expected", [(0.0, 64), (0.25, 48), (0.3, 40), (0.5, 32), (0.99, 8)])
def test_sliced_dim_rounds_down_to_multiple_of_8(sparsity, expected):
    assert sliced_dim(64, sparsity) == expected


def test_sliced_dim_round_to_is_configurable():
    assert sliced_dim(576, 0.25, round_to=1) == 432
    assert sliced_dim(100, 0.25, round_to=1) == 75
    assert sliced_dim(100, 0.25, round_to=16) == 64


@pytest.mark.parametrize("sparsity", [-0.1, 1.0, 1.5, float("nan")])
def test_sparsity_outside_range_is_refused(sparsity):
    with pytest.raises(slicegpt.SliceGPTError, match="sparsity must be in"):
        sliced_dim(64, sparsity)


def expected_llama_parameters(k: int, slice_head: bool, tied: bool) -> int:
    """Independent count for the tiny Llama: every kept weight plus every skip matrix."""
    head_in = k if slice_head else D
    per_layer_in = k * (H * HD) + 2 * k * (KV * HD) + 2 * k * I  # q, k, v, gate, up
    per_layer_out = (H * HD) * k + I * k                         # o rows, down rows
    norms = 2 * k
    shortcuts = 2 * k * k
    layers = L * (per_layer_in + per_layer_out + norms + shortcuts)
    # the last branch writes the unsliced head input when the head is not sliced
    layers += (I * head_in - I * k) + (k * head_in - k * k)
    if tied:  # full embedding table shared with the head, plus the d x k entry matrix
        return V * D + D * k + layers + D
    return V * k + layers + head_in + V * head_in


@pytest.mark.parametrize("slice_head,keep_tied,head", [(False, True, "auto"), (False, False, "untied"),
                                                       (True, True, "sliced")])
def test_shapes_and_parameter_counts(calibration, slice_head, keep_tied, head):
    model = make_model("llama")
    assert slicegpt.count_parameters(model) == V * D + L * (4 * D * D // 1 - 2 * D * D + 2 * D * KV * HD
                                                            + 3 * D * I + 2 * D) + D  # tied head
    sliced, config = slicegpt.slice_model(model, None, calibration, slicing=0.25, **STREAM, head=head,
                                          progress=False)
    k = 48
    tied = keep_tied and not slice_head
    assert config.sliced_hidden_size == k and config.hidden_size == D and config.tied_head is tied
    layer = sliced.model.layers[0]
    assert layer.self_attn.q_proj.weight.shape == (H * HD, k)
    assert layer.self_attn.k_proj.weight.shape == (KV * HD, k)
    assert layer.self_attn.o_proj.weight.shape == (k, H * HD)
    assert layer.mlp.down_proj.weight.shape == (k, I)
    assert layer.attn_shortcut.shape == (k, k) and layer.mlp_shortcut.shape == (k, k)
    head_in = k if slice_head else D
    assert sliced.model.layers[-1].mlp.down_proj.weight.shape == (head_in, I)
    assert sliced.model.layers[-1].mlp_shortcut.shape == (k, head_in)
    assert sliced.lm_head.weight.shape == (V, head_in)
    if tied:
        assert sliced.model.embed_tokens.weight.shape == (V, D) and layer.entry_rotation.shape == (D, k)
        assert sliced.lm_head.weight is sliced.model.embed_tokens.weight
    else:
        assert sliced.model.embed_tokens.weight.shape == (V, k) and not hasattr(layer, "entry_rotation")
        assert sliced.lm_head.weight is not sliced.model.embed_tokens.weight
    assert config.parameters_sliced == slicegpt.count_parameters(sliced) == expected_llama_parameters(k, slice_head, tied)


def test_tied_and_untied_heads_compute_the_same_function(calibration):
    model = make_model("llama", torch.float64)
    ids = calibration.input_ids[:2]
    tied, _ = slicegpt.slice_model(clone(model), None, calibration, slicing=0.25, **STREAM, progress=False)
    untied, _ = slicegpt.slice_model(clone(model), None, calibration, slicing=0.25, **STREAM, head="untied",
                                     progress=False)
    assert slicegpt.count_parameters(tied) < slicegpt.count_parameters(untied)
    assert (tied(ids).logits - untied(ids).logits).abs().max() < 1e-8


def test_rms_norm_constants_follow_the_kept_width(calibration):
    sliced, _ = slicegpt.slice_model(make_model("llama"), None, calibration, slicing=0.25, **STREAM, progress=False)
    norm = sliced.model.layers[1].input_layernorm
    assert torch.allclose(norm.weight, torch.full((48,), math.sqrt(64 / 48)))
    assert norm.variance_epsilon == pytest.approx(sliced.config.rms_norm_eps * 64 / 48)


@pytest.mark.parametrize("model_type", FAMILIES)
def test_generation_with_kv_cache_matches_full_recompute(model_type, calibration):
    sliced, _ = slicegpt.slice_model(make_model(model_type), None, calibration, slicing=0.25, **STREAM, progress=False)
    prompt = torch.tensor([[5, 17, 42, 99, 7]])
    cached = sliced.generate(prompt, max_new_tokens=12, do_sample=False, use_cache=True)
    uncached = sliced.generate(prompt, max_new_tokens=12, do_sample=False, use_cache=False)
    assert torch.equal(cached, uncached)
    # and each greedy token is the argmax of a full forward over the sequence so far
    for t in range(prompt.shape[1], cached.shape[1]):
        assert sliced(cached[:, :t]).logits[0, -1].argmax() == cached[0, t]


def test_slicing_keeps_most_of_a_low_rank_signal(calibration):
    """On a model whose residual stream lives in 40 dims, slicing to 48 loses (almost) nothing."""
    model = make_model("llama", torch.float64)
    with torch.no_grad():
        basis = torch.linalg.qr(torch.randn(D, 40, dtype=torch.float64))[0]
        project = basis @ basis.T
        model.model.embed_tokens.weight.copy_(model.model.embed_tokens.weight @ project)
        for layer in model.model.layers:
            layer.self_attn.o_proj.weight.copy_(project @ layer.self_attn.o_proj.weight)
            layer.mlp.down_proj.weight.copy_(project @ layer.mlp.down_proj.weight)
    ids = calibration.input_ids[:2]
    reference = model(ids).logits
    sliced, _ = slicegpt.slice_model(clone(model), None, calibration, slicing=0.25, **STREAM, progress=False)
    assert (sliced(ids).logits - reference).abs().max() < 1e-6
    cut, _ = slicegpt.slice_model(clone(model), None, calibration, slicing=0.5, **STREAM,
                                  progress=False)  # 32 < 40 dims
    assert (cut(ids).logits - reference).abs().max() > 1e-3


def test_covariance_is_float64_and_ignores_padding():
    x = torch.randn(2, 5, 8)
    mask = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]])
    cov = Covariance(8)
    cov.update(x, mask)
    real = torch.cat([x[0, :3], x[1]]).double()
    assert cov.matrix.dtype == torch.float64 and cov.tokens == 8
    assert torch.allclose(cov.matrix, real.T @ real)
    values, vectors = cov.eigh()
    assert torch.all(values[:-1] >= values[1:])
    assert torch.allclose(vectors.T @ vectors, torch.eye(8, dtype=torch.float64), atol=1e-12)


def test_padded_calibration_matches_unpadded(calibration):
    """Padding tokens must not enter the covariance: padded batches give the same sliced model."""
    model = make_model("llama")
    ids = calibration.input_ids[:4]
    padded_ids = torch.cat([ids, torch.zeros(4, 16, dtype=torch.long)], dim=1)
    padded = Windows(padded_ids, torch.cat([torch.ones_like(ids), torch.zeros(4, 16, dtype=torch.long)], 1))
    a, _ = slicegpt.slice_model(clone(model), None, Windows(ids, torch.ones_like(ids)), slicing=0.25, **STREAM,
                                progress=False)
    b, _ = slicegpt.slice_model(clone(model), None, padded, slicing=0.25, **STREAM, progress=False)
    assert torch.allclose(a(ids).logits, b(ids).logits, atol=1e-4)


def test_already_sliced_model_is_refused(calibration):
    sliced, _ = slicegpt.slice_model(make_model("llama"), None, calibration, slicing=0.25, **STREAM, progress=False)
    with pytest.raises(slicegpt.SliceGPTError, match="already sliced"):
        slicegpt.slice_model(sliced, None, calibration, slicing=0.25, **STREAM, progress=False)


def test_nan_activations_give_a_clear_error(calibration):
    model = make_model("llama")
    with torch.no_grad():
        model.model.layers[1].mlp.down_proj.weight[0, 0] = float("nan")
    with pytest.raises(slicegpt.SliceGPTError, match="non-finite values .* layer 1 \\(mlp\\)"):
        slicegpt.slice_model(model, None, calibration, slicing=0.25, **STREAM, progress=False)


def test_unsupported_and_encoder_models_are_refused():
    from transformers import BertConfig, FalconConfig

    with pytest.raises(slicegpt.SliceGPTError, match="unsupported model type 'falcon'.*gpt2.*llama.*opt.*qwen3_moe"):
        get_adapter(FalconConfig())
    with pytest.raises(slicegpt.SliceGPTError, match="encoder"):
        get_adapter(BertConfig())


@pytest.mark.parametrize("config,message", [
    (dict(model_type="opt", do_layer_norm_before=False), "post-LN"),
    (dict(model_type="gpt2", add_cross_attention=True), "cross-attention"),
    (dict(model_type="gemma3"), "multimodal"),
])
def test_family_variants_that_cannot_be_sliced_are_refused(config, message):
    from transformers import AutoConfig

    model_type = config.pop("model_type")
    with pytest.raises(slicegpt.SliceGPTError, match=message):
        get_adapter(AutoConfig.for_model(model_type, **config))


@pytest.mark.parametrize("model_type,parallel", [("gpt_neox", True), ("gpt_neox_sequential", False)])
def test_parallel_residual_follows_the_config(model_type, parallel, calibration):
    from conftest import make_config

    adapter = get_adapter(make_config(model_type))
    assert adapter.branches[1].parallel is parallel
    sliced, _ = slicegpt.slice_model(make_model(model_type), None, calibration, slicing=0.25, **STREAM, progress=False)
    layer = sliced.gpt_neox.layers[0]
    assert hasattr(layer, "attn_shortcut") and hasattr(layer, "mlp_shortcut") is not parallel


@pytest.mark.parametrize("keep_tied", [False, True])
def test_layernorm_models_become_rmsnorm_models_with_folded_biases(calibration, keep_tied):
    from torch import nn

    from slicegpt.modeling.runtime import RMSNorm

    model = make_model("opt")
    sliced, config = slicegpt.slice_model(model, None, calibration, recipe="paper", slicing=0.25,
                                          head="auto" if keep_tied else "untied",
                                          progress=False)  # equal widths: the shapes below
    layer = sliced.model.decoder.layers[0]
    assert isinstance(layer.self_attn_layer_norm, RMSNorm) and isinstance(layer.final_layer_norm, RMSNorm)
    assert layer.self_attn_layer_norm.weight.shape == (48,)
    final = sliced.model.decoder.final_layer_norm
    if keep_tied:  # the final LayerNorm reads the original basis, the head stays the embedding table
        assert type(final) is nn.LayerNorm and sliced.lm_head.weight is sliced.model.decoder.embed_tokens.weight
    else:
        assert isinstance(final, RMSNorm)
        assert sliced.lm_head.bias is not None and sliced.lm_head.bias.shape == (V,)  # final-norm bias, folded
    assert config.parameters_sliced == slicegpt.count_parameters(sliced)


def test_post_norm_branches_keep_full_width_writers_and_count_their_rotations(calibration):
    """Gemma 2/3: the branch-output norm needs all d coordinates, then a d x k matrix rotates and slices."""
    sliced, config = slicegpt.slice_model(make_model("gemma2"), None, calibration, slicing=0.25, **STREAM,
                                          progress=False,
                                          widths="equal")  # the shapes below
    first, last = sliced.model.layers[0], sliced.model.layers[-1]
    assert first.self_attn.o_proj.weight.shape == (D, H * 16) and first.mlp.down_proj.weight.shape == (D, I)
    assert first.attn_out_rotation.shape == (D, 48) and first.mlp_out_rotation.shape == (D, 48)
    assert first.post_attention_layernorm.weight.shape == (D,)
    assert not hasattr(last, "mlp_out_rotation")  # head not sliced: the last output stays in the original basis
    assert config.parameters_sliced == slicegpt.count_parameters(sliced)
