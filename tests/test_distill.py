"""Distillation: the sparse KL, the teacher's logits streamed through a temporary folder, one model in memory."""

import copy
import gc
import json
import subprocess
import tempfile
import weakref

import pytest
import torch

import slicegpt
from conftest import DATA, TEXT, make_model
from slicegpt.data import calibration_windows, tokenize
from slicegpt.distill import kl_to_target, resolve_teacher, sparse_target, teacher_logits
from slicegpt.errors import SliceGPTError
from slicegpt.finetune import finetune, save_finetuned, training_batches, training_windows
from test_cli import assert_one_line_error

TEXT_FILE = str(DATA / "tempest_excerpt.txt")
FAST = dict(batch_size=2, seqlen=32, eval_samples=2, eval_seqlen=64, progress=False)


def full_kl(teacher_logits_: torch.Tensor, student_logits: torch.Tensor) -> torch.Tensor:
    p = torch.log_softmax(teacher_logits_, -1)
    return (p.exp() * (p - torch.log_softmax(student_logits, -1))).sum(-1).mean()


def batches_for(tokenizer, steps: int, seed: int = 0):
    windows = training_windows(tokenizer, TEXT_FILE, None, FAST["seqlen"], seed)
    return training_batches(windows, FAST["batch_size"], steps, seed)


@pytest.fixture(scope="module")
def student_dir(tmp_path_factory, tokenizer):
    """A tiny Llama saved with its tokenizer, and a per-layer sliced copy whose record names it as the source."""
    root = tmp_path_factory.mktemp("distill")
    dense, model = root / "dense", make_model("llama")
    with torch.no_grad():  # sharper distributions: the slicing error (what distillation recovers) is larger
        model.model.norm.weight.mul_(4)
    model.save_pretrained(dense)
    tokenizer.save_pretrained(dense)
    windows = calibration_windows(tokenize(tokenizer, TEXT), samples=8, seqlen=64, seed=0)
    model, config = slicegpt.slice_model(str(dense), tokenizer, windows, slicing=0.25, neurons="off", progress=False)
    assert config.source_model == str(dense)
    return slicegpt.save(model, tokenizer, config, root / "sliced")


def test_sparse_kl_is_exact_with_every_token_and_a_lower_bound_with_few():
    generator = torch.Generator().manual_seed(0)
    teacher, student = torch.randn(2, 5, 50, generator=generator), torch.randn(2, 5, 50, generator=generator)
    exact = full_kl(teacher, student)
    assert kl_to_target(student, sparse_target(teacher, 49, 1.0), 1.0) == pytest.approx(exact.item(), rel=1e-5)
    assert 0 < kl_to_target(student, sparse_target(teacher, 4, 1.0), 1.0) < exact
    assert kl_to_target(teacher, sparse_target(teacher, 4, 2.0), 2.0).abs() < 1e-6  # the same model: zero
    hot = full_kl(teacher / 2, student / 2)  # the temperature softens both distributions
    assert kl_to_target(student, sparse_target(teacher, 49, 2.0), 2.0) == pytest.approx(hot.item(), rel=1e-5)


def test_a_model_distilled_from_itself_starts_at_zero_kl(tokenizer):
    teacher = make_model("llama")
    with teacher_logits(teacher, batches_for(tokenizer, 3), steps=3, top_k=16, progress=False) as logits:
        result = finetune(copy.deepcopy(teacher), tokenizer, TEXT_FILE, teacher=logits, steps=3, evaluate=False,
                          **FAST)
    assert abs(result.kl[0]) < 1e-6 and len(result.kl) == 3
    assert result.settings["loss"] == "distill" and result.settings["top_k"] == 16


@pytest.mark.parametrize("train", ["lora", "full"])
def test_distillation_lowers_the_kl_to_the_teacher(train, student_dir, tokenizer):
    teacher = slicegpt.load_model(resolve_teacher(student_dir, None)).model
    student = slicegpt.load(student_dir).model
    ids = training_windows(tokenizer, TEXT_FILE, None, 32, seed=1).input_ids[:4]  # the same 4 windows every step
    windows = training_windows(tokenizer, ids)
    with teacher_logits(teacher, training_batches(windows, 4, 12, 0), steps=12, top_k=32, progress=False) as logits:
        # the KL alone: with next-token loss mixed in (the default) four windows seen 12 times pull the
        # student toward themselves and away from the teacher
        result = finetune(student, tokenizer, ids, teacher=logits, steps=12, lr=3e-3 if train == "lora" else 1e-3,
                          batch_size=4, seqlen=32, progress=False, train=train, ce_weight=0.0)
    assert result.kl[-1] < 0.5 * result.kl[0], result.kl
    frozen = [n for n, _ in slicegpt.load(student_dir).model.named_parameters() if "skip" in n or "embed" in n]
    if train == "full":  # only the attention and MLP linears moved
        assert result.trainable_parameters < result.parameters and frozen
        reloaded = dict(slicegpt.load(student_dir).model.named_parameters())
        trained = dict(result.model.named_parameters())
        assert all(torch.equal(reloaded[n], trained[n]) for n in frozen)


