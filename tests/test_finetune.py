"""Recovery fine-tuning: LoRA training lowers the loss, merged and adapter outputs load like their input."""

import json
import math
import os
import subprocess

import pytest
import torch

import slicegpt
from conftest import DATA, TEXT, make_model
from slicegpt.data import calibration_windows, evaluation_windows, tokenize
from slicegpt.finetune import ADAPTER_DIR, data_texts, default_target_modules, finetune, save_finetuned
from test_cli import assert_one_line_error, run

TEXT_FILE = str(DATA / "tempest_excerpt.txt")
IDS = torch.randint(3, 300, (2, 24), generator=torch.Generator().manual_seed(5))
FAST = dict(steps=6, lr=1e-2, batch_size=2, seqlen=32, eval_samples=2, eval_seqlen=64, progress=False)


@pytest.fixture(scope="module")
def sliced_dirs(tmp_path_factory, tokenizer):
    """A per-layer and a standard (uniform) sliced tiny Llama, saved as slicegpt outputs."""
    windows = calibration_windows(tokenize(tokenizer, TEXT), samples=8, seqlen=64, seed=0)
    root = tmp_path_factory.mktemp("sliced")
    dirs = {}
    for rotation in ("per-layer", "uniform"):
        model, config = slicegpt.slice_model(make_model("llama"), tokenizer, windows, slicing=0.25, rotation=rotation,
                                             progress=False, neurons="off")  # the stream sliced both ways
        dirs[rotation] = slicegpt.save(model, tokenizer, config, root / rotation,
                                       extra={"results": {"perplexity_sliced": 1.0}})
    return dirs


def logits(model, ids=IDS):
    with torch.no_grad():
        return model(ids).logits


def test_target_modules_come_from_the_adapter_description():
    assert default_target_modules(make_model("llama")) == [
        "self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
        "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj"]
    assert default_target_modules(make_model("gpt2")) == ["attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj"]
    moe = default_target_modules(make_model("qwen2_moe"))  # fused experts are raw parameters: not adapted
    assert "mlp.experts.gate_up_proj" not in moe and "mlp.shared_expert.down_proj" in moe


def test_training_lowers_the_training_loss_deterministically(tokenizer):
    windows = calibration_windows(tokenize(tokenizer, TEXT), samples=8, seqlen=32, seed=0)
    model = make_model("llama")
    before = slicegpt.perplexity(model, windows, progress=False)
    settings = dict(FAST, steps=25, lr=5e-3)
    result = finetune(model, tokenizer, windows, **settings)
    after = slicegpt.perplexity(result.model, windows, progress=False)
    assert after < 0.8 * before, (before, after)
    assert len(result.losses) == 25 and result.perplexity_before is None  # no held-out data given
    # r * (in + out) per adapted linear: 3 layers x (q 64+64, k 64+32, v 64+32, o 64+64, gate/up 64+96, down 96+64)
    assert result.trainable_parameters == 8 * 3 * (128 + 96 + 96 + 128 + 160 + 160 + 160)
    again = finetune(make_model("llama"), tokenizer, windows, **settings)
    assert again.losses == result.losses


@pytest.mark.parametrize("rotation", ["per-layer", "uniform"])
def test_merged_save_reloads_with_the_same_logits(rotation, sliced_dirs, tmp_path):
    from transformers import AutoModelForCausalLM

    loaded = slicegpt.load(sliced_dirs[rotation])
    base = logits(loaded.model)
    result = finetune(loaded.model, loaded.tokenizer, TEXT_FILE, **FAST)
    assert result.perplexity_before > 0 and result.perplexity_after > 0
    adapted = logits(result.model)
    out = tmp_path / "ft"
    merged = save_finetuned(result, loaded.tokenizer, out, loaded.sliced, source=str(sliced_dirs[rotation]))
    assert not any("lora" in n for n, _ in merged.named_parameters())
    expected = logits(merged)
    assert torch.allclose(expected, adapted, atol=1e-4) and not torch.allclose(expected, base, atol=1e-4)

    again = slicegpt.load(out)
    assert torch.equal(logits(again.model), expected)
    plain = AutoModelForCausalLM.from_pretrained(out, trust_remote_code=rotation == "per-layer")
    assert torch.equal(logits(plain), expected)
    manifest = json.loads((out / "slicegpt.json").read_text())
    record = manifest["slicing"]["finetune"][-1]
    assert record["saved"] == "merged" and record["lora_r"] == 8 and record["steps"] == 6
    assert record["perplexity_after"] == result.perplexity_after and len(record["losses"]) == 6
    assert manifest["results"] == {"perplexity_sliced": 1.0}  # the slicing figures are kept
    assert manifest["slicing"]["standard"] == (rotation == "uniform")


