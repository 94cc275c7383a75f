"""Bad input ends in one line before any slow work; inputs that would run silently wrong are refused
or warned (docs/trust.md, "Bad input", counts what was tried)."""

import http.server
import json
import os
import socket
import subprocess
import sys
import threading
import warnings

import pytest
import torch

import slicegpt
from conftest import DATA, make_config, make_model
from slicegpt.data import C4_FILES, check_window_length, hub_source, load_text, same_file
from slicegpt.errors import SliceGPTWarning
from test_cli import TEXT_FILE, assert_one_line_error, run


@pytest.fixture(scope="module")
def models(tmp_path_factory, tokenizer):
    """Tiny llama (rotary) and GPT-2 (learned positions, 256 of them) directories."""
    root = tmp_path_factory.mktemp("bad-input")
    for family in ("llama", "gpt2"):
        make_model(family).save_pretrained(root / family)
        tokenizer.save_pretrained(root / family)
    return root


def _latin1(path):
    path.write_bytes(b'{"text": "caf\xe9 au lait"}\n')
    return path


# --- data files ------------------------------------------------------------------------------

@pytest.mark.parametrize("suffix", [".jsonl", ".txt"])
def test_non_utf8_data_file_is_refused_naming_the_line(tmp_path, suffix):
    path = tmp_path / f"notes{suffix}"
    path.write_bytes("first line\n".encode() + "caf\xe9\n".encode("latin-1"))
    with pytest.raises(slicegpt.SliceGPTError, match=r"notes.* is not UTF-8 text \(byte 0xe9 on line 2\).*iconv"):
        load_text(path, "calibration")


def test_same_file_under_any_spelling(tmp_path, monkeypatch):
    data = tmp_path / "corpus.txt"
    data.write_text("text\n")
    (tmp_path / "link.txt").symlink_to(data)
    monkeypatch.chdir(tmp_path)
    for spelling in ("corpus.txt", "./corpus.txt", str(data), "link.txt", f"{tmp_path}/../{tmp_path.name}/corpus.txt"):
        assert same_file(spelling, data), spelling
    (tmp_path / "other.txt").write_text("text\n")
    assert not same_file("other.txt", data) and not same_file("shakespeare", data) and not same_file(None, data)


def test_one_file_under_two_spellings_is_split_not_evaluated_on_calibration_text(tmp_path, tokenizer):
    """Evaluation text given again under another name is the held-out tenth, as when it is not given."""
    from slicegpt.pipeline import _windows
    from slicegpt.plan import SliceSettings

    link = tmp_path / "link.txt"
    link.symlink_to(TEXT_FILE)
    settings = SliceSettings(size=0.8, calibration=TEXT_FILE, samples=4, seqlen=32)
    calibration = load_text(TEXT_FILE, "calibration")
    expected = _windows(tokenizer, calibration, settings, True, None, 4, None)
    for spelling in (link, os.path.relpath(TEXT_FILE)):
        windows, eval_windows, _ = _windows(tokenizer, calibration, settings, True, spelling, 4, None)
        assert torch.equal(eval_windows.input_ids, expected[1].input_ids)
        assert torch.equal(windows.input_ids, expected[0].input_ids)


# --- positions -------------------------------------------------------------------------------

@pytest.mark.parametrize("family", ["gpt2", "opt"])
def test_windows_past_learned_positions_are_refused(family):
    config = make_config(family)
    check_window_length(config, 256)  # the table's length itself is fine
    with pytest.raises(slicegpt.SliceGPTError, match=f"--eval-seqlen 257 is longer than the 256 positions this "
                                                     f"{family} model has learned; use --eval-seqlen 256 or less"):
        check_window_length(config, 257, "--eval-seqlen")


def test_windows_past_rotary_positions_are_warned():
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        check_window_length(make_config("llama"), 256)
    with pytest.warns(SliceGPTWarning, match="--seqlen 300 is longer than the 256 positions this llama model"):
        check_window_length(make_config("llama"), 300)


# --- counts and levers, from the Python API --------------------------------------------------

@pytest.mark.parametrize("name", ["eval_batch_size", "eval_samples", "eval_seqlen", "checkpoint_every"])
def test_slice_and_save_refuses_counts_before_reading_anything(tmp_path, name):
    with pytest.raises(slicegpt.SliceGPTError, match=f"--{name.replace('_', '-')} must be a positive integer, got 0"):
        slicegpt.slice_and_save(tmp_path / "no-such-model", tmp_path / "out", size=0.8, **{name: 0})


