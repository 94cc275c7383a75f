"""The public, one-call API: plan a run, slice a model in memory, generate with it.

`slice_model` (a model in memory) and `pipeline.slice_and_save` (streamed to disk) take the same
settings (`plan.SliceSettings`), make the same plan (`plan.make_plan`), run it with `run_plan`
and build the same record (`plan.record`).
"""

from __future__ import annotations

import os

import torch
from torch import nn

from slicegpt.adapters import get_adapter
from slicegpt.config import SlicingConfig
from slicegpt.core.allocation import layer_floor, probe_costs
from slicegpt.core.compensation import dense_first_batches
from slicegpt.core.distributed import Ranks
from slicegpt.core.engine import slice_layers
from slicegpt.core.uniform import slice_uniform
from slicegpt.core.onload import ConfigModel, ResidentModel
from slicegpt.data import DEFAULT_DATA, Windows, bos_token, calibration_windows, check_window_length, load_text, tokenize
from slicegpt.errors import SliceGPTError
from slicegpt.evaluation.perplexity import count_parameters
from slicegpt.formats.loading import load_model, model_config
from slicegpt.formats.standard import to_standard
from slicegpt.modeling.runtime import sliced_structure
from slicegpt.plan import (Plan, SliceSettings, check_settings, choose_heads, head_choices, make_plan, record,
                           settings_from, with_layer_neurons)


def calibration_data(tokenizer, source: str | os.PathLike = DEFAULT_DATA, samples: int = 32,
                     seqlen: int = 1024, seed: int = 0, text_field: str = "text") -> Windows:
    """Random, seeded, non-overlapping token windows from the calibration part of `source`."""
    text = load_text(source, "calibration", text_field=text_field)
    return calibration_windows(tokenize(tokenizer, text), samples, seqlen, seed, bos=bos_token(tokenizer))


def slice_model(model: nn.Module | str | os.PathLike, tokenizer=None,
                calibration: Windows | torch.Tensor | str | os.PathLike | None = None,
                settings: SliceSettings | None = None, *, progress: bool = True,
                dtype: str | torch.dtype | None = None, **changes) -> tuple[nn.Module, SlicingConfig]:
    """Slice `model` and return the sliced model with the record of what was done.

        sliced, record = slicegpt.slice_model("default", size=0.8)            # the default recipe
        sliced, record = slicegpt.slice_model(model, tok, "shakespeare", recipe="paper", slicing=0.25)

    A run is a recipe plus a size (`slicegpt.SliceSettings`: pass one, or its fields as keywords):
    `size` is the fraction of the dense parameters that remains; `slicing` the paper's share of
    the hidden width removed. Expert levers (`rotation`, `compensate`, `neurons`, `head`, ...)
    override the recipe; `slicegpt.plan_slice` shows the plan without slicing.

    `model` may be a loaded causal LM (sliced in place, in its own dtype), a hub id, a directory or
    a .gguf file (loaded in `dtype`, default float32 as `load_model`; statistics are float64 either way).
    `calibration` is a data source (name or path; needs `tokenizer`), a [n, seqlen] tensor of
    token ids, or prepared `Windows` (default: `settings.calibration`). With uniform rotation and
    `standard` (or when only MLP neurons are pruned) the result is a new stock model of the
    family that plain transformers loads.

    Called on every rank of an initialised torch.distributed process group, each rank
    calibrates on its share of the windows and all return the same sliced model.
    """
    if isinstance(calibration, (str, os.PathLike)):
        changes["calibration"] = str(calibration)
    settings = settings_from(settings, **changes)
    check_settings(settings)  # before a model is loaded
    source_model = ""
    if isinstance(model, (str, os.PathLike)):
        source_model = str(model)
        loaded = load_model(model, dtype=dtype)
        model, tokenizer = loaded.model, tokenizer or loaded.tokenizer
    elif dtype is not None:
        raise SliceGPTError("dtype applies to a model given by name or path; convert a loaded one with model.to()")
    if sliced_structure(model) is not None:
        raise SliceGPTError("this model is already sliced; slice the dense model instead")
    adapter = get_adapter(model.config)
    view = ResidentModel(model)
    dense = count_parameters(model)
    plan = make_plan(settings, view, adapter, model=source_model or type(model).__name__, dense_parameters=dense)
    windows, calibration_info = _calibration_windows(calibration, tokenizer, settings)
    check_window_length(model.config, windows.input_ids.shape[1])
    ranks = Ranks.current()
    ranks.agree({"settings": settings.to_dict(), "calibration": calibration_info,
                 "windows": [len(windows), windows.input_ids.shape[1], windows.tokens]})
    if len(windows) < ranks.world_size:
        raise SliceGPTError(f"{len(windows)} calibration windows cannot be shared by {ranks.world_size} processes")
    batches, dense_batches = calibration_batches(plan, windows, ranks)
    progress = progress and ranks.writer
    plan = complete_plan(plan, view, adapter, batches, ranks, progress)
    outcome = run_plan(plan, view, adapter, batches, dense_batches, ranks=ranks, progress=progress)
    config = record(plan, outcome, calibration=calibration_info, parameters_sliced=count_parameters(model),
                    source_model=source_model,
                    distributed={"world_size": ranks.world_size,
                                 "tokens_per_rank": ranks.gather(sum(int(mask.sum()) for _, mask in batches))})
    if plan.standard:
        # the deviation check's sample: 128 tokens are enough to show a wrong conversion, and a
        # whole window's logits are a vocabulary-wide tensor per token (1 GB for Gemma 3's 262k)
        model = make_standard(model, config, plan.levers.accept_deviation, windows.input_ids[:1, :128])
    return model, config


