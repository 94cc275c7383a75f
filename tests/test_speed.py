"""`slicegpt bench`'s measurements: the decode path uses transformers' current cache API; GGUF files in llama.cpp."""

import json
import warnings
from pathlib import Path

import pytest
import torch

import slicegpt
from slicegpt.errors import SliceGPTError
from slicegpt.evaluation.speed import cache_keyword, decode, gguf_speed, prefill
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


# ---------------------------------------------------------------------------------------------
# GGUF files in real llama.cpp (`slicegpt bench FILE.gguf --compare DENSE.gguf`)

def _has_llama_cpp() -> bool:
    from slicegpt.formats.llama_cpp import node_llama_cpp

    return node_llama_cpp() is not None


@pytest.fixture
def gguf_pair(calibration, tokenizer, tmp_path):
    """A tiny dense Llama and the default recipe's slice of it (a stock model), both as f16 GGUF."""
    from slicegpt.formats.gguf import export_gguf

    sliced, _ = slicegpt.slice_model(make_model("llama"), tokenizer, calibration, size=0.8, progress=False)
    return (export_gguf(make_model("llama"), tokenizer, tmp_path / "dense.gguf", dtype="f16"),
            export_gguf(sliced, tokenizer, tmp_path / "sliced.gguf", dtype="f16"))


@pytest.mark.skipif(not _has_llama_cpp(), reason="node-llama-cpp not installed (scripts/setup.sh does it)")
def test_bench_measures_gguf_files_in_llama_cpp_side_by_side(gguf_pair, tmp_path, capsys):
    """Both files in one llama.cpp run, in turns: every figure positive, the speedup beside its limit,
    and the record one that `slicegpt report` reads."""
    from slicegpt import cli
    from slicegpt.evaluation.report import load_bench

    dense, sliced = gguf_pair
    save = tmp_path / "bench.json"
    assert cli.main(["bench", str(sliced), "--compare", str(dense), "--seqlens", "8,24", "--decode-tokens", "3",
                     "--repeats", "2", "--threads", "1", "--save", str(save), "--json"]) == 0
    printed = capsys.readouterr().out
    record = json.loads(printed.strip().splitlines()[-1])
    assert record == json.loads(save.read_text())
    assert record["engine"] == "llama.cpp" and record["threads"] == 1 and record["llama_cpp"]
    assert record["compare"] == str(dense) and record["repeats"] == 2 and record["decode_tokens"] == 3
    # the default recipe removes MLP neurons: smaller file, fewer multiply-adds
    assert record["limits"]["decode"] == pytest.approx(dense.stat().st_size / sliced.stat().st_size)
    assert record["limits"]["decode"] > 1 and record["limits"]["prefill"] > 1
    rows = record["rows"]
    assert {(r["role"], r["phase"], r["seqlen"]) for r in rows} == {
        (role, phase, n) for role in ("dense", "sliced") for phase in ("prefill", "decode") for n in (8, 24)}
    for r in rows:
        assert r["batch"] == 1 and len(r["seconds"]) == 2 and min(r["seconds"]) > 0
        assert r["tokens_per_second"] > 0 and r["ms_per_token"] > 0 and r["speedup"] > 0 and r["limit"] > 0
        assert r["file_bytes"] == Path(r["model"]).stat().st_size
    assert all(r["speedup"] == 1.0 and r["limit"] == 1.0 for r in rows if r["role"] == "dense")
    assert {r["limit"] for r in rows if r["role"] == "sliced"} == set(record["limits"].values())
    assert "tg speedup" in printed and f"({record['limits']['decode']:.2f}x)" in printed
    assert {r["role"] for r in load_bench(save).rows} == {"dense", "sliced"}

    broken = tmp_path / "broken.gguf"
    broken.write_bytes(dense.read_bytes()[:1000])  # a GGUF header, then nothing: llama.cpp's own error
    with pytest.raises(SliceGPTError, match=r"^llama.cpp \(llama_cpp_speed.mjs\) failed: .*error loading model"):
        gguf_speed([broken], [8], repeats=1, threads=1)


# node's report of a failed load, as node-llama-cpp 3 prints it (llama.cpp's log lines may come before it)
NODE_REPORT = """file:///c/node_modules/node-llama-cpp/dist/evaluator/LlamaModel/LlamaModel.js:626
                throw new Error("Failed to load model");
                      ^

Error: Failed to load model
    at LlamaModel._create (file:///c/node_modules/node-llama-cpp/dist/evaluator/LlamaModel/LlamaModel.js:626:23)

Node.js v20.20.2
"""


def test_a_failed_llama_cpp_run_is_reported_in_llama_cpps_words_else_nodes_message():
    from slicegpt.formats.llama_cpp import _node_error

    llama = ("[node-llama-cpp] gguf_init_from_reader: failed to read key-value pairs\n"
             "[node-llama-cpp] llama_model_load: error loading model: llama_model_loader: failed to load model\n")
    assert _node_error(llama + NODE_REPORT, 1) == "llama_model_load: error loading model: llama_model_loader: failed to load model"
    # without llama.cpp's lines: node's message, never the source line it quotes
    assert _node_error(NODE_REPORT, 1) == "Error: Failed to load model"
    assert _node_error("", 9) == "exit status 9"


def test_gguf_bench_without_llama_cpp_says_how_to_install_it(tmp_path, monkeypatch):
    from slicegpt.formats import llama_cpp

    fake = tmp_path / "model.gguf"
    fake.write_bytes(b"GGUF" + bytes(60))  # checked by its magic only, before llama.cpp is looked for
    monkeypatch.setattr(llama_cpp, "node_llama_cpp", lambda: None)
    with pytest.raises(SliceGPTError, match=r"^llama.cpp is not installed: run scripts/llama_cpp_setup.sh"):
        gguf_speed([fake], [8])
    (tmp_path / "text.gguf").write_text("not a model")
    with pytest.raises(SliceGPTError, match="text.gguf is not a GGUF file"):
        gguf_speed([fake, tmp_path / "text.gguf"], [8])  # every file checked before llama.cpp starts
