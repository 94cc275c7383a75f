"""Recovery fine-tuning: LoRA adapters or full weights of a sliced (or dense) model, perplexity before and after.

Slicing drops the directions of least variance at every block boundary; what that costs is
spread thinly over all layers, so small low-rank updates of the attention and MLP linears
recover much of it for a fraction of the parameters. Only the adapters train (peft LoRA), or
with `train="full"` the same linears' own weights; everything else slicing computed
(skip-connection and entry matrices, norms, embeddings) stays as it is, so the result has
exactly the input's structure and saves in its format. The objective is the next token, or
with a `teacher` (slicegpt.distill) the dense model's distributions.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Iterator

import torch
from torch import nn
from tqdm.auto import tqdm

from slicegpt.config import SlicingConfig
from slicegpt.data import (DEFAULT_DATA, Windows, bos_token, calibration_windows, check_window_length, evaluation_windows,
                           load_text, same_file, split_text, tokenize)
from slicegpt.errors import SliceGPTError
from slicegpt.evaluation.perplexity import count_parameters, perplexity
from slicegpt.evaluation.measure import measure
from slicegpt.formats.lora import ADAPTER_DIR, load_adapter, peft_quietly
from slicegpt.modeling.runtime import MANIFEST_NAME, get_path, sliced_structure
from slicegpt.plan import check_counts

if TYPE_CHECKING:
    from slicegpt.distill import TeacherLogits

RECORD_NAME = "finetune.json"  # the fine-tuning record of a dense output (sliced ones use the manifest)
TRAINS = ("lora", "full")
DEFAULT_LR = {"lora": 1e-3, "full": 1e-4}  # full weights move the model directly: a tenth of LoRA's rate
# distillation's share of next-token loss: at 0.5x of SmolLM2's parameters (1000 steps, full weights) KL alone
# recovered 45% of the excess log-perplexity, KL and next-token loss half and half 71% (docs/evaluation.md)
DISTILL_CE_WEIGHT = 0.5


@dataclass
class FinetuneResult:
    """What `finetune` did: the adapted model (peft, not merged) and the figures."""

    model: nn.Module  # a peft PeftModel around the input model (LoRA), or the input model itself (full)
    perplexity_before: float | None
    perplexity_after: float | None
    losses: list[float]  # training loss per step
    trainable_parameters: int
    parameters: int  # of the input model (adapters excluded)
    seconds: float  # training only
    peak_memory_bytes: int
    eval_tokens: int
    settings: dict = field(default_factory=dict)
    kl: list[float] = field(default_factory=list)  # distillation: KL to the teacher per step (nats per token)

    def loss_summary(self) -> tuple[float, float]:
        """Mean training loss over the first and the last tenth of the steps (one batch is noisy)."""
        k = max(1, len(self.losses) // 10)
        return sum(self.losses[:k]) / k, sum(self.losses[-k:]) / k

    def record(self) -> dict:
        """The JSON-able record saved with the model (settings, figures, loss curve)."""
        return {**self.settings, "trainable_parameters": self.trainable_parameters, "parameters": self.parameters,
                "perplexity_before": self.perplexity_before, "perplexity_after": self.perplexity_after,
                "eval_tokens": self.eval_tokens, "seconds": round(self.seconds, 2),
                "loss_start": self.loss_summary()[0], "loss_end": self.loss_summary()[1],
                "losses": [round(x, 4) for x in self.losses],
                **({"kl": [round(x, 5) for x in self.kl]} if self.kl else {})}


def check_settings(lora_r: int, lora_alpha: float, lora_dropout: float, steps: int, lr: float | None,
                   batch_size: int, seqlen: int, train: str = "lora") -> None:
    """Refuse impossible settings before anything slow happens (`lr` None: the default for `train`)."""
    if train not in TRAINS:
        raise SliceGPTError(f"--train must be one of {', '.join(TRAINS)}, got {train!r}")
    if not isinstance(lora_r, int) or lora_r < 1:
        raise SliceGPTError(f"--lora-r must be a positive integer, got {lora_r}")
    if not lora_alpha > 0:
        raise SliceGPTError(f"--lora-alpha must be positive, got {lora_alpha}")
    if not 0 <= lora_dropout < 1:
        raise SliceGPTError(f"--lora-dropout must be in [0, 1), got {lora_dropout}")
    if steps < 1:
        raise SliceGPTError(f"--steps must be at least 1, got {steps}")
    if lr is not None and not (lr > 0 and math.isfinite(lr)):
        raise SliceGPTError(f"--lr must be a positive number, got {lr}")
    if batch_size < 1:
        raise SliceGPTError(f"--batch-size must be at least 1, got {batch_size}")
    if seqlen < 2:
        raise SliceGPTError(f"--seqlen must be at least 2, got {seqlen}")


def _is_linear(module: nn.Module) -> bool:
    return isinstance(module, nn.Linear) or type(module).__name__ == "Conv1D"  # GPT-2's transposed linear


def default_target_modules(model: nn.Module) -> list[str]:
    """The attention and MLP linears the family's adapter names, as peft suffixes.

    Read from the architecture description (never the model name), so dense, per-layer and
    standard models of a family get the same targets. Raw parameters (fused MoE experts,
    routers) are no linears and are left out. The skip-connection and entry matrices of a
    per-layer model are not trained: they are d' x d' bases (11M parameters on SmolLM2 at
    25%, five times the adapters) that connect the rotated bases of neighbouring blocks, and
    the adapters on both sides of every skip already change what each block reads and
    writes; frozen, they also keep an adapter a plain peft adapter of the saved model.
    """
    from slicegpt.adapters import get_adapter

    adapter = get_adapter(model.config)
    layers = get_path(model, adapter.layers)
    names: list[str] = []
    for branch in adapter.branches:
        for raw in branch.inputs + branch.outputs:
            path = raw.rstrip("?")
            if path in names:
                continue
            for layer in layers:
                try:
                    module = get_path(layer, path)
                except AttributeError:
                    continue
                if isinstance(module, nn.Module) and _is_linear(module):
                    names.append(path)
                    break
    if not names:
        raise SliceGPTError(f"no linear layers to adapt in this {model.config.model_type} model; pass target_modules")
    return names


def data_texts(data: str | os.PathLike, eval_data: str | os.PathLike | None,
               text_field: str = "text") -> tuple[str, str]:
    """Training text and held-out text, disjoint.

    A named corpus gives its calibration part for training and its evaluation part (for
    Shakespeare: six plays never used for calibration) as held-out text. One local file
    used for both is split 90/10 at a line break.
    """
    train = load_text(data, "calibration", text_field)
    source = data if eval_data is None else eval_data
    if same_file(source, data):  # however the two were spelled
        return split_text(train)
    return train, load_text(source, "evaluation", text_field)


def training_batches(windows: Windows, batch_size: int, steps: int, seed: int) -> Iterator[torch.Tensor]:
    """`steps` batches of windows: every window once per epoch, in a seeded random order."""
    generator = torch.Generator().manual_seed(seed)
    count = len(windows.input_ids)
    order = torch.zeros(0, dtype=torch.long)
    for _ in range(steps):
        while len(order) < batch_size:
            order = torch.cat([order, torch.randperm(count, generator=generator)])
        yield windows.input_ids[order[:batch_size]]
        order = order[batch_size:]


def _windows(tokenizer, source, seqlen: int, samples: int | None, seed: int, role: str) -> Windows:
    """Windows from text: every non-overlapping window for training, the standard ones for evaluation."""
    if isinstance(source, Windows):
        return source
    if isinstance(source, torch.Tensor):
        if source.dim() != 2:
            raise SliceGPTError("token ids must be a [samples, seqlen] tensor")
        return Windows(source, torch.ones_like(source))
    if tokenizer is None:
        raise SliceGPTError("a tokenizer is needed to train or evaluate on text")
    ids, bos = tokenize(tokenizer, source), bos_token(tokenizer)
    if role == "evaluation":
        return evaluation_windows(ids, seqlen, samples, bos=bos)
    available = len(ids) // (seqlen if bos is None else seqlen - 1)
    if available < 1:
        raise SliceGPTError(f"training text too short: {len(ids)} tokens, fewer than one window of {seqlen}; "
                            "use a shorter --seqlen or more text")
    return calibration_windows(ids, available, seqlen, seed, bos=bos)


def _named(source) -> bool:
    return isinstance(source, (str, os.PathLike))


def _sources(data, eval_data, text_field: str) -> tuple:
    """Training data, held-out data (texts where sources are named) and the held-out source's name."""
    if _named(data) and (eval_data is None or _named(eval_data)):
        train, held_out = data_texts(data, eval_data, text_field)
        return train, held_out, str(eval_data if eval_data is not None else data)
    train = load_text(data, "calibration", text_field) if _named(data) else data
    held_out = load_text(eval_data, "evaluation", text_field) if _named(eval_data) else eval_data
    return train, held_out, str(eval_data) if _named(eval_data) else None


