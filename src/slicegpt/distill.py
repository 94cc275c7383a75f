"""Distillation from the dense model: the teacher's next-token distributions, streamed through a temporary folder.

Next-token loss tells the sliced student one right token per position; the dense teacher's
distribution tells it how the original model ranked all of them, which is what slicing
disturbed. Holding both models and a [batch, seq, vocab] logits tensor per step would double
memory, so the teacher runs first, over the training batches in the order training uses them,
and writes each batch as one small safetensors file: its top-k log-probabilities at the
distillation temperature, their token ids, and the log-probability of all other tokens taken
together (`rest`). It is then freed, and training reads one file per step.

The loss is the KL divergence from the teacher over those k + 1 outcomes (the k tokens and
"any other token"): exact for the coarsened distributions, a lower bound of the full KL, and
zero when student and teacher agree. Only logits are matched: a sliced student's residual
stream lives in a rotated, narrower basis that its output does not record, so its hidden states
(the final one through its own head included) have no coordinates in common with the teacher's;
the logits always have.
"""

from __future__ import annotations

import gc
import hashlib
import json
import os
import shutil
import tempfile
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Iterator

import torch
from safetensors.torch import load_file, save_file
from torch import nn
from tqdm.auto import tqdm

from slicegpt.atomic import storage_errors
from slicegpt.errors import SliceGPTError
from slicegpt.modeling.runtime import MANIFEST_NAME

TOP_K = 64  # 512 positions x 64 x 8 bytes: ~0.26 MB a step of 4 x 128 tokens (full float16 logits: 50 MB)
FLOOR = -1e4  # log-probabilities below this count as zero mass (keeps 0 * -inf out of the loss)


def sparse_target(logits: torch.Tensor, top_k: int, temperature: float) -> dict[str, torch.Tensor]:
    """The teacher's distribution at `temperature` as top-k log-probabilities, their ids and the rest's log-mass."""
    logp = torch.log_softmax(logits.float() / temperature, dim=-1)
    values, indices = logp.topk(top_k, dim=-1)
    rest = logp.scatter(-1, indices, float("-inf")).logsumexp(-1)
    return {"logprobs": values.contiguous(), "indices": indices.to(torch.int32).contiguous(), "rest": rest}


def kl_to_target(student_logits: torch.Tensor, target: dict[str, torch.Tensor], temperature: float) -> torch.Tensor:
    """Mean KL(teacher || student) per position over the k kept tokens and the bucket of all others (nats)."""
    logq = torch.log_softmax(student_logits.float() / temperature, dim=-1)
    indices = target["indices"].long()
    q_top = logq.gather(-1, indices)
    q_rest = logq.scatter(-1, indices, float("-inf")).logsumexp(-1).clamp(min=FLOOR)
    p_top, p_rest = target["logprobs"], target["rest"].clamp(min=FLOOR)
    kl = (p_top.exp() * (p_top - q_top)).sum(-1) + p_rest.exp() * (p_rest - q_rest)
    return kl.mean()


def vocabulary_fingerprint(tokenizer) -> str:
    """A short hash of the token -> id table: two tokenizers with the same one read logits the same way."""
    table = sorted(tokenizer.get_vocab().items(), key=lambda item: item[1])
    return hashlib.sha256(json.dumps(table, ensure_ascii=False).encode()).hexdigest()[:16]


def output_size(model: nn.Module) -> int:
    """How many logits the model writes per position (its head's rows)."""
    head = model.get_output_embeddings()
    return head.weight.shape[0] if head is not None else int(model.config.vocab_size)


@dataclass(frozen=True)
class TeacherLogits:
    """The teacher's targets for every training step, one safetensors file each, in training order."""

    folder: Path
    steps: int
    top_k: int
    temperature: float
    vocab_size: int  # the teacher's logits per position
    vocabulary: str  # vocabulary_fingerprint of the teacher's tokenizer ("" when it had none)
    source: str

    def path(self, step: int) -> Path:
        return self.folder / f"step-{step:06d}.safetensors"

    def batches(self) -> Iterator[torch.Tensor]:
        """The training batches' token ids, in the order the teacher saw them."""
        for step in range(self.steps):
            yield load_file(self.path(step))["ids"].long()

    def kl(self, step: int, student_logits: torch.Tensor) -> torch.Tensor:
        """The step's KL from the teacher to `student_logits` (read from disk, one batch at a time)."""
        target = {k: v.to(student_logits.device) for k, v in load_file(self.path(step)).items() if k != "ids"}
        return kl_to_target(student_logits, target, self.temperature)

    def check_student(self, model: nn.Module, tokenizer) -> None:
        """Refuse a student that reads the teacher's logits with another vocabulary."""
        size = output_size(model)
        if size != self.vocab_size:
            raise SliceGPTError(f"the teacher {self.source} has {self.vocab_size} logits per token, the student "
                                f"{size}: distillation needs the same vocabulary")
        self.check_tokenizer(tokenizer)

    def check_tokenizer(self, tokenizer) -> None:
        """Refuse a student tokenizer whose token -> id table differs from the teacher's."""
        if tokenizer is not None and self.vocabulary and vocabulary_fingerprint(tokenizer) != self.vocabulary:
            raise SliceGPTError(f"the teacher {self.source} has another tokenizer vocabulary than the student; "
                                "pass --teacher with the student's dense source model")

    def bytes(self) -> int:
        """The files' total size."""
        return sum(p.stat().st_size for p in self.folder.iterdir())


