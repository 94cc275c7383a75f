"""Zero-shot accuracy of a loaded model with lm-evaluation-harness (the paper's second measure).

lm-eval's `HFLM` wraps the model object we already hold, so per-layer sliced models (stock
classes with swapped layer forwards and skip matrices) are measured exactly as they run here;
nothing is reloaded by name. The average follows the SliceGPT paper's code: per task
`acc_norm` where the task reports it (piqa, hellaswag, arc_easy, arc_challenge), else `acc`
(winogrande), then the plain mean over tasks.

Offline, a task whose dataset lives on the Hugging Face hub fails at once with a message that
names it (the hub is put in offline mode when unreachable, instead of minutes of retries);
tasks with local data (`include_path`, lm-eval's `--include_path` style) and the shipped
`shakespeare_next_line` task run without network.
"""

from __future__ import annotations

import difflib
import os
import sys
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

from torch import nn

from slicegpt.errors import SliceGPTError

TASKS_DIR = Path(__file__).parent.parent / "tasks"  # lm-eval tasks shipped with slicegpt, always on the include path
PAPER_TASKS = ("piqa", "winogrande", "hellaswag", "arc_easy", "arc_challenge")
_LOCAL_BUILDERS = {"json", "csv", "text", "parquet", "arrow", "pandas"}  # datasets' readers of local files
_HUB_ERRORS = {"ConnectionError", "OfflineModeIsEnabled", "LocalEntryNotFoundError", "DatasetNotFoundError",
               "HfHubHTTPError", "RepositoryNotFoundError", "GatedRepoError", "Timeout", "ReadTimeout"}


@dataclass
class TaskScore:
    """One task's accuracies (fractions in [0, 1]) and their standard errors."""

    task: str
    samples: int
    acc: float | None = None
    acc_stderr: float | None = None
    acc_norm: float | None = None
    acc_norm_stderr: float | None = None

    @property
    def metric(self) -> str:
        """The metric the average uses: acc_norm where reported, else acc (the paper's choice)."""
        return "acc_norm" if self.acc_norm is not None else "acc"

    @property
    def value(self) -> float:
        return getattr(self, self.metric)

    @property
    def stderr(self) -> float | None:
        return getattr(self, f"{self.metric}_stderr")


@dataclass
class ZeroShotResult:
    """Per-task scores and their average; `loglikelihoods[task][doc]` has one entry per choice."""

    scores: list[TaskScore]
    num_fewshot: int | None
    limit: int | float | None
    loglikelihoods: dict[str, list[list[float]]] = field(default_factory=dict, repr=False)

    @property
    def average(self) -> float:
        return sum(s.value for s in self.scores) / len(self.scores)

    def score(self, task: str) -> TaskScore:
        return next(s for s in self.scores if s.task == task)

    def to_dict(self) -> dict:
        tasks = {s.task: {"samples": s.samples, "acc": s.acc, "acc_stderr": s.acc_stderr, "acc_norm": s.acc_norm,
                          "acc_norm_stderr": s.acc_norm_stderr, "metric": s.metric, "value": s.value}
                 for s in self.scores}
        return {"tasks": tasks, "average": self.average, "num_fewshot": self.num_fewshot, "limit": self.limit}


