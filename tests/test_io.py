"""Save -> load round trips (slicegpt.load and plain transformers) and refusal of bad directories."""

import json
import subprocess
import sys

import pytest
import torch

import slicegpt
from conftest import FAMILIES, make_model

IDS = torch.randint(0, 300, (2, 24), generator=torch.Generator().manual_seed(3))


@pytest.fixture
def saved(tmp_path, calibration, tokenizer):
    model, config = slicegpt.slice_model(make_model("llama"), tokenizer, calibration, slicing=0.25, neurons="off",
                                         progress=False)  # the per-layer format
    out = slicegpt.save(model, tokenizer, config, tmp_path / "sliced")
    return model, out


@pytest.mark.parametrize("model_type", FAMILIES)
def test_round_trip_both_load_paths(model_type, tmp_path, calibration, tokenizer):
    from transformers import AutoModelForCausalLM

    model, config = slicegpt.slice_model(make_model(model_type), tokenizer, calibration, slicing=0.25, neurons="off",
                                         progress=False)  # the per-layer format
    out = slicegpt.save(model, tokenizer, config, tmp_path / "sliced")
    expected = model(IDS).logits
    loaded = slicegpt.load(out)
    assert torch.equal(loaded.model(IDS).logits, expected)
    assert loaded.sliced["slicing"]["sliced_hidden_size"] == config.sliced_hidden_size
    assert loaded.sliced["slicing"]["widths"] == config.widths
    remote = AutoModelForCausalLM.from_pretrained(out, trust_remote_code=True)
    assert torch.equal(remote(IDS).logits, expected)
    prompt = IDS[:1, :5]
    assert torch.equal(remote.generate(prompt, max_new_tokens=8, do_sample=False),
                       model.generate(prompt, max_new_tokens=8, do_sample=False))
    assert loaded.tokenizer("To be")["input_ids"] == tokenizer("To be")["input_ids"]


def test_weights_are_safetensors_and_config_is_stock(saved):
    _, out = saved
    names = {p.name for p in out.iterdir()}
    assert {"model.safetensors", "config.json", "modeling_slicegpt.py", "slicegpt.json", "tokenizer.json"} <= names
    assert not any(n.endswith((".bin", ".pt", ".pkl")) for n in names)
    config = json.loads((out / "config.json").read_text())
    assert config["model_type"] == "llama" and config["hidden_size"] == 64  # stock config, original size
    assert config["auto_map"]["AutoModelForCausalLM"] == "modeling_slicegpt.SlicedModelForCausalLM"


def test_trust_remote_code_load_works_without_slicegpt(saved):
    """The directory is self-contained: transformers loads it with slicegpt made unimportable."""
    model, out = saved
    expected = model(IDS).logits
    torch.save(IDS, out.parent / "ids.pt")
    script = (
        "import sys, torch; sys.modules['slicegpt'] = None\n"
        "from transformers import AutoModelForCausalLM\n"
        f"m = AutoModelForCausalLM.from_pretrained({str(out)!r}, trust_remote_code=True)\n"
        f"torch.save(m(torch.load({str(out.parent / 'ids.pt')!r})).logits, {str(out.parent / 'out.pt')!r})\n"
    )
    subprocess.run([sys.executable, "-c", script], check=True, cwd=out.parent)
    assert torch.equal(torch.load(out.parent / "out.pt"), expected)


def test_existing_directory_needs_force(saved, tokenizer):
    model, out = saved
    config = slicegpt.SlicingConfig.from_dict(slicegpt.load(out).sliced["slicing"])
    (out / "marker").write_text("old")
    with pytest.raises(slicegpt.SliceGPTError, match="already exists.*--force"):
        slicegpt.save(model, tokenizer, config, out)
    assert (out / "marker").exists()
    slicegpt.save(model, tokenizer, config, out, force=True)
    assert not (out / "marker").exists()
    assert torch.equal(slicegpt.load(out).model(IDS).logits, model(IDS).logits)
    assert [p.name for p in out.parent.iterdir() if p.name.startswith(".")] == []


