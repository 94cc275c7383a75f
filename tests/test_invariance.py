"""Fusing norms and rotating the residual stream must not change the model's function."""

import pytest
import torch

from slicegpt.adapters import get_adapter
from slicegpt.adapters.base import branch_groups
from slicegpt.core.engine import slice_layers
from slicegpt.core.invariance import fuse_norms
from slicegpt.core.onload import ResidentModel
from slicegpt.modeling.runtime import get_path
from conftest import FAMILIES, clone, make_model

IDS = torch.randint(0, 300, (3, 20), generator=torch.Generator().manual_seed(1))


def rotate_at_full_width(model, adapter, batches) -> None:
    """Per-layer rotation keeping every one of the 64 coordinates at each block boundary, in place."""
    steps = len(get_path(model, adapter.layers)) * len(branch_groups(adapter.branches))
    slice_layers(ResidentModel(model), adapter, batches, [64] * (steps + 1), progress=False)


@pytest.mark.parametrize("model_type", FAMILIES)
def test_fused_model_is_equivalent_float64(model_type, exact_norms):
    model = make_model(model_type, torch.float64)
    reference = model(IDS).logits
    fused = clone(model)
    fuse_norms(fused, get_adapter(fused.config))
    assert (fused(IDS).logits - reference).abs().max() < 1e-8


@pytest.mark.parametrize("model_type", FAMILIES)
def test_rotated_model_at_zero_sparsity_is_equivalent_float64(model_type, exact_norms, calibration):
    model = make_model(model_type, torch.float64)
    reference = model(IDS).logits
    rotated = clone(model)
    adapter = get_adapter(rotated.config)
    rotate_at_full_width(rotated, adapter, calibration.batches(4))
    # the rotation really happened: in the embeddings, or (tied head) in the first layer's entry matrix
    embedding = adapter.embeddings[0]
    entry = getattr(get_path(rotated, adapter.layers)[0], "entry_rotation", None)
    if entry is None:
        assert not torch.allclose(get_path(rotated, embedding).weight, get_path(model, embedding).weight)
    else:
        assert not torch.allclose(entry, torch.eye(64, dtype=entry.dtype))
    assert (rotated(IDS).logits - reference).abs().max() < 1e-8


@pytest.mark.parametrize("model_type", FAMILIES)
def test_rotated_model_at_zero_sparsity_is_equivalent_float32(model_type, calibration):
    model = make_model(model_type, torch.float32)
    reference = model(IDS).logits
    rotated = clone(model)
    rotate_at_full_width(rotated, get_adapter(rotated.config), calibration.batches(4))
    error = (rotated(IDS).logits - reference).abs().max() / reference.abs().max()
    assert error < 1e-4