def test_round_to_wider_than_the_model_is_refused(tmp_path):
    model = make_model("llama")  # hidden 64, 96 MLP neurons
    with pytest.raises(slicegpt.SliceGPTError, match="--round-to 128 is larger than the model's hidden size 64"):
        slicegpt.plan_slice(model, recipe="paper", slicing=0.25, round_to=128)
    with pytest.raises(slicegpt.SliceGPTError, match="--round-to 72 is larger than the model's 64 MLP neurons"):
        slicegpt.plan_slice(make_model("llama", hidden_size=128, intermediate_size=64), size=0.9, round_to=72,
                           neurons=0.5)


# --- the command line, as a user meets it ----------------------------------------------------

def cli(capsys, *args) -> subprocess.CompletedProcess:
    """`slicegpt ARGS` in this process (the same code as the command, without a second torch import)."""
    from slicegpt.cli import main

    code = main([str(a) for a in args])
    captured = capsys.readouterr()
    return subprocess.CompletedProcess(args, code, captured.out, captured.err)


def test_non_utf8_calibration_file_is_one_line_for_a_user(models, tmp_path):
    result = run("slice", models / "llama", "--size", "0.8", "--calibration", _latin1(tmp_path / "latin1.jsonl"),
                 "--out", tmp_path / "out")
    assert_one_line_error(result, r"latin1.jsonl is not UTF-8 text \(byte 0xe9 on line 1\)")
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("case", [
    ("slice", "llama", ["--size", "0.8", "--calibration", "LATIN1"], r"is not UTF-8 text \(byte 0xe9 on line 1\)"),
    ("eval", "llama", ["--data", "LATIN1"], r"is not UTF-8 text \(byte 0xe9 on line 1\)"),
    ("eval", "gpt2", ["--data", TEXT_FILE, "--seqlen", "512"],
     "--seqlen 512 is longer than the 256 positions this gpt2 model has learned; use --seqlen 256 or less"),
    ("slice", "gpt2", ["--slicing", "0.25", "--recipe", "paper", "--calibration", TEXT_FILE, "--samples", "2",
                       "--seqlen", "512"], "--seqlen 512 is longer than the 256"),
    ("slice", "gpt2", ["--slicing", "0.25", "--recipe", "paper", "--calibration", TEXT_FILE, "--samples", "2",
                       "--seqlen", "64", "--eval-seqlen", "300"], "--eval-seqlen 300 is longer than the 256"),
    ("finetune", "gpt2", ["--data", TEXT_FILE, "--seqlen", "512", "--steps", "1"], "--seqlen 512 is longer"),
    ("eval", "llama", ["--data", TEXT_FILE, "--seqlen", "64", "--batch-size", "0"],
     "--batch-size must be a positive integer, got 0"),
    ("eval", "llama", ["--data", TEXT_FILE, "--seqlen", "64", "--samples", "-1"],
     "--samples must be a positive integer, got -1"),
    ("finetune", "llama", ["--data", TEXT_FILE, "--eval-batch-size", "0"], "--eval-batch-size must be a positive"),
    ("slice", "llama", ["--size", "0.8", "--eval-batch-size", "0"], "--eval-batch-size must be a positive"),
    ("slice", "llama", ["--size", "0.8", "--round-to", "128"], "--round-to 128 is larger than the model's hidden size"),
    ("slice", "llama", ["--size", "0.8", "--ridge", "0"], r"--ridge must be positive, got 0.0 \(--compensate off"),
], ids=["latin1-slice", "latin1-eval", "eval-seqlen", "slice-seqlen", "slice-eval-seqlen", "finetune-seqlen",
        "eval-batch-0", "eval-samples-negative", "finetune-eval-batch-0", "slice-eval-batch-0", "round-to", "ridge-0"])
def test_bad_input_is_one_line(models, tmp_path, capsys, case):
    command, family, options, pattern = case
    options = [str(_latin1(tmp_path / "latin1.jsonl")) if o == "LATIN1" else o for o in options]
    extra = ["--out", tmp_path / "out"] if command == "slice" else []
    assert_one_line_error(cli(capsys, command, models / family, *options, *extra), pattern)
    assert not (tmp_path / "out").exists()