@contextmanager
def _hub_offline_if_unreachable() -> Iterator[bool]:
    """Yield whether the hub is off limits; if it is unreachable, switch HF libraries offline.

    Without this, `datasets` retries an unreachable hub for tens of seconds per task before
    failing. `datasets` and `huggingface_hub` read the variable at import, so modules already
    imported get their flag set too; everything is restored afterwards.
    """
    from slicegpt.formats.loading import hub_reachable, env_flag

    if env_flag("HF_HUB_OFFLINE") or env_flag("HF_DATASETS_OFFLINE"):
        yield True
        return
    if hub_reachable():
        yield False
        return
    saved_env = {k: os.environ.get(k) for k in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE")}
    flags = [(name, attr) for name, attr in (("huggingface_hub.constants", "HF_HUB_OFFLINE"),
                                             ("datasets.config", "HF_HUB_OFFLINE"),
                                             ("datasets.config", "HF_DATASETS_OFFLINE"))
             if hasattr(sys.modules.get(name), attr)]
    saved_flags = [getattr(sys.modules[name], attr) for name, attr in flags]
    os.environ.update(HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1")
    for name, attr in flags:
        setattr(sys.modules[name], attr, True)
    try:
        yield True
    finally:
        for key, value in saved_env.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
        for (name, attr), value in zip(flags, saved_flags):
            setattr(sys.modules[name], attr, value)


def _hflm(model: nn.Module, tokenizer, batch_size: int, progress: bool):
    """lm-eval's HFLM around our model object; `progress` reaches its request progress bar."""
    from lm_eval.models.huggingface import HFLM

    class _HFLM(HFLM):
        def loglikelihood(self, requests, disable_tqdm: bool = False):
            return super().loglikelihood(requests, disable_tqdm=disable_tqdm or not progress)

    return _HFLM(pretrained=model, tokenizer=tokenizer, batch_size=batch_size)


@contextmanager
def _no_retying(model: nn.Module) -> Iterator[None]:
    """HFLM calls `model.tie_weights()`; the model we hand it is already as it must be.

    A sliced model whose head was untied must keep its own head; the instance attribute
    shadows the method while lm-eval holds the model and is removed afterwards.
    """
    model.tie_weights = lambda *args, **kwargs: None
    try:
        yield
    finally:
        del model.tie_weights


def task_names(tasks: str | Sequence[str]) -> list[str]:
    """`"piqa, arc_easy"` or a sequence -> unique names in order."""
    items = tasks.split(",") if isinstance(tasks, str) else list(tasks)
    names = list(dict.fromkeys(t.strip() for t in items if t and t.strip()))
    if not names:
        raise SliceGPTError(f"no task given; name lm-eval tasks, e.g. {','.join(PAPER_TASKS)}")
    return names


def _include_paths(include_path: str | os.PathLike | Sequence[str | os.PathLike] | None) -> list[Path]:
    given = [] if include_path is None else [include_path] if isinstance(include_path, (str, os.PathLike)) \
        else list(include_path)
    paths = [TASKS_DIR]
    for p in map(Path, given):
        if not p.is_dir():
            raise SliceGPTError(f"task directory not found: {p} (--include-path takes a directory of lm-eval "
                                "task YAML files)")
        paths.append(p)
    return paths


def _task_manager(names: list[str], paths: list[Path]):
    """Only our directories when they define every task (fast); else lm-eval's ~15k too (seconds)."""
    from lm_eval.tasks import TaskManager

    local = TaskManager(include_path=[str(p) for p in paths], include_defaults=False)
    if all(n in local.all_tasks or Path(n).is_file() for n in names):
        return local
    return TaskManager(include_path=[str(p) for p in paths])


def _check_known(names: list[str], manager) -> None:
    for name in names:
        if name in manager.all_tasks or Path(name).is_file():
            continue
        close = difflib.get_close_matches(name, manager.all_tasks, n=5, cutoff=0.6)
        hint = f"close names: {', '.join(close)}" if close else "no close name"
        raise SliceGPTError(f"unknown lm-eval task '{name}' ({hint}); `lm-eval ls tasks` lists all "
                            f"{len(manager.all_tasks):,}, or pass --include-path DIR for your own task YAML files")


def _exception_names(exc: BaseException) -> set[str]:
    names: set[str] = set()
    seen = exc
    while seen is not None and len(names) < 50:
        names.update(t.__name__ for t in type(seen).__mro__)
        seen = seen.__cause__ or seen.__context__
    return names


def _load_error(name: str, exc: Exception, manager, offline: bool) -> SliceGPTError:
    entry = manager.task_index.get(name)
    dataset = (entry.cfg or {}).get("dataset_path") if entry is not None else None
    what = f"its dataset '{dataset}'" if dataset else "its dataset"
    detail = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
    from_hub = bool(_exception_names(exc) & _HUB_ERRORS) or (
        offline and isinstance(exc, OSError) and dataset is not None and dataset not in _LOCAL_BUILDERS
        and not Path(dataset).exists())
    if not from_hub:
        return SliceGPTError(f"cannot load task '{name}': {type(exc).__name__}: {detail}")
    why = ("offline: the hub is unreachable or HF_HUB_OFFLINE is set, and it is not in the local datasets cache"
           if offline else detail)
    return SliceGPTError(f"task '{name}': {what} could not be fetched from the Hugging Face hub ({why}); "
                         "run a local task instead: --tasks shakespeare_next_line (shipped with slicegpt), or "
                         "your own lm-eval task YAML with local data files in --include-path DIR")


@dataclass
class TaskSet:
    """lm-eval tasks built and with their data loaded, ready for one `zero_shot` run."""

    names: list[str]
    leaves: list[str]  # the tasks that get a score (a group's members)
    specs: list = field(repr=False)  # lm-eval Task and Group objects
    manager: object = field(repr=False)  # the lm-eval TaskManager that knows them


def load_tasks(tasks: str | Sequence[str] = PAPER_TASKS,
               include_path: str | os.PathLike | Sequence[str | os.PathLike] | None = None) -> TaskSet:
    """Find and build lm-eval tasks, loading their datasets; fails before any model work.

    Unknown names get the close ones; a hub dataset that cannot be fetched names the task and
    the offline alternatives. Generation tasks are refused: we report accuracy.
    """
    names = task_names(tasks)
    paths = _include_paths(include_path)
    with _hub_offline_if_unreachable() as offline:
        manager = _task_manager(names, paths)
        _check_known(names, manager)
        specs, leaves = [], []
        for name in names:
            try:
                loaded = manager.load([name])
            except Exception as e:  # datasets raises many types: ConnectionError, DatasetNotFoundError, ...
                raise _load_error(name, e, manager, offline) from None
            for leaf, task in loaded["tasks"].items():
                if task.get_config("output_type") == "generate_until":
                    raise SliceGPTError(f"task '{leaf}' generates text (output_type generate_until); slicegpt "
                                        "lm-eval reports multiple-choice accuracy: run lm-eval itself for it")
                leaves.append(leaf)
            specs += list(loaded["groups"].values()) or list(loaded["tasks"].values())
    return TaskSet(names, list(dict.fromkeys(leaves)), specs, manager)


def _float(value) -> float | None:
    return float(value) if isinstance(value, (int, float)) else None


def _loglikelihoods(samples: list[dict]) -> list[list[float]]:
    ordered = sorted(samples, key=lambda s: s["doc_id"])
    return [[float(r[0]) for r in s["filtered_resps"]] for s in ordered]


@contextmanager
def _callers_random_state() -> Iterator[None]:
    """lm-eval reseeds the global generators; a library call must not change the caller's streams."""
    import random

    import numpy as np
    import torch

    python_state, numpy_state = random.getstate(), np.random.get_state()
    devices = list(range(torch.cuda.device_count())) if torch.cuda.is_initialized() else []
    with torch.random.fork_rng(devices=devices):
        try:
            yield
        finally:
            random.setstate(python_state)
            np.random.set_state(numpy_state)


def zero_shot(model: nn.Module, tokenizer, tasks: str | Sequence[str] | TaskSet = PAPER_TASKS,
              include_path: str | os.PathLike | Sequence[str | os.PathLike] | None = None,
              limit: int | float | None = None, batch_size: int = 8, num_fewshot: int | None = None,
              progress: bool = True) -> ZeroShotResult:
    """Run lm-eval tasks on `model` and return accuracies with the paper's average.

    `tasks` are lm-eval task names (a list or "a,b"), YAML paths, or a `load_tasks` result;
    the shipped `shakespeare_next_line` and every task under `include_path` are found without
    further flags. `limit` evaluates the first N documents of each task (a fraction if < 1);
    `num_fewshot` overrides the tasks' own (0 for the paper's tasks). Requests are
    right-padded into batches of `batch_size`, as lm-eval does for any causal LM. lm-eval seeds
    Python's, NumPy's and torch's global generators; their states are restored afterwards.
    """
    if batch_size < 1:
        raise SliceGPTError(f"batch size must be positive, got {batch_size}")
    if limit is not None and limit <= 0:
        raise SliceGPTError(f"limit must be positive, got {limit}")
    if num_fewshot is not None and num_fewshot < 0:
        raise SliceGPTError(f"number of few-shot examples must be >= 0, got {num_fewshot}")
    task_set = tasks if isinstance(tasks, TaskSet) else load_tasks(tasks, include_path)

    with _hub_offline_if_unreachable(), _no_retying(model), _callers_random_state():
        import lm_eval

        lm = _hflm(model, tokenizer, batch_size, progress)
        results = lm_eval.simple_evaluate(lm, tasks=task_set.specs, num_fewshot=num_fewshot, limit=limit,
                                          task_manager=task_set.manager, log_samples=True)

    scores, loglikelihoods = [], {}
    for leaf in task_set.leaves:
        metrics = results["results"][leaf]
        score = TaskScore(task=leaf, samples=int(results["n-samples"][leaf]["effective"]),
                          acc=_float(metrics.get("acc,none")), acc_stderr=_float(metrics.get("acc_stderr,none")),
                          acc_norm=_float(metrics.get("acc_norm,none")),
                          acc_norm_stderr=_float(metrics.get("acc_norm_stderr,none")))
        if score.acc is None and score.acc_norm is None:
            reported = sorted(k.split(",")[0] for k in metrics if "," in k and "stderr" not in k)
            raise SliceGPTError(f"task '{leaf}' reports no accuracy (acc/acc_norm), only "
                                f"{', '.join(reported) or 'nothing'}")
        scores.append(score)
        loglikelihoods[leaf] = _loglikelihoods(results.get("samples", {}).get(leaf, []))
    return ZeroShotResult(scores, num_fewshot, limit, loglikelihoods)


__all__ = ["PAPER_TASKS", "TaskScore", "TaskSet", "ZeroShotResult", "load_tasks", "task_names", "zero_shot"]
