"""The whole slicing job as one call: source -> calibration -> dense perplexity -> slice -> save.

`slicegpt slice` is a thin layer over `slice_and_save`; Python users get the same run. The
model is never whole in memory: it is read one layer at a time from its safetensors files
(`core.onload`), the calibration activations live on an offload device (`core.cache`), each
finished layer is written as a shard of the output, and progress is recorded after every
layer so that running the same call again after a crash continues where it stopped
(`core.resume`). The output appears at `out` only when it is complete.

Inside a torch.distributed process group (`torchrun ... -m slicegpt slice`, or a caller's own)
every rank runs this same call on its share of the calibration and evaluation windows; the
engine adds their statistics (`core.distributed`) and rank 0 writes.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch

from slicegpt.adapters import get_adapter
from slicegpt.api import calibration_batches, complete_plan, run_plan
from slicegpt.atomic import (check_private, private_directory, publish, refuse_existing, refuse_overlap, storage_errors,
                             write_json)
from slicegpt.config import SlicingConfig
from slicegpt.core.distributed import Ranks, local_device
from slicegpt.core.run import Hooks, Progress
from slicegpt.core.forward import streamed_logits
from slicegpt.core.onload import CheckpointModel, LayeredModel, ResidentModel, eager_experts_for_float64
from slicegpt.core.resume import RESUME, RUN_MARKER, RunDirectory, run_directory, subfolder
from slicegpt.data import (bos_token, calibration_windows, check_window_length, evaluation_windows, load_text, same_file,
                           split_text, tokenize)
from slicegpt.errors import SliceGPTError
from slicegpt.evaluation.measure import measure
from slicegpt.evaluation.perplexity import streamed_perplexity
from slicegpt.formats.io import finish_directory, write_sliced_config
from slicegpt.formats.loading import checkpoint_directory, parse_dtype
from slicegpt.formats.standard import layernorms_with_bias, standard_config_from, stock_layers_structure, stock_tensors
from slicegpt.modeling.runtime import CONFIG_KEY, get_path
from slicegpt.plan import Plan, SliceSettings, check_counts, check_settings, make_plan, record, settings_from
from slicegpt.shards import tensor_sizes, write_index, write_shard
from slicegpt.version import __version__

ACTIVATIONS_MARKER = "slicegpt-activations"  # marks an --activations-dir folder this user's run made
DENSE_FIGURES = "dense.json"  # the dense model's perplexity, kept in the run directory across a resume


@dataclass
class SliceRun:
    """What `slice_and_save` did: where the model went, its record, and the measured figures."""

    out: Path
    config: SlicingConfig
    figures: dict = field(default_factory=dict)
    resumed_from_layer: int | None = None
    plan: Plan | None = None


class _StockHooks(Hooks):
    """Uniform rotation written as the family's stock model: each part converted as it is written.

    Where the stock class only approximates the sliced model (`deviations`), the exact parts go
    to `exact` too, so the cost of the approximation can be measured against them.
    """

    def __init__(self, inner: RunDirectory, adapter, hidden: int, dim: int, tied: bool, bias_norms: set[str],
                 exact: Path | None = None) -> None:
        self.inner, self.adapter, self.hidden, self.dim, self.tied, self.bias_norms = inner, adapter, hidden, dim, tied, bias_norms
        self.exact = exact
        if exact is not None:
            subfolder(exact)

    def write(self, part: int, tensors: dict[str, torch.Tensor]) -> None:
        if self.exact is not None and self.inner.ranks.writer:
            write_shard(self.exact, part, self.inner.parts, tensors)
        self.inner.write(part, stock_tensors(tensors, self.adapter, self.hidden, self.dim, self.tied, self.bias_norms))

    def checkpoint(self, progress: Progress, cache) -> None:
        self.inner.checkpoint(progress, cache)

    def resume(self):
        return self.inner.resume()


def _digest(*tensors: torch.Tensor) -> str:
    h = hashlib.sha256()
    for t in tensors:
        h.update(t.detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()


def _count(directory: Path) -> int:
    """Parameters in a written model: every tensor of its shards, each stored once (a tied head is not stored)."""
    return sum(numel for shard in directory.glob("model-*.safetensors") for numel, _ in tensor_sizes(shard).values())


def _parameters(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())  # shared (tied) once; works on meta tensors


def slice_and_save(model: str | os.PathLike = "default", out: str | os.PathLike = "",
                   settings: SliceSettings | None = None, *, evaluate: bool = True,
                   eval_data: str | os.PathLike | None = None, eval_samples: int = 16, eval_seqlen: int | None = None,
                   eval_batch_size: int = 2, dtype: str | torch.dtype | None = None, device: str = "cpu",
                   preload: bool = False, activations_dir: str | os.PathLike | None = None, restart: bool = False,
                   force: bool = False, checkpoint_every: int = 1, speed: bool = False, progress: bool = True,
                   on_plan: Callable[[Plan], None] | None = None, **changes) -> SliceRun:
    """Slice the dense model `model` (hub id, directory, .gguf, or "default") and write it to `out`.

        run = slicegpt.slice_and_save("default", "out/smollm2-80", size=0.8)

    The settings are `slice_model`'s (`SliceSettings`, or its fields as keywords). Only one
    decoder layer is on `device` at a time; the other weights are read from the model's files
    when their turn comes (`preload`: the dense model is loaded into CPU memory first, for a GPU
    run of a model that fits in RAM), the calibration activations wait in CPU memory (or on disk
    under `activations_dir`). `out` appears only when complete; an interrupted call resumes when
    called again with the same arguments (`restart=True` starts over); `checkpoint_every` layers
    the activations are saved for resuming. `on_plan` is called with the plan before any slow
    work. `speed` adds a quick throughput check of the dense and the sliced model (both loaded whole).
    """
    settings = settings_from(settings, **changes)
    check_settings(settings)  # before anything is read or written
    check_counts(eval_samples=eval_samples, eval_seqlen=eval_seqlen, eval_batch_size=eval_batch_size,
                 checkpoint_every=checkpoint_every)
    run_arguments = {"evaluate": evaluate, "eval_data": str(eval_data) if eval_data else None,
                     "eval_samples": eval_samples, "eval_seqlen": eval_seqlen, "eval_batch_size": eval_batch_size,
                     "dtype": str(dtype) if dtype else None, "device": device, "preload": preload,
                     "restart": restart, "force": force, "checkpoint_every": checkpoint_every, "speed": speed}
    ranks = Ranks.current()
    ranks.agree({"model": str(model), "out": str(out), **settings.to_dict(), **run_arguments})
    device = local_device(device, ranks)
    progress = progress and ranks.writer
    if not out:
        raise SliceGPTError("an output directory is needed (--out)")
    out = Path(out)
    if os.path.exists(str(model)):
        refuse_overlap(out, Path(model))  # never the source, under any spelling
    refuse_existing(out, force, "output directory")  # --force replaces only a slicegpt output
    offload, offload_dir = ("disk", _activations_folder(activations_dir, out, ranks)) if activations_dir else ("cpu", None)
    for folder, marker, what in [(run_directory(out), RUN_MARKER, "run directory"),
                                 (offload_dir, ACTIVATIONS_MARKER, "activation folder")]:
        if folder is not None and os.path.lexists(folder):
            check_private(folder, marker, what)  # refused before any slow work (and checked again when used)
    calib_text = load_text(settings.calibration, "calibration", settings.text_field)  # bad data fails first
    # every rank resolves the source itself (no collective wait around a long download); a GGUF file
    # is converted once per machine (a file lock) and huggingface_hub locks its downloads the same way
    directory, source_name = checkpoint_directory(model)
    refuse_overlap(out, directory)
    view = CheckpointModel(directory, dtype=parse_dtype(dtype) if dtype else None, device=device)
    fingerprint, work_dtype = view.fingerprint(), view.dtype
    adapter = get_adapter(view.config)
    dense_parameters = _parameters(view.model)
    plan = make_plan(settings, view, adapter, model=str(model), dense_parameters=dense_parameters)
    if plan.layout == "uniform" and not plan.standard:
        raise SliceGPTError("slice_and_save writes uniform rotation as the family's stock model (standard=True)")
    check_window_length(view.config, settings.seqlen)
    if evaluate:
        check_window_length(view.config, eval_seqlen or settings.seqlen, "--eval-seqlen" if eval_seqlen else "--seqlen")
    if on_plan is not None and ranks.writer:
        on_plan(plan)
    tokenizer = _tokenizer(directory)
    windows, eval_windows, eval_source = _windows(tokenizer, calib_text, settings, evaluate, eval_data, eval_samples,
                                                  eval_seqlen)
    if len(windows) < ranks.world_size:
        raise SliceGPTError(f"{len(windows)} calibration windows cannot be shared by {ranks.world_size} processes: "
                            "each rank needs at least one (--samples)")
    share = ranks.part(windows)  # this rank's calibration windows
    eval_share = ranks.part(eval_windows) if eval_windows is not None else None
    layers = get_path(view.model, adapter.layers)
    resume_settings = {**_resume_keys(plan), "work_dtype": str(work_dtype), "world_size": ranks.world_size,
                       "device": torch.device(device).type,
                       "calibration_windows": _digest(windows.input_ids, windows.attention_mask),
                       "torch": torch.__version__, "slicegpt": __version__}
    if preload:  # the same engine over the model in memory, moving one layer at a time to the device
        view = _in_memory(directory, work_dtype, device)
    run_dir = RunDirectory(out, len(layers) + 2, resume_settings, fingerprint, restart=restart,
                           checkpoint_every=checkpoint_every, ranks=ranks)
    if offload_dir is not None:  # ours, private; what a killed run left there is removed
        _clear_activations(offload_dir)
    resumed = run_dir.record["next_layer"] if run_dir.resuming else None

    figures: dict = {"model": str(model), "recipe": settings.recipe, "size": settings.size,
                     "slicing": settings.slicing}
    if eval_windows is not None:
        figures["perplexity_dense"] = _dense_perplexity(run_dir.root, view, adapter.layers, eval_windows,
                                                        eval_share, eval_batch_size, offload, offload_dir, progress,
                                                        ranks)
    batches, dense_batches = calibration_batches(plan, windows, ranks)
    with measure(device) as m:
        plan = complete_plan(plan, view, adapter, batches, ranks, progress, offload, offload_dir)
        hooks = run_dir
        if plan.standard:  # each part converted to the stock layout as it is written
            exact = run_dir.root / "exact" if plan.deviations else None
            hooks = _StockHooks(run_dir, adapter, plan.hidden, plan.widths[0], plan.tied_head,
                                layernorms_with_bias(view.model), exact)
        outcome = run_plan(plan, view, adapter, batches, dense_batches, ranks=ranks, progress=progress, hooks=hooks,
                           offload=offload, offload_dir=offload_dir)

    staging = run_dir.staging
    if ranks.writer:
        with storage_errors(staging, then=RESUME):
            _write_configs(staging, directory, view, adapter, plan, outcome, run_dir.shards)
    ranks.barrier()  # every rank reads the output from here on
    calibration = {"source": str(settings.calibration), "seed": settings.seed, "samples": len(windows.input_ids),
                   "seqlen": windows.input_ids.shape[1], "tokens": windows.tokens}
    config = record(plan, outcome, calibration=calibration, parameters_sliced=_count(staging),
                    source_model=source_name,
                    distributed={"world_size": ranks.world_size, "samples_per_rank": ranks.gather(len(share)),
                                 "tokens_per_rank": ranks.gather(share.tokens)})
    figures.update(recipe=settings.recipe, compensate=plan.levers.compensate, dense_share=config.dense_share,
                   widths=plan.width_rule, mlp_neurons=plan.neurons,
                   mlp_neurons_per_layer=list(plan.layer_neurons) if plan.layer_neurons else None,
                   rotation=plan.rotation, standard=plan.stock_class,
                   deviations=list(plan.deviations), max_logit_deviation=None,
                   parameters_dense=config.parameters_dense, parameters_sliced=config.parameters_sliced,
                   parameters_predicted=plan.predicted_parameters,
                   parameter_ratio=config.parameters_sliced / config.parameters_dense, hidden_size=plan.hidden,
                   sliced_hidden_size=config.sliced_hidden_size, slicing_seconds=m.seconds,
                   peak_memory_bytes=m.peak_bytes, offload=offload, resumed_from_layer=resumed,
                   world_size=ranks.world_size)
    if ranks.distributed:
        figures.update(peak_memory_bytes_per_rank=ranks.gather(m.peak_bytes),
                       allreduce_bytes=ranks.reduced_bytes, allreduce_bytes_per_layer=ranks.reduced_bytes // len(layers))
    if plan.standard and plan.deviations:  # what the stock approximation costs, measured against the exact model
        _measure_deviation(run_dir, view, outcome, config, figures, windows, eval_share, eval_batch_size, work_dtype,
                           device, offload, offload_dir, progress, ranks)
    if eval_windows is not None:
        sliced_view, sliced_layers = _output_view(staging, work_dtype, device)
        figures["perplexity_sliced"] = streamed_perplexity(sliced_view, sliced_layers,
                                                           eval_share.batches(eval_batch_size), offload,
                                                           offload_dir, progress, ranks)
        figures["eval_tokens"] = eval_windows.tokens
        figures["eval_data"] = str(eval_source)
    if speed and ranks.writer:
        figures["speed"] = _quick_speed(model, staging, device)
    ranks.barrier()  # every rank is done reading the staged output

    def finish() -> None:
        with storage_errors(staging, then=RESUME):
            finish_directory(staging, tokenizer, config, extra={"results": figures}, known=run_dir.shards)
            publish(staging, out)

    ranks.on_writer(finish)
    run_dir.remove()
    if offload_dir is not None:
        shutil.rmtree(offload_dir, ignore_errors=True)
    figures["out"] = str(out)
    return SliceRun(out=out, config=config, figures=figures, resumed_from_layer=resumed, plan=plan)


def _resume_keys(plan) -> dict:
    """The plan as flat JSON values, so that a resume compares like with like and names what changed
    (a setting by its own name, a planned decision as plan.<name>)."""
    record = json.loads(json.dumps(plan.to_dict(), default=str))
    settings = record.pop("settings")
    record.pop("model")  # the same model may be given under another path
    return {**settings, **{f"plan.{k}": v for k, v in record.items()}}


def _activations_folder(activations_dir: str | os.PathLike, out: Path, ranks: Ranks) -> Path:
    """This run's own folder under `activations_dir` (emptied once the run holds its lock)."""
    folder = Path(activations_dir) / f"slicegpt-{hashlib.sha256(str(out.resolve()).encode()).hexdigest()[:12]}"
    return folder.with_name(f"{folder.name}-rank{ranks.rank}") if ranks.distributed else folder