def plan_slice(model: nn.Module | str | os.PathLike = "default", settings: SliceSettings | None = None,
               **changes) -> Plan:
    """The plan of a run without running it: every decision, the widths, neurons and the predicted
    parameter count and output class. A name or path is read for its config alone (no weights)."""
    settings = settings_from(settings, **changes)
    if isinstance(model, (str, os.PathLike)):
        config = model_config(model)
        view = ConfigModel(config)
        name = str(model)
    else:
        view, name = ResidentModel(model), type(model).__name__
    adapter = get_adapter(view.model.config)
    dense = sum(p.numel() for p in view.model.parameters())
    return make_plan(settings, view, adapter, model=name, dense_parameters=dense)


def _calibration_windows(calibration, tokenizer, settings: SliceSettings) -> tuple[Windows, dict]:
    """The calibration windows and what to record of them."""
    info: dict = {}
    if isinstance(calibration, Windows):
        windows = calibration
    elif isinstance(calibration, torch.Tensor):
        if calibration.dim() != 2:
            raise SliceGPTError("calibration token ids must be a [samples, seqlen] tensor")
        windows = Windows(calibration, torch.ones_like(calibration))
    else:
        if tokenizer is None:
            raise SliceGPTError("a tokenizer is needed to calibrate on text")
        windows = calibration_data(tokenizer, settings.calibration, settings.calibration_samples, settings.seqlen,
                                   settings.seed, settings.text_field)
        info = {"source": str(settings.calibration), "seed": settings.seed}
    info.update(samples=len(windows.input_ids), seqlen=windows.input_ids.shape[1], tokens=windows.tokens)
    return windows, info


def calibration_batches(plan: Plan, windows: Windows, ranks: Ranks) -> tuple[list, int | None]:
    """This rank's calibration batches, and how many of them the dense model runs on (compensation)."""
    share = plan.levers.dense_share if plan.levers.compensate != "off" else 1.0
    return dense_first_batches(windows, plan.settings.batch_size, ranks, share)