def test_old_manifests_without_finetune_records_still_load(sliced_dirs):
    config = slicegpt.SlicingConfig.from_dict({k: v for k, v in slicegpt.load(sliced_dirs["per-layer"])
                                               .sliced["slicing"].items() if k != "finetune"})
    assert config.finetune == []


def test_generate_after_merge_with_and_without_cache(sliced_dirs, tmp_path):
    loaded = slicegpt.load(sliced_dirs["per-layer"])
    result = finetune(loaded.model, loaded.tokenizer, TEXT_FILE, **dict(FAST, eval_samples=None))
    model = save_finetuned(result, loaded.tokenizer, tmp_path / "ft", loaded.sliced)
    prompt = IDS[:1, :5]
    cached = model.generate(prompt, max_new_tokens=10, do_sample=False, use_cache=True)
    assert torch.equal(cached, model.generate(prompt, max_new_tokens=10, do_sample=False, use_cache=False))
    again = slicegpt.load(tmp_path / "ft")
    assert torch.equal(again.model.generate(prompt, max_new_tokens=10, do_sample=False), cached)
    assert isinstance(slicegpt.generate(again.model, again.tokenizer, "Full fathom five", 5), str)


@pytest.mark.filterwarnings("ignore:.*is_gradient_checkpointing")  # peft 0.21 on transformers 5
@pytest.mark.parametrize("rotation", ["per-layer", "uniform"])
def test_adapters_only_output_reloads(rotation, sliced_dirs, tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    loaded = slicegpt.load(sliced_dirs[rotation])
    base = logits(loaded.model)
    result = finetune(loaded.model, loaded.tokenizer, TEXT_FILE, **dict(FAST, eval_samples=None))
    adapted = logits(result.model)
    out = tmp_path / "adapter"
    model = save_finetuned(result, loaded.tokenizer, out, loaded.sliced, adapters_only=True)
    assert (out / ADAPTER_DIR / "adapter_model.safetensors").is_file()
    manifest = json.loads((out / "slicegpt.json").read_text())
    assert "lora/adapter_model.safetensors" in manifest["files"]  # checksummed like the weights
    expected = logits(model)
    assert torch.allclose(expected, adapted, atol=1e-4)

    assert torch.equal(logits(slicegpt.load(out).model), expected)  # slicegpt merges lora/ on load
    bare = AutoModelForCausalLM.from_pretrained(out, trust_remote_code=rotation == "per-layer")  # weights unchanged
    assert torch.equal(logits(bare), base)
    with_peft = PeftModel.from_pretrained(bare, out / ADAPTER_DIR)
    assert torch.allclose(logits(with_peft), expected, atol=1e-5)


@pytest.mark.parametrize("adapters_only", [False, True])
def test_dense_model_saves_as_a_plain_checkpoint(adapters_only, tiny_model_dir, tmp_path):
    from transformers import AutoModelForCausalLM

    loaded = slicegpt.load_model(tiny_model_dir)
    result = finetune(loaded.model, loaded.tokenizer, TEXT_FILE, **FAST)
    out = tmp_path / "dense-ft"
    model = save_finetuned(result, loaded.tokenizer, out, None, adapters_only=adapters_only)
    assert not (out / "slicegpt.json").exists()
    assert json.loads((out / "finetune.json").read_text())["finetune"][0]["perplexity_after"] > 0
    again = slicegpt.load_model(out)
    assert again.sliced is None and torch.equal(logits(again.model), logits(model))
    if not adapters_only:
        assert torch.equal(logits(AutoModelForCausalLM.from_pretrained(out)), logits(model))


@pytest.mark.parametrize("model_type", ["gpt2", "qwen2_moe", "phi"])
def test_other_families_merge_exactly(model_type, tokenizer, calibration):
    """Conv1D (transposed) linears, MoE layers, parallel branches: merged equals adapted."""
    model, _ = slicegpt.slice_model(make_model(model_type), tokenizer, calibration, slicing=0.25, neurons="off",
                                    progress=False)
    result = finetune(model, tokenizer, calibration, **dict(FAST, steps=3))
    adapted = logits(result.model)
    assert torch.allclose(logits(result.model.merge_and_unload()), adapted, atol=1e-4)


def test_a_full_disk_ends_in_one_line_and_leaves_nothing_behind(sliced_dirs, small_disk):
    """A real ENOSPC (a 600 KB tmpfs): merged or adapters only, nothing is left; with force, the old
    output survives."""
    import shutil

    loaded = slicegpt.load(sliced_dirs["per-layer"])
    result = finetune(loaded.model, loaded.tokenizer, TEXT_FILE, **dict(FAST, steps=1, eval_samples=None))
    shutil.copytree(sliced_dirs["per-layer"], small_disk / "old")  # an earlier output fills most of the disk
    before = {p.name: p.read_bytes() for p in (small_disk / "old").iterdir()}
    for adapters_only, out, force in ((False, "out", False), (True, "out", False), (False, "old", True)):
        with pytest.raises(slicegpt.SliceGPTError, match=r"cannot write .*: no space left on device .*free some space"):
            save_finetuned(result, loaded.tokenizer, small_disk / out, loaded.sliced, adapters_only=adapters_only,
                           force=force)
        assert sorted(p.name for p in small_disk.iterdir()) == ["old"]
    assert {p.name: p.read_bytes() for p in (small_disk / "old").iterdir()} == before


def test_held_out_text_is_disjoint_from_training_text():
    train, held_out = data_texts(TEXT_FILE, None)  # one local file: split at a line break
    assert train + held_out == TEXT and len(held_out) < 0.15 * len(TEXT) and held_out.startswith("\n")
    assert data_texts(TEXT_FILE, TEXT_FILE) == (train, held_out)
    relative = os.path.relpath(TEXT_FILE)  # the same file under another spelling is split too
    assert data_texts(TEXT_FILE, relative) == (train, held_out) == data_texts(relative, TEXT_FILE)


def test_cli_finetune_reports_and_saves(sliced_dirs, tmp_path, capsys):
    from slicegpt.cli import main

    out = tmp_path / "ft"
    result = run("finetune", sliced_dirs["per-layer"], "--data", TEXT_FILE, "--steps", "4", "--seqlen", "32",
                 "--batch-size", "2", "--lr", "1e-2", "--eval-samples", "2", "--eval-seqlen", "64", "--out", out,
                 "--json")
    assert result.returncode == 0, result.stderr
    figures = json.loads(result.stdout.strip().splitlines()[-1])
    assert figures["kind"] == "per-layer sliced" and figures["steps"] == 4 and figures["trainable_parameters"] > 0
    assert figures["perplexity_before"] > 0 and figures["perplexity_after"] > 0 and figures["seconds"] > 0
    assert "perplexity" in result.stdout and "trainable" in result.stdout and "fine-tuning" in result.stderr
    assert "Warning" not in result.stderr

    # the rest in-process: the same main(), without paying for a Python start each time
    assert main(["eval", str(out), "--data", TEXT_FILE, "--samples", "2", "--seqlen", "64"]) == 0
    capsys.readouterr()
    for argv, message in [(["finetune", str(sliced_dirs["per-layer"]), "--out", str(out)], "already exists.*--force"),
                          (["finetune", str(tmp_path / "missing"), "--out", str(tmp_path / "x")], "not found"),
                          (["finetune", str(sliced_dirs["per-layer"]), "--lora-r", "0", "--out", str(tmp_path / "x")],
                           "--lora-r must be a positive integer"),
                          (["finetune", str(sliced_dirs["per-layer"]), "--adapters-only"], "pass --out")]:
        assert main(argv) == 1
        assert_one_line_error(subprocess.CompletedProcess(argv, 1, "", capsys.readouterr().err), message)
    assert not (tmp_path / "x").exists()


@pytest.mark.slow
def test_default_model_recovers_held_out_perplexity(tmp_path):
    """Real: SmolLM2 cut to 80% of its parameters (small calibration), a few LoRA steps, better held-out
    perplexity."""
    loaded = slicegpt.load_model("default")
    model, config = slicegpt.slice_model(loaded.model, loaded.tokenizer, "shakespeare", size=0.8, samples=8,
                                         seqlen=256, progress=False)
    result = finetune(model, loaded.tokenizer, "shakespeare", steps=12, batch_size=4, seqlen=128, eval_samples=4,
                      eval_seqlen=256, progress=False)
    assert math.isfinite(result.perplexity_before)
    assert result.perplexity_after < 0.95 * result.perplexity_before, (result.perplexity_before,
                                                                       result.perplexity_after)
    windows = evaluation_windows(tokenize(loaded.tokenizer, slicegpt.load_text("shakespeare", "evaluation")), 256, 4)
    merged = save_finetuned(result, loaded.tokenizer, tmp_path / "ft", config)
    again = slicegpt.load(tmp_path / "ft")
    assert slicegpt.perplexity(again.model, windows, progress=False) == pytest.approx(result.perplexity_after,
                                                                                     rel=1e-4)
    assert torch.equal(logits(again.model, windows.input_ids[:1, :32]), logits(merged, windows.input_ids[:1, :32]))