def _clear_activations(folder: Path) -> None:
    """This run's activation folder, checked to be this user's own (never a link elsewhere), emptied."""
    private_directory(folder, ACTIVATIONS_MARKER, "activation folder")
    for path in folder.iterdir():
        if path.name != ACTIVATIONS_MARKER:
            shutil.rmtree(path) if path.is_dir() and not path.is_symlink() else path.unlink()


def _tokenizer(directory: Path):
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(str(directory))
    except (OSError, ValueError) as e:
        raise SliceGPTError(f"cannot load the tokenizer of {directory}: {str(e).splitlines()[0]}") from None


def _windows(tokenizer, calib_text: str, settings: SliceSettings, evaluate: bool, eval_data, eval_samples: int,
             eval_seqlen: int | None):
    """Calibration and evaluation windows; one local file is split so the two stay disjoint."""
    eval_source = eval_data or settings.calibration
    if same_file(eval_source, settings.calibration):  # however the two were spelled
        calib_text, eval_text = split_text(calib_text)
    else:
        eval_text = load_text(eval_source, "evaluation", settings.text_field) if evaluate else ""
    bos = bos_token(tokenizer)
    windows = calibration_windows(tokenize(tokenizer, calib_text), settings.calibration_samples, settings.seqlen,
                                  settings.seed, bos=bos)
    eval_windows = (evaluation_windows(tokenize(tokenizer, eval_text), eval_seqlen or settings.seqlen, eval_samples,
                                       bos=bos) if evaluate else None)
    return windows, eval_windows, eval_source