def training_windows(tokenizer, data: str | os.PathLike | Windows | torch.Tensor = DEFAULT_DATA,
                     eval_data: str | os.PathLike | Windows | torch.Tensor | None = None, seqlen: int = 128,
                     seed: int = 0, text_field: str = "text") -> Windows:
    """The windows `finetune` trains on for these settings (a teacher's pass must see the same ones)."""
    train_data, _, _ = _sources(data, eval_data, text_field)
    return _windows(tokenizer, train_data, seqlen, None, seed, "calibration")


def _trainable(model: nn.Module, train: str, targets: list[str], lora_r: int, lora_alpha: float,
               lora_dropout: float) -> nn.Module:
    """The model to train: a peft wrapper with LoRA adapters, or the model with only the targets' weights free."""
    if train == "full":
        model.requires_grad_(False)
        for name, module in model.named_modules():
            if name.endswith(tuple(targets)) and _is_linear(module):
                module.requires_grad_(True)
        return model
    from peft import LoraConfig, get_peft_model

    conv1d = any(type(m).__name__ == "Conv1D" for n, m in model.named_modules() if n.endswith(tuple(targets)))
    config = LoraConfig(r=lora_r, lora_alpha=lora_alpha, lora_dropout=lora_dropout, target_modules=targets,
                        fan_in_fan_out=conv1d, bias="none", task_type="CAUSAL_LM")
    with peft_quietly():
        return get_peft_model(model, config)


