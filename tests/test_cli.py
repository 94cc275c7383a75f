"""The CLI as a user runs it: real subprocesses, one-line errors, JSON figures."""

import json
import os
import re
import subprocess
import sys

import pytest
import torch

from conftest import DATA, make_model
from slicegpt.data import bos_token, evaluation_windows, load_text, split_text, tokenize

TEXT_FILE = str(DATA / "tempest_excerpt.txt")


def run(*args, env=None):
    return subprocess.run([sys.executable, "-m", "slicegpt", *map(str, args)], capture_output=True, text=True,
                          env={**os.environ, "HF_HUB_OFFLINE": "1", **(env or {})}, timeout=600)


def assert_one_line_error(result, pattern):
    import re

    assert result.returncode != 0
    assert "Traceback" not in result.stderr
    # progress bars may precede it; the error is exactly one line, and the last one
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert lines[-1].startswith("slicegpt: error: "), result.stderr
    assert sum("error" in line.lower() for line in lines) == 1, result.stderr
    assert re.search(pattern, lines[-1]), lines[-1]


def test_help_lists_commands():
    result = run("--help")
    assert result.returncode == 0
    for command in ("slice", "eval", "generate"):
        assert command in result.stdout


def test_slice_eval_generate_on_a_local_model(tiny_model_dir, tmp_path):
    out = tmp_path / "sliced"
    result = run("slice", tiny_model_dir, "--slicing", "0.25", "--neurons", "off", "--calibration", TEXT_FILE,
                 "--samples", "8", "--seqlen", "64", "--eval-samples", "4", "--out", out, "--json")
    assert result.returncode == 0, result.stderr
    figures = json.loads(result.stdout.strip().splitlines()[-1])
    assert figures["sliced_hidden_size"] == 48 and figures["hidden_size"] == 64
    assert figures["parameters_sliced"] > 0 and figures["parameters_dense"] > 0
    for key in ("slicing_seconds", "peak_memory_bytes"):
        assert figures[key] > 0
    # the dense figure is the library's perplexity of the dense model on the held-out tenth of the file
    held_out = _library_windows(tiny_model_dir, split_text(load_text(TEXT_FILE, "evaluation"))[1], 64, 4)
    assert figures["perplexity_dense"] == pytest.approx(_library_perplexity(tiny_model_dir, held_out), rel=1e-5)
    # random weights predict ~uniformly over the 300 tokens; slicing a quarter of the width moves that a little
    assert 0.5 < figures["perplexity_sliced"] / figures["perplexity_dense"] < 2
    index = json.loads((out / "model.safetensors.index.json").read_text())  # sharded: one file per layer
    assert sorted(set(index["weight_map"].values())) == [f"model-0000{i}-of-00005.safetensors" for i in range(1, 6)]
    assert "perplexity" in result.stdout and "parameters" in result.stdout

    result = run("eval", out, "--data", TEXT_FILE, "--samples", "4", "--seqlen", "64", "--json")
    assert result.returncode == 0, result.stderr
    evaluated = json.loads(result.stdout.strip().splitlines()[-1])
    assert evaluated["sliced"] is True and evaluated["parameters"] == figures["parameters_sliced"]
    windows = _library_windows(out, load_text(TEXT_FILE, "evaluation"), 64, 4)
    assert evaluated["perplexity"] == pytest.approx(_library_perplexity(out, windows), rel=1e-5)
    assert evaluated["tokens"] == windows.tokens

    result = run("generate", out, "Full fathom five", "--max-new-tokens", "5")
    assert result.returncode == 0, result.stderr
    continuation = _greedy_with_transformers(out, "Full fathom five", 5)
    assert continuation.strip() and result.stdout == "Full fathom five" + continuation + "\n"

    again = run("slice", tiny_model_dir, "--size", "0.8", "--calibration", TEXT_FILE, "--out", out)
    assert_one_line_error(again, "already exists.*--force")


def _library_windows(directory, text: str, seqlen: int, samples: int):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(directory)
    return evaluation_windows(tokenize(tokenizer, text), seqlen, samples, bos=bos_token(tokenizer))


