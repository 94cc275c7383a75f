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

import torch

from slicegpt.adapters import get_adapter
from slicegpt.atomic import publish, refuse_existing, write_json
from slicegpt.config import SlicingConfig
from slicegpt.core.bases import sliced_dim
from slicegpt.core.compensation import DENSE_SHARE, RIDGE, check_dense_share, dense_first_batches, summarize
from slicegpt.core.distributed import Ranks, local_device
from slicegpt.core.engine import Hooks, Progress, per_layer_ties, slice_layers, slice_uniform, uniform_ties
from slicegpt.core.widths import plan_widths
from slicegpt.core.forward import streamed_logits
from slicegpt.evaluation.perplexity import streamed_perplexity
from slicegpt.core.onload import CheckpointModel, LayeredModel, ResidentModel, eager_experts_for_float64
from slicegpt.core.resume import RunDirectory
from slicegpt.data import DEFAULT_DATA, bos_token, calibration_windows, evaluation_windows, load_text, split_text, tokenize
from slicegpt.errors import SliceGPTError
from slicegpt.version import __version__
from slicegpt.shards import tensor_sizes, write_index, write_shard
from slicegpt.formats.loading import parse_dtype, checkpoint_directory
from slicegpt.evaluation.measure import measure
from slicegpt.modeling.runtime import CONFIG_KEY, get_path
from slicegpt.formats.standard import check_standard, layernorms_with_bias, standard_config_from, stock_tensors

DENSE_FIGURES = "dense.json"  # the dense model's perplexity, kept in the run directory across a resume


@dataclass
class SliceRun:
    """What `slice_and_save` did: where the model went, its record, and the measured figures."""

    out: Path
    config: SlicingConfig
    figures: dict = field(default_factory=dict)
    resumed_from_layer: int | None = None


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
            exact.mkdir(exist_ok=True)

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