def complete_plan(plan: Plan, view, adapter, batches, ranks: Ranks, progress: bool, offload: str = "cpu",
                  offload_dir=None) -> Plan:
    """What the plan leaves to the run: adaptive widths, chosen from the calibration spectra (the plan
    made again with the batches), and measured neuron counts, from the dense model's cost curves.
    The probes keep their activations where the run keeps its own (`offload`, `offload_dir`)."""
    if plan.measured and plan.layer_neurons is None:
        choices = head_choices(plan, view, adapter)  # `--heads auto`: layouts weighed against neurons
        layouts = [layout for layout in choices if layout is not None]
        floor = min(layer_floor(plan.dense_neurons, plan.levers.round_to),
                    *(choice.neurons for choice in choices.values()), plan.neurons)
        probe = probe_costs(view, adapter, batches, plan.levers.ridge, floor, layouts=layouts, offload=offload,
                            offload_dir=offload_dir, progress=progress, ranks=ranks, spectra=plan.widths is None)
        if plan.widths is None:  # adaptive widths beside measured neurons: from the same probe's spectra
            plan = make_plan(plan.settings, view, adapter, model=plan.model, dense_parameters=plan.dense_parameters,
                             batches=batches, ranks=ranks, progress=progress, offload=offload,
                             offload_dir=offload_dir, spectra=probe.spectra)
        plan = (choose_heads(choices, probe.neurons, probe.heads, view, adapter) if choices
                else with_layer_neurons(plan, view, adapter, probe.neurons))
    elif plan.widths is None:
        plan = make_plan(plan.settings, view, adapter, model=plan.model, dense_parameters=plan.dense_parameters,
                         batches=batches, ranks=ranks, progress=progress, offload=offload, offload_dir=offload_dir)
    return plan


def run_plan(plan: Plan, view, adapter, batches, dense_batches: int | None, *, ranks: Ranks, progress: bool,
             hooks=None, offload: str = "cpu", offload_dir=None):
    """The engine, as the plan says: uniform rotation (or the identity basis), or per-layer."""
    lv = plan.levers
    common = dict(progress=progress, hooks=hooks, offload=offload, offload_dir=offload_dir, compensate=lv.compensate,
                  ridge=lv.ridge, ranks=ranks, neurons=plan.layer_neurons or plan.neurons, dense_batches=dense_batches,
                  heads=plan.heads)
    if plan.rotation == "uniform":
        return slice_uniform(view, adapter, batches, plan.widths[0], fit_tied_head=plan.fit_tied_head,
                             unit_trace=lv.pooling == "unit-trace", identity=plan.identity, **common)
    return slice_layers(view, adapter, batches, list(plan.widths), slice_head=plan.slice_head,
                        keep_tied_head=plan.keep_tied_head, **common)


def make_standard(model: nn.Module, config: SlicingConfig, accept_deviation: bool = False,
                  sample: torch.Tensor | None = None) -> nn.Module:
    """The stock-architecture model of a uniformly sliced one; records the deviation in `config`."""
    stock, report = to_standard(model, accept_deviation, sample)
    config.standard = sliced_structure(stock) is None  # else stock layers, each MLP its own width
    config.deviations = report.deviations
    config.max_logit_deviation = report.max_logit_deviation
    config.parameters_sliced = count_parameters(stock)
    return stock


@torch.no_grad()
def generate(model: nn.Module, tokenizer, prompt: str, max_new_tokens: int = 40, chat: bool = False,
             sample: bool = False, seed: int = 0) -> str:
    """Continue `prompt` with the KV cache (greedy unless `sample`); returns only the new text."""
    if chat and getattr(tokenizer, "chat_template", None):
        text = tokenizer.apply_chat_template([{"role": "user", "content": prompt}], tokenize=False,
                                             add_generation_prompt=True)
    else:
        text = prompt
    inputs = tokenizer(text, return_tensors="pt").to(next(model.parameters()).device)
    torch.manual_seed(seed)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    output = model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=sample, pad_token_id=pad)
    return tokenizer.decode(output[0, inputs["input_ids"].shape[1]:], skip_special_tokens=True)