def _measure_deviation(run_dir: RunDirectory, view, outcome, config: SlicingConfig, figures: dict, windows,
                       eval_share, eval_batch_size: int, work_dtype, device, offload, offload_dir, progress: bool,
                       ranks: Ranks) -> None:
    """The stock model against the exact sliced one (written beside it): logits on one window, perplexity."""
    from slicegpt.formats.io import write_sliced_config

    exact = run_dir.root / "exact"
    if ranks.writer:
        with storage_errors(exact, then=RESUME):
            write_sliced_config(view.model.config, None, outcome.structure, outcome.module_attributes, exact)
            write_index(exact, {p.name: "" for p in exact.glob("model-*.safetensors")})
    ranks.barrier()
    sample = [(windows.input_ids[:1], windows.attention_mask[:1])]
    (stock_view, stock_layers), (exact_view, exact_layers) = (_output_view(run_dir.staging, work_dtype, device),
                                                              _output_view(exact, work_dtype, device))
    reference = next(iter(streamed_logits(exact_view, exact_layers, sample, progress=False)))
    approx = next(iter(streamed_logits(stock_view, stock_layers, sample, progress=False)))
    figures["max_logit_deviation"] = config.max_logit_deviation = float((approx - reference).abs().max())
    if eval_share is not None:
        figures["perplexity_exact"] = streamed_perplexity(exact_view, exact_layers, eval_share.batches(eval_batch_size),
                                                          offload, offload_dir, progress, ranks)