def test_interrupted_save_leaves_nothing(tmp_path, calibration, tokenizer, monkeypatch):
    import safetensors.torch

    model, config = slicegpt.slice_model(make_model("llama"), tokenizer, calibration, slicing=0.25, neurons="off",
                                         progress=False)  # the per-layer format

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(safetensors.torch, "save_file", interrupted)
    with pytest.raises(KeyboardInterrupt):
        slicegpt.save(model, tokenizer, config, tmp_path / "out")
    assert list(tmp_path.iterdir()) == []


def test_truncated_weights_are_refused(saved):
    _, out = saved
    weights = out / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-100])
    with pytest.raises(slicegpt.SliceGPTError, match="corrupted: model.safetensors"):
        slicegpt.load(out)
    from slicegpt.modeling.runtime import CheckpointError, load_sliced_model

    with pytest.raises(CheckpointError, match="corrupted or truncated"):
        load_sliced_model(out)


def test_missing_file_is_refused(saved):
    _, out = saved
    (out / "model.safetensors").unlink()
    with pytest.raises(slicegpt.SliceGPTError, match="incomplete: model.safetensors is missing"):
        slicegpt.load(out)


def test_missing_manifest_is_refused(saved):
    _, out = saved
    (out / "slicegpt.json").unlink()
    with pytest.raises(slicegpt.SliceGPTError, match="slicegpt.json is missing"):
        slicegpt.load(out)


def test_incompatible_version_is_refused(saved):
    _, out = saved
    manifest = json.loads((out / "slicegpt.json").read_text())
    manifest["format_version"] = 99
    (out / "slicegpt.json").write_text(json.dumps(manifest))
    with pytest.raises(slicegpt.SliceGPTError, match="format 99.*re-slice"):
        slicegpt.load(out)


def test_load_model_dispatches_sliced_directories(saved):
    model, out = saved
    loaded = slicegpt.load_model(out)
    assert loaded.sliced is not None
    assert torch.equal(loaded.model(IDS).logits, model(IDS).logits)


def test_weights_from_another_model_are_refused(saved):
    from safetensors.torch import load_file, save_file

    from slicegpt.modeling.runtime import CheckpointError, load_sliced_model

    _, out = saved
    state = load_file(out / "model.safetensors")
    state["model.nonexistent.weight"] = torch.zeros(2)
    save_file(state, out / "model.safetensors")
    with pytest.raises(CheckpointError, match="unexpected tensor model.nonexistent.weight"):
        load_sliced_model(out)
    del state["model.nonexistent.weight"], state["model.layers.0.attn_shortcut"]
    save_file(state, out / "model.safetensors")
    with pytest.raises(CheckpointError, match="missing tensors"):
        load_sliced_model(out)


def test_load_runs_the_installed_code_and_names_an_edited_loader(saved, tmp_path):
    """A published directory's modeling_slicegpt.py is never run by slicegpt.load; a copy that differs from the
    installed one is named in a warning, because from_pretrained(trust_remote_code=True) would run it."""
    import hashlib
    import os
    import warnings

    from slicegpt.errors import SliceGPTWarning

    model, out = saved
    with warnings.catch_warnings():
        warnings.simplefilter("error", SliceGPTWarning)  # the unchanged copy: no warning
        slicegpt.load(out)
    marker = tmp_path / "ran"
    code = out / "modeling_slicegpt.py"
    code.write_text(code.read_text() + f"\nimport pathlib\npathlib.Path({str(marker)!r}).write_text('ran')\n")
    manifest = json.loads((out / "slicegpt.json").read_text())  # as a publisher would: checksums that match
    manifest["files"]["modeling_slicegpt.py"] = hashlib.sha256(code.read_bytes()).hexdigest()
    (out / "slicegpt.json").write_text(json.dumps(manifest))
    with pytest.warns(SliceGPTWarning, match="modeling_slicegpt.py differs from the installed slicegpt.*"
                                             "trust_remote_code=True\\) would run this file"):
        loaded = slicegpt.load(out)
    assert not marker.exists() and torch.equal(loaded.model(IDS).logits, model(IDS).logits)
    # the edit is live code: transformers' remote-code path does run it
    script = f"from transformers import AutoModelForCausalLM; AutoModelForCausalLM.from_pretrained({str(out)!r}, " \
             "trust_remote_code=True)"
    env = {**os.environ, "HF_MODULES_CACHE": str(tmp_path / "modules")}
    subprocess.run([sys.executable, "-c", script], check=True, env=env, capture_output=True)
    assert marker.read_text() == "ran"