def test_teacher_logits_are_removed_after_the_run_and_after_an_error(tokenizer, tmp_path):
    teacher = make_model("llama")
    with teacher_logits(teacher, batches_for(tokenizer, 2), steps=2, top_k=8, parent=tmp_path,
                        progress=False) as logits:
        assert len(list(logits.folder.iterdir())) == 2 and logits.bytes() > 0
    assert list(tmp_path.iterdir()) == []
    with pytest.raises(SliceGPTError, match="not finite"):  # an error while the student trains
        with teacher_logits(teacher, batches_for(tokenizer, 2), steps=2, top_k=8, parent=tmp_path,
                            progress=False) as logits:
            finetune(copy.deepcopy(teacher), tokenizer, TEXT_FILE, teacher=logits, steps=2, lr=1e30,
                     evaluate=False, **FAST)
    assert list(tmp_path.iterdir()) == []
    with pytest.raises(SliceGPTError, match="saw 2 batches, training needs 3"):  # an error in the teacher's pass
        with teacher_logits(teacher, batches_for(tokenizer, 2), steps=3, parent=tmp_path, progress=False):
            pass
    assert list(tmp_path.iterdir()) == []


def test_a_teacher_with_another_vocabulary_is_refused(tokenizer, tmp_path):
    from slicegpt.testing import train_tokenizer

    other = tmp_path / "other"
    make_model("llama").save_pretrained(other)
    train_tokenizer(TEXT[: len(TEXT) // 3]).save_pretrained(other)  # same size, other merges
    with pytest.raises(SliceGPTError, match="another tokenizer vocabulary"):
        with teacher_logits(str(other), batches_for(tokenizer, 1), steps=1, tokenizer=tokenizer, parent=tmp_path,
                            progress=False):
            pass
    assert [p.name for p in tmp_path.iterdir()] == ["other"]
    with teacher_logits(make_model("llama", vocab_size=320), batches_for(tokenizer, 1), steps=1,
                        progress=False) as logits:
        with pytest.raises(SliceGPTError, match="320 logits per token, the student 300"):
            finetune(make_model("llama"), tokenizer, TEXT_FILE, teacher=logits, steps=1, evaluate=False, **FAST)


def test_the_teacher_is_freed_before_the_student_loads(student_dir, tmp_path, monkeypatch, capsys):
    """The CLI: the recorded source model is the teacher; it is gone from memory when the student trains."""
    import slicegpt.cli
    import slicegpt.distill
    import slicegpt.formats.loading

    loaded: list[tuple[str, weakref.ref]] = []
    real_load, real_kl = slicegpt.formats.loading.load_model, slicegpt.distill.kl_to_target

    def load_model(source, *args, **kwargs):
        result = real_load(source, *args, **kwargs)
        loaded.append((str(source), weakref.ref(result.model)))
        return result

    def kl_to_target(*args, **kwargs):
        gc.collect()
        assert [source for source, ref in loaded if ref() is not None] == [str(student_dir)]
        return real_kl(*args, **kwargs)

    monkeypatch.setattr(slicegpt.formats.loading, "load_model", load_model)
    monkeypatch.setattr(slicegpt.cli, "load_model", load_model)
    monkeypatch.setattr(slicegpt.distill, "kl_to_target", kl_to_target)
    (tmp_path / "tmp").mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path / "tmp"))  # where the teacher's logits go
    out = tmp_path / "ft"
    argv = ["finetune", str(student_dir), "--loss", "distill", "--train", "full", "--data", TEXT_FILE, "--steps", "3",
            "--seqlen", "32", "--batch-size", "2", "--eval-samples", "2", "--eval-seqlen", "64", "--out", str(out),
            "--json"]
    assert slicegpt.cli.main(argv) == 0
    assert [source for source, _ in loaded] == [resolve_teacher(student_dir, None), str(student_dir)]
    figures = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert figures["teacher"] == resolve_teacher(student_dir, None) and len(figures["kl"]) == 3
    assert figures["train"] == "full" and figures["perplexity_after"] > 0
    assert list((tmp_path / "tmp").iterdir()) == []  # the teacher's logits are gone
    record = json.loads((out / "slicegpt.json").read_text())["slicing"]["finetune"][-1]
    assert record["saved"] == "full weights" and record["loss"] == "distill"
    assert record["ce_weight"] == 0.5  # next-token loss mixed in by default
    assert slicegpt.load(out).model is not None


def test_cli_distillation_errors_are_one_line(student_dir, tmp_path, capsys):
    from slicegpt.cli import main

    plain = tmp_path / "plain"
    make_model("llama").save_pretrained(plain)
    base = ["finetune", str(student_dir), "--steps", "1"]
    for argv, message in [(base + ["--teacher", str(plain)], "--teacher names the model to distill from"),
                          (base + ["--loss", "distill", "--top-k", "0"], "--top-k must be a positive integer"),
                          (base + ["--loss", "distill", "--temperature", "0"], "--temperature must be a positive"),
                          (base + ["--loss", "distill", "--ce-weight", "2"], r"--ce-weight must be in \[0, 1\]"),
                          (base + ["--train", "full", "--adapters-only", "--out", str(tmp_path / "x")],
                           "--adapters-only saves LoRA adapters"),
                          (["finetune", str(plain), "--loss", "distill"], "records no source model.*--teacher"),
                          (base + ["--loss", "distill", "--teacher", str(tmp_path / "missing")],
                           "cannot load the teacher .*missing")]:
        assert main(argv) == 1, argv
        assert_one_line_error(subprocess.CompletedProcess(argv, 1, "", capsys.readouterr().err), message)
    assert not (tmp_path / "x").exists()