def _library_perplexity(directory, windows) -> float:
    """The perplexity the library computes in this process, of the model transformers loads."""
    from transformers import AutoModelForCausalLM

    from slicegpt.evaluation.perplexity import perplexity

    model = AutoModelForCausalLM.from_pretrained(directory, trust_remote_code=True)
    return perplexity(model.eval(), windows, batch_size=2, progress=False)


def _greedy_with_transformers(directory, prompt: str, tokens: int) -> str:
    """The continuation plain transformers generates greedily (the directory's own loader)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(directory)
    model = AutoModelForCausalLM.from_pretrained(directory, trust_remote_code=True).eval()
    inputs = tokenizer(prompt, return_tensors="pt")
    output = model.generate(**inputs, max_new_tokens=tokens, do_sample=False, pad_token_id=tokenizer.eos_token_id)
    return tokenizer.decode(output[0, inputs["input_ids"].shape[1]:], skip_special_tokens=True)


@pytest.mark.parametrize("flag, value, pattern", [
    ("--size", "1.0", r"--size is the share of the dense parameters to keep, in \(0, 1\)"),
    ("--size", "-0.2", r"--size is the share of the dense parameters to keep, in \(0, 1\)"),
    ("--size", "1.5", r"--size is the share of the dense parameters to keep, in \(0, 1\)"),
    ("--slicing", "1.0", r"--slicing is the share of the hidden width to remove, in \(0, 1\)"),
    ("--slicing", "-0.2", r"--slicing is the share of the hidden width to remove, in \(0, 1\)"),
])
def test_size_out_of_range(tiny_model_dir, tmp_path, flag, value, pattern):
    result = run("slice", tiny_model_dir, flag, value, "--recipe", "paper" if flag == "--slicing" else "default",
                 "--out", tmp_path / "o")
    assert_one_line_error(result, pattern)
    assert not (tmp_path / "o").exists()


@pytest.mark.parametrize("share", ["1.5", "-0.25"])
def test_dense_share_out_of_range(tiny_model_dir, tmp_path, share):
    result = run("slice", tiny_model_dir, "--size", "0.8", "--dense-share", share, "--out", tmp_path / "o")
    assert_one_line_error(result, r"--dense-share must be in \[0, 1\]")
    assert not (tmp_path / "o").exists()


def test_missing_model_path(tmp_path):
    assert_one_line_error(run("eval", tmp_path / "nope"), "not found")
    assert_one_line_error(run("eval", "./nope.gguf"), "not found")


def test_unreachable_hub_id_names_the_fix(tmp_path):
    result = run("eval", "someone/some-model", env={"HF_HOME": str(tmp_path)})
    assert_one_line_error(result, "cannot download 'someone/some-model'.*local model directory or .gguf")


def test_unknown_architecture_lists_supported(tmp_path, tokenizer):
    from transformers import BloomConfig, BloomForCausalLM

    BloomForCausalLM(BloomConfig(n_layer=1, hidden_size=32, n_head=2, vocab_size=300)).save_pretrained(tmp_path / "m")
    tokenizer.save_pretrained(tmp_path / "m")
    result = run("slice", tmp_path / "m", "--size", "0.8", "--out", tmp_path / "o")
    assert_one_line_error(result, "unsupported model type 'bloom'; supported model types: .*gpt2.*llama.*opt.*qwen3_moe")


def test_encoder_model_is_refused(tmp_path):
    from transformers import BertConfig, BertModel

    BertModel(BertConfig(num_hidden_layers=1, hidden_size=32, num_attention_heads=2, intermediate_size=64,
                         vocab_size=50)).save_pretrained(tmp_path)
    assert_one_line_error(run("eval", tmp_path), "encoder")


def test_calibration_text_too_short(tiny_model_dir, tmp_path):
    result = run("slice", tiny_model_dir, "--size", "0.8", "--calibration", TEXT_FILE, "--samples", "5000",
                 "--seqlen", "64", "--out", tmp_path / "o")
    assert_one_line_error(result, "calibration text too short.*5000 samples")


def test_missing_data_file(tiny_model_dir, tmp_path):
    result = run("slice", tiny_model_dir, "--size", "0.8", "--calibration", tmp_path / "none.txt",
                 "--out", tmp_path / "o")
    assert_one_line_error(result, "data file not found")


def test_nan_in_activations(tmp_path, tokenizer):
    model = make_model("llama")
    with torch.no_grad():
        model.model.layers[0].self_attn.o_proj.weight.fill_(float("inf"))
    model.save_pretrained(tmp_path / "bad")
    tokenizer.save_pretrained(tmp_path / "bad")
    result = run("slice", tmp_path / "bad", "--size", "0.8", "--calibration", TEXT_FILE, "--samples", "4",
                 "--seqlen", "64", "--no-eval", "--out", tmp_path / "o")
    assert_one_line_error(result, "non-finite values .*layer 0")
    assert not (tmp_path / "o").exists()


def test_bad_argument_is_one_line():
    result = run("slice", "--size", "lots", "--out", "x")
    assert_one_line_error(result, "invalid float value")


def test_eval_works_on_dense_models_of_any_causal_family(tmp_path, tokenizer):
    """Only slicing needs an adapter; perplexity of a dense GPT-2 is a fair baseline to ask for."""
    from transformers import GPT2Config, GPT2LMHeadModel

    GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=300, bos_token_id=1,
                               eos_token_id=2)).save_pretrained(tmp_path)
    tokenizer.save_pretrained(tmp_path)
    result = run("eval", tmp_path, "--data", TEXT_FILE, "--samples", "2", "--seqlen", "64", "--json")
    assert result.returncode == 0, result.stderr
    windows = _library_windows(tmp_path, load_text(TEXT_FILE, "evaluation"), 64, 2)
    assert json.loads(result.stdout.strip().splitlines()[-1])["perplexity"] == pytest.approx(
        _library_perplexity(tmp_path, windows), rel=1e-5)


def _model_dir(path, family, tokenizer):
    make_model(family).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def test_uniform_slice_writes_a_standard_model_and_exports_gguf(tiny_model_dir, tmp_path):
    from transformers import AutoModelForCausalLM

    out = tmp_path / "uniform"
    result = run("slice", tiny_model_dir, "--slicing", "0.25", "--rotation", "uniform", "--neurons", "off",
                 "--calibration", TEXT_FILE, "--samples", "8", "--seqlen", "64", "--eval-samples", "4", "--out", out, "--json")
    assert result.returncode == 0, result.stderr
    figures = json.loads(result.stdout.strip().splitlines()[-1])
    assert figures["rotation"] == "uniform" and figures["standard"] is True and figures["deviations"] == []
    assert "stock LlamaForCausalLM" in result.stdout
    plain = AutoModelForCausalLM.from_pretrained(out)
    assert type(plain).__name__ == "LlamaForCausalLM" and plain.config.hidden_size == 48
    assert sum(p.numel() for p in plain.parameters()) == figures["parameters_sliced"]

    evaluated = run("eval", out, "--data", TEXT_FILE, "--samples", "4", "--seqlen", "64", "--json")
    assert evaluated.returncode == 0, evaluated.stderr
    evaluated = json.loads(evaluated.stdout.strip().splitlines()[-1])
    assert evaluated["perplexity"] > 1 and evaluated["parameters"] == figures["parameters_sliced"]

    gguf = tmp_path / "sliced.gguf"
    exported = run("export", out, "--format", "gguf", "--dtype", "f32", "--out", gguf, "--json")
    assert exported.returncode == 0, exported.stderr
    assert json.loads(exported.stdout.strip().splitlines()[-1])["tokenizer"] == "built from tokenizer.json"
    back = AutoModelForCausalLM.from_pretrained(tmp_path, gguf_file=gguf.name, dtype=torch.float32)
    ids = torch.tensor([[5, 17, 42, 99, 123, 7]])
    assert torch.allclose(back(ids).logits, plain(ids).logits, atol=1e-5)
    assert_one_line_error(run("export", out, "--out", gguf), "already exists.*--force")


def test_export_refuses_per_layer_models_and_quantizes_dense_ones(tiny_model_dir, tmp_path):
    out = tmp_path / "per-layer"
    result = run("slice", tiny_model_dir, "--slicing", "0.25", "--neurons", "off", "--calibration", TEXT_FILE,
                 "--samples", "4",
                 "--seqlen", "64", "--no-eval", "--out", out)
    assert result.returncode == 0, result.stderr
    assert_one_line_error(run("export", out, "--out", tmp_path / "x.gguf"), "per-layer rotations.*--rotation uniform")
    assert not (tmp_path / "x.gguf").exists()
    (tmp_path / "empty").mkdir()
    assert_one_line_error(run("export", tmp_path / "empty", "--out", tmp_path / "x.gguf"), "no config.json")
    dense = run("export", tiny_model_dir, "--dtype", "q8_0", "--out", tmp_path / "dense.gguf", "--json")
    assert dense.returncode == 0, dense.stderr
    figures = json.loads(dense.stdout.strip().splitlines()[-1])
    assert figures["sliced"] is False and figures["tensor_types"] == {"q8_0": 22, "f32": 7}
    assert "22 q8_0, 7 f32" in dense.stdout


def test_uniform_refusals_come_before_any_work(tmp_path, tokenizer):
    gemma = _model_dir(tmp_path / "gemma2", "gemma2", tokenizer)
    result = run("slice", gemma, "--slicing", "0.25", "--neurons", "off", "--rotation", "uniform",
                 "--out", tmp_path / "o")
    assert_one_line_error(result, "cannot compute the sliced model exactly.*branch-output norms.*--accept-deviation")
    gpt2 = _model_dir(tmp_path / "gpt2", "gpt2", tokenizer)
    result = run("slice", gpt2, "--size", "0.8", "--rotation", "uniform", "--out", tmp_path / "o")
    assert_one_line_error(result, "no standard export for gpt2.*--rotation per-layer")
    result = run("slice", gpt2, "--size", "0.8", "--head", "fit", "--out", tmp_path / "o")
    assert_one_line_error(result, "--head fit applies to --rotation uniform only")
    assert not (tmp_path / "o").exists()


def test_accepted_deviation_is_measured_and_reported(tmp_path, tokenizer):
    gemma = _model_dir(tmp_path / "gemma2", "gemma2", tokenizer)
    out = tmp_path / "o"
    result = run("slice", gemma, "--slicing", "0.25", "--rotation", "uniform", "--accept-deviation", "--neurons", "off",
                 "--calibration", TEXT_FILE, "--samples", "4", "--seqlen", "64", "--eval-samples", "2", "--out", out,
                 "--json")
    assert result.returncode == 0, result.stderr
    figures = json.loads(result.stdout.strip().splitlines()[-1])
    # measured (2026-12, seeds 0 and 1): 0.55 and 0.67, logits spanning ~2.5; the stock model's perplexity
    # 0.1% and 1.4% from the exact sliced model's. A wrong conversion moves both far more.
    assert figures["deviations"] and 0 < figures["max_logit_deviation"] < 1.0
    assert figures["perplexity_sliced"] == pytest.approx(figures["perplexity_exact"], rel=0.05)
    assert "deviation" in result.stdout and "exact sliced model" in result.stdout
    manifest = json.loads((out / "slicegpt.json").read_text())
    assert manifest["slicing"]["deviations"] == figures["deviations"]


def test_bench_compares_sliced_with_its_dense_source(tiny_model_dir, tmp_path):
    out = tmp_path / "sliced"
    result = run("slice", tiny_model_dir, "--size", "0.8", "--calibration", TEXT_FILE, "--samples", "4",
                 "--seqlen", "64", "--no-eval", "--out", out)
    assert result.returncode == 0, result.stderr
    result = run("bench", out, "--batch-sizes", "1,2", "--seqlens", "16", "--decode-tokens", "4", "--repeats", "1",
                 "--json")
    assert result.returncode == 0, result.stderr
    rows = json.loads(result.stdout.strip().splitlines()[-1])["rows"]
    assert {(r["phase"], r["batch"]) for r in rows} == {(p, b) for p in ("prefill", "decode") for b in (1, 2)}
    assert len(rows) == 8 and len({r["model"] for r in rows}) == 2  # dense source and sliced, side by side
    dense = [r for r in rows if r["model"].startswith("dense")]
    assert all(r["speedup"] == 1.0 for r in dense)
    assert all(r["tokens_per_second"] > 0 and r["ms_per_token"] > 0 and r["speedup"] > 0 for r in rows)
    sliced_weights = {r["weight_bytes"] for r in rows if not r["model"].startswith("dense")}
    assert max(sliced_weights) < min(r["weight_bytes"] for r in dense)
    assert "decode speedup" in result.stdout
    assert "FutureWarning" not in result.stderr and "deprecated" not in result.stderr  # transformers' current API
    assert_one_line_error(run("bench", out, "--seqlens", "0"), "--seqlens must be comma-separated positive integers")


def test_bench_of_gguf_files_refuses_what_llama_cpp_cannot_measure_in_one_line(tiny_model_dir, tmp_path):
    """A .gguf path goes to llama.cpp; its files are checked before anything starts."""
    model = tmp_path / "sliced.gguf"
    model.write_bytes(b"GGUF" + bytes(60))
    assert_one_line_error(run("bench", tmp_path / "missing.gguf"), r"missing.gguf: no such file")
    assert_one_line_error(run("bench", model, "--compare", tiny_model_dir),
                          r"--compare .* is not a GGUF file; llama.cpp measures .gguf files only")


def test_a_parameter_budget_and_the_papers_method_from_the_command_line(tiny_model_dir, tmp_path):
    result = run("slice", tiny_model_dir, "--size", "0.8", "--neurons", "off", "--calibration", TEXT_FILE,
                 "--samples", "8",
                 "--seqlen", "64", "--no-eval", "--out", tmp_path / "budget", "--json")
    assert result.returncode == 0, result.stderr
    figures = json.loads(result.stdout.strip().splitlines()[-1])
    assert figures["parameters_sliced"] <= 0.8 * figures["parameters_dense"]
    record = json.loads((tmp_path / "budget" / "slicegpt.json").read_text())["slicing"]
    assert record["parameters_budget"] == 0.8 and record["method"] == "default" and record["recipe"] == "default"
    assert record["size"] == 0.8 and record["slicing"] is None
    assert record["compensate"] == "writers" and record["widths_rule"] == "equal"
    assert record["compensation"]["writers"]["error_fitted"] <= record["compensation"]["writers"]["error_paper"]

    result = run("slice", tiny_model_dir, "--slicing", "0.25", "--recipe", "paper", "--calibration", TEXT_FILE,
                 "--samples", "8", "--seqlen", "64", "--no-eval", "--out", tmp_path / "paper", "--json")
    assert result.returncode == 0, result.stderr
    record = json.loads((tmp_path / "paper" / "slicegpt.json").read_text())["slicing"]
    assert record["method"] == "paper" and record["compensate"] == "off" and record["widths"] == [48] * 6 + [64]
    assert record["recipe"] == "paper" and record["slicing"] == 0.25
    assert re.search(r"recipe\s+paper: slicing 0.25", result.stdout)
    assert re.search(r"compensation\s+off", result.stdout)


def test_slicing_and_a_size_together_are_refused(tiny_model_dir, tmp_path):
    result = run("slice", tiny_model_dir, "--slicing", "0.25", "--size", "0.8", "--out", tmp_path / "o")
    assert_one_line_error(result, "not allowed with argument")
    result = run("slice", tiny_model_dir, "--size", "80", "--out", tmp_path / "o")
    assert_one_line_error(result, r"share of the dense parameters to keep, in \(0, 1\)")
    assert not (tmp_path / "o").exists()
