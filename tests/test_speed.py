"""`slicegpt bench`'s measurements: the decode path uses transformers' current cache API."""

import warnings

import pytest
import torch

import slicegpt
from slicegpt.evaluation.speed import cache_keyword, decode, prefill
from conftest import make_model


@pytest.fixture
def models(calibration):
    dense = make_model("llama")
    sliced, _ = slicegpt.slice_model(make_model("llama"), None, calibration, recipe="paper", slicing=0.25,
                                     progress=False)
    return {"dense": dense.eval(), "sliced": sliced.eval()}


@pytest.mark.parametrize("name", ["dense", "sliced"])
def test_decode_warns_of_nothing_deprecated(models, name):
    """transformers deprecated `past_key_values` (a FutureWarning on every decoded token); ours pass `cache`."""
    with warnings.catch_warnings():
        warnings.simplefilter("error", FutureWarning)
        warnings.simplefilter("error", DeprecationWarning)
        seconds, _ = decode(models[name], batch=1, seqlen=8, new_tokens=3, repeats=1)
        prefill(models[name], batch=1, seqlen=8, repeats=1)
    assert seconds > 0


@pytest.mark.parametrize("name", ["dense", "sliced"])
def test_the_cache_passed_by_its_current_name_is_used(models, name):
    """A cache passed under a name forward ignores would decode without it: the next token's
    logits would then be those of the token alone, not of the continued sequence."""
    model = models[name]
    keyword = cache_keyword(model)
    ids = torch.randint(3, 200, (1, 9), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        whole = model(input_ids=ids).logits[:, -1]
        out = model(input_ids=ids[:, :-1], use_cache=True)
        step = model(input_ids=ids[:, -1:], use_cache=True, **{keyword: out[keyword]}).logits[:, -1]
    torch.testing.assert_close(step, whole, rtol=1e-4, atol=1e-5)