def slice_and_save(model: str | os.PathLike = "default", out: str | os.PathLike = "", sparsity: float = 0.25, *,
                   calibration: str | os.PathLike = DEFAULT_DATA, samples: int = 32, seqlen: int = 1024,
                   seed: int = 0, text_field: str = "text", batch_size: int = 4, round_to: int = 8,
                   rotation: str = "per-layer", slice_head: bool = False, keep_tied_head: bool = True,
                   fit_tied_head: bool = False, pooling: str = "unit-trace", accept_deviation: bool = False,
                   evaluate: bool = True, eval_data: str | os.PathLike | None = None, eval_samples: int = 16,
                   eval_seqlen: int | None = None, eval_batch_size: int = 2, dtype: str | torch.dtype | None = None,
                   device: str = "cpu", weights: str = "disk", offload: str = "cpu",
                   offload_dir: str | os.PathLike | None = None,
                   restart: bool = False, force: bool = False, checkpoint_every: int = 1, speed: bool = False,
                   method: str = "default", compensate: str | bool | None = None, widths: str | None = None,
                   parameters: float | None = None, ridge: float = RIDGE, mlp_width: float | str | None = None,
                   dense_share: float = DENSE_SHARE, progress: bool = True) -> SliceRun:
    """Slice the dense model `model` (hub id, directory, .gguf, or "default") and write it to `out`.

    Only one decoder layer is on `device` at a time; the other weights wait on `weights`
    ("disk": read from the safetensors files when their turn comes; "cpu": the dense model loaded
    into CPU memory first, for a GPU run of a model that fits in RAM), the calibration
    activations on `offload` ("cpu", or "disk" under `offload_dir`). `out` appears only when complete; an
    interrupted call resumes when called again with the same arguments (`restart=True`
    starts over). `checkpoint_every` layers the activations are saved for resuming. `speed`
    adds a quick throughput check of the dense and the sliced model (both loaded whole).
    `rotation="uniform"` writes a stock model of the family (plain `from_pretrained`).
    `method`, `compensate`, `widths`, `parameters`, `ridge`, `mlp_width` and `dense_share` are
    the quality levers of `slicegpt.slice_model`.
    """
    arguments = {k: str(v) if isinstance(v, os.PathLike) else v for k, v in locals().items()
                 if k not in ("progress", "offload_dir")}  # a scratch folder per node is fine
    from transformers import AutoTokenizer

    from slicegpt.api import check_rotation, dense_neurons, effective_sparsity, planned_layout, resolve_levers

    ranks = Ranks.current()
    ranks.agree(arguments)  # ranks started with other arguments would sum unrelated statistics
    device = local_device(device, ranks)
    progress = progress and ranks.writer
    sliced_dim(8, sparsity)  # validate before any slow work
    check_rotation(rotation, pooling, fit_tied_head)
    compensate, widths, mlp = resolve_levers(method, compensate, widths, rotation, mlp_width)
    check_dense_share(dense_share)
    if parameters is not None and not 0.0 < parameters <= 2.0:
        raise SliceGPTError(f"--parameters is a fraction of the dense count, e.g. 0.75; got {parameters}")
    if not out:
        raise SliceGPTError("an output directory is needed (--out)")
    out = Path(out)
    refuse_existing(out, force, "output directory")
    if offload == "disk" and offload_dir is None:
        raise SliceGPTError("--offload disk needs a directory: --offload-dir DIR")
    if weights not in ("cpu", "disk"):
        raise SliceGPTError(f"weights must wait on cpu or disk, got {weights!r}")
    if offload not in ("cpu", "disk"):
        raise SliceGPTError(f"offload must be cpu or disk, got {offload!r}")
    if offload_dir is not None:  # this run's own folder (emptied below, once the run holds its lock)
        offload_dir = Path(offload_dir) / f"slicegpt-{hashlib.sha256(str(out.resolve()).encode()).hexdigest()[:12]}"
        if ranks.distributed:
            offload_dir = offload_dir.with_name(f"{offload_dir.name}-rank{ranks.rank}")
    calib_text = load_text(calibration, "calibration", text_field)  # bad data fails before the model loads
    # every rank resolves the source itself (no collective wait around a long download); a GGUF file
    # is converted once per machine (a file lock) and huggingface_hub locks its downloads the same way
    directory, source_name = checkpoint_directory(model)
    view = CheckpointModel(directory, dtype=parse_dtype(dtype) if dtype else None, device=device)
    fingerprint, source_config, work_dtype = view.fingerprint(), view.config, view.dtype
    adapter = get_adapter(source_config)
    uniform = rotation == "uniform"
    slice_head = uniform or slice_head or adapter.slice_head_required
    hidden = get_path(view.model, adapter.embeddings[0]).weight.shape[-1]
    dim = sliced_dim(hidden, sparsity, round_to)
    deviations = check_standard(view.model, adapter, accept_deviation) if uniform else []
    try:
        tokenizer = AutoTokenizer.from_pretrained(str(directory))
    except (OSError, ValueError) as e:
        raise SliceGPTError(f"cannot load the tokenizer of {directory}: {str(e).splitlines()[0]}") from None

    eval_source = eval_data or calibration
    if eval_source == calibration and Path(str(eval_source)).is_file():
        calib_text, eval_text = split_text(calib_text)  # one local file: keep the parts disjoint
    else:
        eval_text = load_text(eval_source, "evaluation", text_field) if evaluate else ""
    windows = calibration_windows(tokenize(tokenizer, calib_text), samples, seqlen, seed, bos=bos_token(tokenizer))
    eval_windows = (evaluation_windows(tokenize(tokenizer, eval_text), eval_seqlen or seqlen, eval_samples,
                                       bos=bos_token(tokenizer)) if evaluate else None)
    if len(windows) < ranks.world_size:
        raise SliceGPTError(f"{len(windows)} calibration windows cannot be shared by {ranks.world_size} processes: "
                            "each rank needs at least one (--samples)")
    share = ranks.part(windows)  # this rank's calibration windows
    eval_share = ranks.part(eval_windows) if eval_windows is not None else None

    layers = get_path(view.model, adapter.layers)
    settings = {"sparsity": sparsity, "round_to": round_to, "width": dim, "rotation": rotation, "slice_head": slice_head,
                "keep_tied_head": keep_tied_head, "fit_tied_head": fit_tied_head, "pooling": pooling if uniform else "",
                "accept_deviation": accept_deviation, "batch_size": batch_size, "dtype": str(work_dtype),
                "compensate": compensate, "ridge": ridge if compensate != "off" else None, "widths": widths,
                "dense_share": dense_share if compensate != "off" else None,
                "parameters": parameters, "mlp": mlp, "world_size": ranks.world_size,
                "device": torch.device(device).type, "calibration": _digest(windows.input_ids, windows.attention_mask),
                "torch": torch.__version__, "slicegpt": __version__}
    if weights == "cpu":  # the same engine over the model in memory, moving one layer at a time to the device
        view = _in_memory(directory, work_dtype, device)
    run_dir = RunDirectory(out, len(layers) + 2, settings, fingerprint, restart=restart,
                           checkpoint_every=checkpoint_every, ranks=ranks)
    resumed = run_dir.record["next_layer"] if run_dir.resuming else None
    if offload_dir is not None:  # what a killed run left there
        shutil.rmtree(offload_dir, ignore_errors=True)

    figures: dict = {"model": str(model), "sparsity": sparsity}
    bias_norms = layernorms_with_bias(view.model)
    dense_parameters = _parameters(view.model)
    if eval_windows is not None:
        figures["perplexity_dense"] = _dense_perplexity(run_dir.root, view, adapter.layers, eval_windows,
                                                        eval_share, eval_batch_size, offload, offload_dir, progress,
                                                        ranks)

    calibration_batches, dense_batches = dense_first_batches(windows, batch_size, ranks,
                                                             dense_share if compensate != "off" else 1.0)
    with measure(device) as m:
        tied = (uniform_ties(view, adapter, fit_tied_head) if uniform
                else per_layer_ties(view, adapter, keep_tied_head, slice_head))
        plan, widths, neurons = plan_widths(view, adapter, calibration_batches, rotation=rotation, rule=widths,
                                            sparsity=sparsity, parameters=parameters,
                                            dense_parameters=dense_parameters, round_to=round_to, tied=tied,
                                            slice_head=slice_head, offload=offload, offload_dir=offload_dir,
                                            progress=progress, ranks=ranks, mlp=mlp)
        dim = plan[0]
        identity, rotation, slice_head, fit_tied_head = planned_layout(plan, hidden, neurons, rotation, slice_head,
                                                                       fit_tied_head)
        if identity:  # a stock model computing the same: nothing deviates
            uniform, deviations = True, []
        if uniform:
            tied_hint = view.ties_head(adapter.head, adapter.embeddings[0]) if identity else uniform_ties(
                view, adapter, fit_tied_head)
            exact = run_dir.root / "exact" if deviations else None
            hooks = _StockHooks(run_dir, adapter, hidden, dim, tied_hint, bias_norms, exact)
            outcome = slice_uniform(view, adapter, calibration_batches, dim, fit_tied_head=fit_tied_head,
                                    unit_trace=pooling == "unit-trace", progress=progress, hooks=hooks,
                                    offload=offload, offload_dir=offload_dir, compensate=compensate, ridge=ridge,
                                    ranks=ranks, neurons=neurons, identity=identity, dense_batches=dense_batches)
        else:
            outcome = slice_layers(view, adapter, calibration_batches, plan, slice_head=slice_head,
                                   keep_tied_head=keep_tied_head, progress=progress, hooks=run_dir,
                                   offload=offload, offload_dir=offload_dir, compensate=compensate, ridge=ridge,
                                   ranks=ranks, neurons=neurons, dense_batches=dense_batches)

    staging = run_dir.staging
    if ranks.writer:
        _write_configs(staging, directory, view, adapter, uniform, dim, outcome, run_dir.shards, neurons)
    ranks.barrier()  # every rank reads the output from here on
    config = SlicingConfig(
        sparsity=sparsity if parameters is None and neurons is None else effective_sparsity(plan, hidden),
        hidden_size=hidden, sliced_hidden_size=dim if uniform else round(sum(plan[:-1]) / (len(plan) - 1)),
        method=method, compensate=compensate, ridge=ridge if compensate != "off" else None,
        dense_share=dense_share if compensate != "off" else None, widths_rule=widths,
        parameters_budget=parameters, widths=plan, compensation=summarize(outcome.fits),
        mlp_width=mlp, mlp_neurons=neurons, mlp_neurons_dense=dense_neurons(view.model, adapter) if neurons else None,
        model_type=source_config.model_type,
        family=adapter.family, rotation=rotation, round_to=round_to, slice_head=slice_head,
        tied_head=outcome.tied_head, fit_tied_head=fit_tied_head, pooling=pooling if uniform else "",
        standard=uniform, deviations=deviations,
        calibration={"source": str(calibration), "seed": seed, "samples": len(windows.input_ids),
                     "seqlen": windows.input_ids.shape[1], "tokens": windows.tokens},
        source_model=source_name, parameters_dense=dense_parameters, parameters_sliced=_count(staging),
        spectra=outcome.spectra,
        distributed={"world_size": ranks.world_size, "samples_per_rank": ranks.gather(len(share)),
                     "tokens_per_rank": ranks.gather(share.tokens)})
    figures.update(method=method, compensate=compensate, dense_share=config.dense_share, widths=widths,
                   mlp_neurons=neurons,
                   rotation=rotation, standard=uniform, deviations=deviations, max_logit_deviation=None,
                   parameters_dense=config.parameters_dense, parameters_sliced=config.parameters_sliced,
                   parameter_ratio=config.parameters_sliced / config.parameters_dense, hidden_size=hidden,
                   sliced_hidden_size=config.sliced_hidden_size, slicing_seconds=m.seconds, peak_memory_bytes=m.peak_bytes,
                   offload=offload, resumed_from_layer=resumed, world_size=ranks.world_size)
    if ranks.distributed:
        figures.update(peak_memory_bytes_per_rank=ranks.gather(m.peak_bytes),
                       allreduce_bytes=ranks.reduced_bytes, allreduce_bytes_per_layer=ranks.reduced_bytes // len(layers))
    if uniform and deviations:  # what the stock approximation costs, measured against the exact model
        from slicegpt.formats.io import write_sliced_config

        exact = run_dir.root / "exact"
        if ranks.writer:
            write_sliced_config(view.model.config, None, outcome.structure, outcome.module_attributes, exact)
            write_index(exact, {p.name: "" for p in exact.glob("model-*.safetensors")})
        ranks.barrier()
        sample = [(windows.input_ids[:1], windows.attention_mask[:1])]
        (stock_view, stock_layers), (exact_view, exact_layers) = (_output_view(staging, work_dtype, device),
                                                                  _output_view(exact, work_dtype, device))
        reference = next(iter(streamed_logits(exact_view, exact_layers, sample, progress=False)))
        approx = next(iter(streamed_logits(stock_view, stock_layers, sample, progress=False)))
        figures["max_logit_deviation"] = config.max_logit_deviation = float((approx - reference).abs().max())
        if eval_windows is not None:
            figures["perplexity_exact"] = streamed_perplexity(exact_view, exact_layers,
                                                              eval_share.batches(eval_batch_size), offload,
                                                              offload_dir, progress, ranks)
    if eval_windows is not None:
        sliced_view, sliced_layers = _output_view(staging, work_dtype, device)
        figures["perplexity_sliced"] = streamed_perplexity(sliced_view, sliced_layers,
                                                           eval_share.batches(eval_batch_size), offload,
                                                           offload_dir, progress, ranks)
        figures["eval_tokens"] = eval_windows.tokens
        figures["eval_data"] = str(eval_source)
    if speed and ranks.writer:
        figures["speed"] = _quick_speed(model, staging, device)
    from slicegpt.formats.io import finish_directory

    ranks.barrier()  # every rank is done reading the staged output

    def finish() -> None:
        finish_directory(staging, tokenizer, config, extra={"results": figures}, known=run_dir.shards)
        publish(staging, out)

    ranks.on_writer(finish)
    run_dir.remove()
    if offload_dir is not None:
        shutil.rmtree(offload_dir, ignore_errors=True)
    figures["out"] = str(out)
    return SliceRun(out=out, config=config, figures=figures, resumed_from_layer=resumed)


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


def _write_configs(staging: Path, directory: Path, view: LayeredModel, adapter, uniform: bool, dim: int,
                   outcome, shards: dict[str, str], neurons: int | None = None) -> None:
    """The output's config (a stock one for uniform rotation), generation config and shard index."""
    generation = _generation_config(directory)
    if uniform:
        stock = standard_config_from(view.model.config, adapter, dim, outcome.tied_head, neurons)
        for attr in (CONFIG_KEY,):
            if hasattr(stock, attr):
                delattr(stock, attr)
        stock.save_pretrained(staging)
        if generation is not None:
            generation.save_pretrained(staging)
    else:
        from slicegpt.formats.io import write_sliced_config

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