def finetune(model: nn.Module, tokenizer=None, data: str | os.PathLike | Windows | torch.Tensor = DEFAULT_DATA,
             eval_data: str | os.PathLike | Windows | torch.Tensor | None = None, *, lora_r: int = 8,
             lora_alpha: float = 16.0, lora_dropout: float = 0.0, steps: int = 200, lr: float | None = None,
             batch_size: int = 4, seqlen: int = 128, eval_samples: int | None = 16, eval_seqlen: int = 1024,
             eval_batch_size: int = 2, target_modules: list[str] | None = None, seed: int = 0,
             text_field: str = "text", evaluate: bool = True, progress: bool = True, train: str = "lora",
             teacher: TeacherLogits | None = None, ce_weight: float = DISTILL_CE_WEIGHT) -> FinetuneResult:
    """Train LoRA adapters on `model` (dense, per-layer sliced or standard sliced) for `steps` steps.

    `data` is a data source (as `load_text` takes, its calibration part), a [n, seqlen] tensor
    of token ids or prepared `Windows`; `eval_data` defaults to the held-out part of the same
    source (see `data_texts`); with token windows for `data` and no `eval_data` there is no
    evaluation. Perplexity is measured before and after with the standard protocol
    (`eval_samples` x `eval_seqlen`, the `slicegpt eval` defaults), so it compares with the
    figures of `slice` and `eval`. The model is adapted in place and returned wrapped in a peft
    model (`result.model`); `save_finetuned` merges and writes it. `train="full"` trains the
    target linears' own weights instead (`lr` defaults to DEFAULT_LR[train]).

    With `teacher` (slicegpt.distill.teacher_logits) the batches are the ones the teacher saw
    and the loss is T^2 x KL to the teacher's distributions, mixed with `ce_weight` of the
    next-token loss (half and half by default: the teacher keeps the student near the dense model,
    the next-token loss adapts it to the training text); `data` then only names the held-out text.
    """
    check_settings(lora_r, lora_alpha, lora_dropout, steps, lr, batch_size, seqlen, train)
    check_counts(eval_samples=eval_samples, eval_seqlen=eval_seqlen, eval_batch_size=eval_batch_size)
    lr = DEFAULT_LR[train] if lr is None else lr
    settings: dict = {"data": str(data) if _named(data) else "token windows", "train": train,
                      **({"lora_r": lora_r, "lora_alpha": lora_alpha, "lora_dropout": lora_dropout}
                         if train == "lora" else {}),
                      "steps": steps, "lr": lr, "batch_size": batch_size, "seqlen": seqlen, "seed": seed}
    train_data, held_out, settings["eval_data"] = _sources(data, eval_data, text_field)
    if teacher is None:
        windows = _windows(tokenizer, train_data, seqlen, None, seed, "calibration")
        check_window_length(model.config, windows.input_ids.shape[1], "--seqlen")
        batches, train_windows = training_batches(windows, batch_size, steps, seed), len(windows.input_ids)
    else:
        if teacher.steps != steps:
            raise SliceGPTError(f"the teacher's logits cover {teacher.steps} steps, training has {steps}")
        teacher.check_student(model, tokenizer)
        batches, train_windows = teacher.batches(), None
        settings.update(loss="distill", teacher=teacher.source, temperature=teacher.temperature,
                        top_k=teacher.top_k, ce_weight=ce_weight, teacher_logits_bytes=teacher.bytes())
    eval_windows = None
    if evaluate and held_out is not None:
        eval_windows = _windows(tokenizer, held_out, eval_seqlen, eval_samples, seed, "evaluation")
        check_window_length(model.config, eval_windows.input_ids.shape[1], "--eval-seqlen")

    device = next(model.parameters()).device
    model.eval()
    before = perplexity(model, eval_windows, eval_batch_size, progress) if eval_windows is not None else None
    targets = list(target_modules) if target_modules else default_target_modules(model)
    settings["target_modules"] = targets
    parameters = count_parameters(model)
    torch.manual_seed(seed)  # LoRA's A matrices and dropout
    trained = _trainable(model, train, targets, lora_r, lora_alpha, lora_dropout)
    trainable = [p for p in trained.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=lr, weight_decay=0.0)
    warmup = max(1, min(20, steps // 10))
    schedule = torch.optim.lr_scheduler.LambdaLR(  # linear warm-up, then linear decay to zero
        optimizer, lambda step: min((step + 1) / warmup, max(0.0, (steps - step) / max(1, steps - warmup))))

    losses: list[float] = []
    kls: list[float] = []
    tokens = 0
    trained.train()
    with measure(str(device)) as m, tqdm(batches, total=steps, desc="fine-tuning", unit="step",
                                         disable=not progress) as bar:
        for step, ids in enumerate(bar):
            ids = ids.to(device)
            tokens += ids.numel()
            if teacher is None:
                loss = trained(input_ids=ids, labels=ids, use_cache=False).loss
            else:
                out = trained(input_ids=ids, labels=ids if ce_weight else None, use_cache=False)
                kl = teacher.kl(step, out.logits)
                kls.append(kl.item())
                loss = (1 - ce_weight) * teacher.temperature ** 2 * kl + (ce_weight * out.loss if ce_weight else 0)
            if not torch.isfinite(loss):
                raise SliceGPTError(f"training loss is not finite at step {len(losses) + 1}; use a smaller --lr")
            loss.backward()
            torch.nn.utils.clip_grad_norm_(trainable, 1.0)
            optimizer.step()
            schedule.step()
            optimizer.zero_grad(set_to_none=True)
            losses.append(loss.item())
            bar.set_postfix(loss=f"{losses[-1]:.3f}")
    trained.eval()
    if train == "full":
        trained.requires_grad_(False)
    if train_windows is not None:
        settings["train_windows"] = train_windows
    settings["train_tokens"] = tokens
    after = perplexity(trained, eval_windows, eval_batch_size, progress) if eval_windows is not None else None
    return FinetuneResult(trained, before, after, losses, sum(p.numel() for p in trainable), parameters,
                          m.seconds, m.peak_bytes, eval_windows.tokens if eval_windows is not None else 0, settings,
                          kls)


def _save_adapter(peft_model: nn.Module, target: Path, source: str) -> None:
    peft_model.peft_config["default"].base_model_name_or_path = source or None
    peft_model.save_pretrained(str(target))
    (target / "README.md").unlink(missing_ok=True)  # peft's empty model-card template


def save_finetuned(result: FinetuneResult, tokenizer, out: str | os.PathLike,
                   slicing: SlicingConfig | dict | None = None, *, adapters_only: bool = False,
                   force: bool = False, source: str = "") -> nn.Module:
    """Write a fine-tuned model in its input's format and return the model the directory holds.

    `slicing` is the input's slicing record (a `SlicingConfig`, or the manifest `slicegpt.load`
    returns as `LoadedModel.sliced`); None for a dense model. Per-layer and standard sliced
    models are written by `slicegpt.save` with the fine-tuning appended to the record's
    `finetune` list; a dense one as a plain transformers checkpoint with `finetune.json`.
    By default the adapters are merged into the weights. With `adapters_only` the weights are
    saved unchanged and the peft adapter goes to `lora/` beside them (`slicegpt.load` and
    `load_model` merge it when loading; transformers users load it with
    `PeftModel.from_pretrained(model, "DIR/lora")`). Consumes `result.model`: the returned
    model is the merged one either way. Written atomically; an existing `out` needs `force`.
    """
    from slicegpt.atomic import atomic_directory, refuse_existing, storage_errors
    from slicegpt.formats.io import save

    out = Path(out)
    full = result.settings.get("train") == "full"
    if full and adapters_only:
        raise SliceGPTError("--adapters-only saves LoRA adapters; --train full changed the weights themselves")
    refuse_existing(out, force, "output directory", "--force (force=True)", ours=(MANIFEST_NAME, RECORD_NAME))
    peft_model = result.model
    if slicing is None and sliced_structure(peft_model if full else peft_model.get_base_model()) is not None:
        raise SliceGPTError("this model is sliced: pass its slicing record (slicing=...) to save it")
    saved = "adapter in lora/" if adapters_only else "full weights" if full else "merged"
    record = dict(result.record(), saved=saved, source_model=source)
    staging = None

    def add_adapter(tmp: Path) -> None:
        if staging is not None:
            shutil.copytree(staging / ADAPTER_DIR, tmp / ADAPTER_DIR)

    def fill_dense(tmp: Path) -> None:
        model.save_pretrained(tmp)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        add_adapter(tmp)
        (tmp / RECORD_NAME).write_text(json.dumps({"finetune": [record]}, indent=2))

    try:
        if adapters_only:
            out.parent.mkdir(parents=True, exist_ok=True)
            with storage_errors(out):
                staging = Path(tempfile.mkdtemp(prefix=f".{out.name}.lora-", dir=out.parent))
                _save_adapter(peft_model, staging / ADAPTER_DIR, source)
            model = peft_model.unload()
        else:
            model = peft_model if full else peft_model.merge_and_unload()
        if slicing is None:
            with atomic_directory(out, force=True) as tmp:  # existence checked above
                fill_dense(tmp)
        else:
            manifest = slicing if isinstance(slicing, dict) else {"slicing": slicing.to_dict()}
            config = SlicingConfig.from_dict(manifest.get("slicing", {}))
            config.finetune = [*config.finetune, record]
            extra = {k: v for k, v in manifest.items()
                     if k not in ("format_version", "slicegpt_version", "slicing", "files")}
            save(model, tokenizer, config, out, force=force, extra=extra, fill_extra=add_adapter)
    finally:
        if staging is not None:
            shutil.rmtree(staging, ignore_errors=True)
    return load_adapter(model, out / ADAPTER_DIR) if adapters_only else model