def test_c4_offline_is_one_line_naming_the_endpoint(models, tmp_path):
    result = run("slice", models / "llama", "--size", "0.8", "--calibration", "c4", "--out", tmp_path / "out")
    assert_one_line_error(result, "cannot load dataset 'c4' from the Hugging Face hub at .*HF_ENDPOINT.*HF_HUB_OFFLINE=1")


def test_rotary_window_past_the_trained_length_is_one_warning_line(models, capsys):
    result = cli(capsys, "eval", models / "llama", "--data", TEXT_FILE, "--seqlen", "300", "--samples", "1")
    assert result.returncode == 0, result.stderr
    assert [line for line in result.stderr.splitlines() if "warning" in line.lower()] == [
        "slicegpt: warning: --seqlen 300 is longer than the 256 positions this llama model was trained on; its "
        "positions extrapolate, so perplexity and the slicing statistics may suffer"]


# --- the hub ---------------------------------------------------------------------------------

def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]  # closed again when the socket is: nothing listens there


class _Recorder(http.server.BaseHTTPRequestHandler):
    """Answers every HEAD with 200 and records the request line (a hub mirror, or a proxy)."""

    seen: list[str] = []

    def do_HEAD(self):  # noqa: N802 (the stdlib's name)
        self.seen.append(self.path)
        self.send_response(200)
        self.end_headers()

    def log_message(self, *args):
        pass


@pytest.fixture
def recorder():
    server = http.server.HTTPServer(("127.0.0.1", 0), type("Recorder", (_Recorder,), {"seen": []}))
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield server
    server.shutdown()
    server.server_close()


def test_hub_probe_asks_hf_endpoint(monkeypatch, recorder):
    from slicegpt.formats.loading import hub_reachable

    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setenv("HF_ENDPOINT", f"http://127.0.0.1:{recorder.server_port}")
    assert hub_reachable(timeout=5) and recorder.RequestHandlerClass.seen == ["/"]
    monkeypatch.setenv("HF_ENDPOINT", f"http://127.0.0.1:{_closed_port()}")
    assert not hub_reachable(timeout=5)


def test_hub_probe_goes_through_the_environment_proxy(recorder):
    """A fresh process (huggingface_hub's session reads the proxy variables once) behind a local 'proxy'."""
    env = {k: v for k, v in os.environ.items() if k.lower() not in ("no_proxy", "hf_hub_offline")}
    env.update(HF_ENDPOINT="http://hub.example", HTTP_PROXY=f"http://127.0.0.1:{recorder.server_port}")
    probe = "from slicegpt.formats.loading import hub_reachable; print(hub_reachable(timeout=5))"
    result = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, env=env, timeout=120)
    assert result.stdout.strip() == "True", result.stderr
    assert recorder.RequestHandlerClass.seen == ["http://hub.example/"]


def test_unreachable_hub_names_the_endpoint_and_offline_mode(tmp_path, capsys, monkeypatch):
    endpoint = f"http://127.0.0.1:{_closed_port()}"
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    monkeypatch.setenv("HF_ENDPOINT", endpoint)
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    result = cli(capsys, "slice", "someone/some-model", "--size", "0.8", "--out", tmp_path / "o")
    assert_one_line_error(result, f"cannot download 'someone/some-model'.*the Hugging Face hub at {endpoint} is "
                                  "unreachable.*HF_ENDPOINT.*HTTPS_PROXY.*HF_HUB_OFFLINE=1")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    result = cli(capsys, "slice", "someone/some-model", "--size", "0.8", "--out", tmp_path / "o")
    assert_one_line_error(result, r"cannot download 'someone/some-model'.*offline mode is on \(HF_HUB_OFFLINE=1\)")


def test_c4_reads_one_shard_not_the_whole_split():
    for role, part in (("calibration", "train"), ("evaluation", "validation")):
        arguments = hub_source("c4", role)["arguments"]
        assert arguments["data_files"] == {part: C4_FILES[role]} and arguments["name"] is None
        assert arguments["split"].startswith(part + "[:")  # a slice of that one file
        assert C4_FILES[role].startswith(f"en/c4-{part}.00000-of-")
    assert "data_files" not in hub_source("wikitext2", "calibration")["arguments"]