def _quick_speed(model, staging: Path, device: str) -> list:
    from slicegpt.formats.loading import load_model
    from slicegpt.evaluation.speed import quick_speed

    dense = load_model(model, device=device).model
    rows = quick_speed("dense", dense)
    del dense
    raw = json.loads((staging / "config.json").read_text())
    if CONFIG_KEY in raw:
        from slicegpt.modeling.runtime import load_sliced_model

        sliced = load_sliced_model(str(staging), device=device)
    else:
        from transformers import AutoModelForCausalLM

        sliced = AutoModelForCausalLM.from_pretrained(str(staging)).to(device).eval()
    return rows + quick_speed("sliced", sliced)


def _in_memory(directory: Path, dtype: torch.dtype, device: str) -> ResidentModel:
    from transformers import AutoModelForCausalLM

    try:
        model = AutoModelForCausalLM.from_pretrained(str(directory), dtype=dtype, disable_mmap=True)
    except (OSError, ValueError) as e:
        raise SliceGPTError(f"cannot load the model in {directory}: {str(e).splitlines()[0]}") from None
    eager_experts_for_float64(model, dtype)
    return ResidentModel(model.eval(), device)


def _generation_config(directory: Path):
    from transformers import GenerationConfig

    try:
        return GenerationConfig.from_pretrained(str(directory))
    except (OSError, ValueError):
        return None