@torch.no_grad()
def write_teacher_logits(teacher: nn.Module, batches: Iterable[torch.Tensor], folder: Path, top_k: int,
                         temperature: float, progress: bool = True) -> int:
    """Run `teacher` over `batches` and write each one's targets to `folder`; returns the step count."""
    device = next(teacher.parameters()).device
    teacher.eval()
    steps = 0
    for ids in tqdm(batches, desc="teacher logits", unit="batch", disable=not progress):
        logits = teacher(input_ids=ids.to(device), use_cache=False).logits
        target = {k: v.cpu() for k, v in sparse_target(logits, top_k, temperature).items()}
        path = folder / f"step-{steps:06d}.safetensors"
        with storage_errors(path):
            save_file({"ids": ids.to(torch.int32).contiguous(), **target}, str(path))
        steps += 1
    return steps


def check_distill_settings(top_k: int, temperature: float, ce_weight: float) -> None:
    """Refuse impossible distillation settings before anything slow happens."""
    if not isinstance(top_k, int) or top_k < 1:
        raise SliceGPTError(f"--top-k must be a positive integer, got {top_k}")
    if not temperature > 0 or temperature == float("inf"):
        raise SliceGPTError(f"--temperature must be a positive number, got {temperature}")
    if not 0 <= ce_weight <= 1:
        raise SliceGPTError(f"--ce-weight must be in [0, 1], got {ce_weight}")


def recorded_teacher(student: str | os.PathLike) -> str | None:
    """The dense model a slicegpt output was sliced from (its record's `source_model`), if it names one."""
    manifest = Path(student) / MANIFEST_NAME
    if not manifest.is_file():
        return None
    try:
        source = json.loads(manifest.read_text()).get("slicing", {}).get("source_model") or None
    except (OSError, ValueError):
        return None
    return str(source) if source else None


def resolve_teacher(student: str | os.PathLike, teacher: str | None) -> str:
    """`teacher` if given, else the student's recorded source model; refused in one line when neither exists."""
    if teacher:
        return teacher
    source = recorded_teacher(student)
    if source is None:
        raise SliceGPTError(f"{student} records no source model to distill from; pass --teacher MODEL")
    return source


def _load_teacher(source: str, dtype, device: str):
    from slicegpt.formats.loading import load_model

    try:
        return load_model(source, dtype=dtype, device=device)
    except SliceGPTError as e:
        raise SliceGPTError(f"cannot load the teacher {source}: {e}; pass --teacher MODEL") from None


@contextmanager
def teacher_logits(teacher: nn.Module | str, batches: Iterable[torch.Tensor], *, steps: int, tokenizer=None,
                   top_k: int = TOP_K, temperature: float = 1.0, dtype=None, device: str = "cpu",
                   parent: str | os.PathLike | None = None, progress: bool = True) -> Iterator[TeacherLogits]:
    """The teacher's targets for `batches`, in a temporary folder removed on exit (also on error).

    `teacher` is a model in memory (the caller keeps it) or a source `load_model` reads; a loaded
    teacher is freed before this yields, so the student can be loaded into the memory it used.
    `tokenizer` is the student's, when known: a teacher with another vocabulary is refused before
    its pass. `batches` is consumed once; it must yield `steps` batches.
    """
    folder = Path(tempfile.mkdtemp(prefix="slicegpt-teacher-", dir=parent))
    try:
        source = teacher if isinstance(teacher, str) else type(teacher).__name__
        model, teacher_tokenizer = teacher, None
        if isinstance(teacher, str):
            loaded = _load_teacher(teacher, dtype, device)
            model, teacher_tokenizer = loaded.model, loaded.tokenizer
            del loaded
        vocabulary = vocabulary_fingerprint(teacher_tokenizer) if teacher_tokenizer is not None else ""
        logits = TeacherLogits(folder, steps, top_k, temperature, output_size(model), vocabulary, source)
        logits.check_tokenizer(tokenizer)  # before the teacher's pass
        written = write_teacher_logits(model, batches, folder, top_k, temperature, progress)
        if written != steps:
            raise SliceGPTError(f"the teacher saw {written} batches, training needs {steps}")
        del model, teacher  # a loaded teacher is no longer referenced: its memory is the student's
        gc.collect()
        yield logits
    finally:
        shutil.rmtree(folder, ignore_errors=True)