def _write_configs(staging: Path, directory: Path, view: LayeredModel, adapter, plan: Plan, outcome,
                   shards: dict[str, str]) -> None:
    """The output's config (a stock one for a stock output), generation config and shard index."""
    generation = _generation_config(directory)
    if plan.standard:
        neurons = max(plan.layer_neurons) if plan.layer_neurons else plan.neurons
        stock = standard_config_from(view.model.config, adapter, plan.widths[0], outcome.tied_head, neurons,
                                     plan.heads)
        for attr in (CONFIG_KEY,):
            if hasattr(stock, attr):
                delattr(stock, attr)
        if plan.measured:  # the family's layers, each MLP its own width: loaded by slicegpt's loader
            write_sliced_config(stock, generation, stock_layers_structure(adapter), {}, staging)
        else:
            stock.save_pretrained(staging)
            if generation is not None:
                generation.save_pretrained(staging)
    else:
        write_sliced_config(view.model.config, generation, outcome.structure, outcome.module_attributes, staging)
    write_index(staging, shards)


def _dense_perplexity(root: Path, view: LayeredModel, layers: str, windows, share, batch_size: int, offload: str,
                      offload_dir, progress: bool, ranks: Ranks) -> float:
    """The dense perplexity, computed once per run (a resumed run reads it back); `share`: this rank's windows."""
    path = root / DENSE_FIGURES
    key = _digest(windows.input_ids, windows.attention_mask) + f":{batch_size}"

    def saved() -> float | None:
        if path.is_file():
            try:
                record = json.loads(path.read_text())
                if record.get("windows") == key:
                    return float(record["perplexity"])
            except (json.JSONDecodeError, KeyError, TypeError, ValueError):
                pass
        return None

    value = ranks.on_writer(saved)
    if value is not None:
        return value
    value = streamed_perplexity(view, layers, share.batches(batch_size), offload, offload_dir, progress, ranks)
    if ranks.writer:
        write_json(path, {"windows": key, "perplexity": value})
    return value


def _output_view(directory: Path, dtype: torch.dtype, device: str) -> tuple[CheckpointModel, str]:
    """The written model, read one layer at a time (its own structure for per-layer outputs), and
    where its layers are."""
    sliced = json.loads((directory / "config.json").read_text()).get(CONFIG_KEY)
    view = CheckpointModel(directory, dtype=dtype, device=device, sliced=sliced)
    return view, sliced["structure"]["layers"] if sliced else get_adapter(view.config).layers
