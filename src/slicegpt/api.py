"""The public, one-call API: slice a model, measure it, generate with it."""

from __future__ import annotations

import os
from typing import NamedTuple

import torch
from torch import nn

from slicegpt.adapters import get_adapter
from slicegpt.adapters.base import branch_groups
from slicegpt.modeling.runtime import get_path, sliced_structure
from slicegpt.config import SlicingConfig
from slicegpt.data import DEFAULT_DATA, Windows, bos_token, calibration_windows, load_text, tokenize
from slicegpt.errors import SliceGPTError
from slicegpt.evaluation.perplexity import count_parameters
from slicegpt.formats.loading import load_model
from slicegpt.core.bases import sliced_dim
from slicegpt.core.compensation import DENSE_SHARE, RIDGE, check_dense_share, dense_first_batches, summarize
from slicegpt.core.distributed import Ranks
from slicegpt.core.engine import COMPENSATIONS, per_layer_ties, uniform_ties
from slicegpt.core.widths import WIDTHS, plan_widths

METHODS = ("default", "paper")
DEFAULT_WIDTHS = "equal"  # adaptive widths helped SmolLM2 (50.0 -> 49.2) but hurt Gemma 3 (83.5 -> 96.4): README "Quality"
DEFAULT_MLP_WIDTH = "auto"  # SmolLM2 at the paper's 25% size: 41.97 against 50.04 slicing the stream (README)
DEFAULT_COMPENSATION = "writers"  # refitting the readers too measured no better (README "Quality")
from slicegpt.core.engine import POOLINGS, ROTATIONS, slice_layers, slice_uniform
from slicegpt.core.onload import ResidentModel
from slicegpt.formats.standard import check_standard, to_standard


def calibration_data(tokenizer, source: str | os.PathLike = DEFAULT_DATA, samples: int = 32,
                     seqlen: int = 1024, seed: int = 0, text_field: str = "text") -> Windows:
    """Random, seeded, non-overlapping token windows from the calibration part of `source`."""
    text = load_text(source, "calibration", text_field=text_field)
    return calibration_windows(tokenize(tokenizer, text), samples, seqlen, seed, bos=bos_token(tokenizer))


def slice_model(model: nn.Module | str | os.PathLike, tokenizer=None,
                calibration: Windows | torch.Tensor | str | os.PathLike = DEFAULT_DATA,
                sparsity: float = 0.25, *, samples: int = 32, seqlen: int = 1024, seed: int = 0,
                batch_size: int = 4, round_to: int = 8, slice_head: bool = False, keep_tied_head: bool = True,
                rotation: str = "per-layer", standard: bool = True, accept_deviation: bool = False,
                fit_tied_head: bool = False, pooling: str = "unit-trace", method: str = "default",
                compensate: str | bool | None = None, widths: str | None = None, parameters: float | None = None,
                ridge: float = RIDGE, mlp_width: float | str | None = None, dense_share: float = DENSE_SHARE,
                progress: bool = True) -> tuple[nn.Module, SlicingConfig]:
    """Slice `model` with SliceGPT and return the sliced model with the record of what was done.

    `model` may be a loaded causal LM (sliced in place), a hub id, a directory or a .gguf
    file. `calibration` is a data source (name or path; needs `tokenizer`), a [n, seqlen]
    tensor of token ids, or prepared `Windows`.

    `rotation="per-layer"` (the paper's) gives each block boundary its own basis and puts a
    small matrix on every skip connection; a head tied to the embeddings stays tied unless
    `keep_tied_head` is False or the head is sliced (see `core.engine.slice_layers`).
    `rotation="uniform"` uses one basis for the whole stream, so with `standard` the result
    is returned as a new stock model of the family (hidden size d') that plain transformers
    loads; families whose stock class would only approximate it are refused before any work
    unless `accept_deviation`. `fit_tied_head` keeps a tied head tied in uniform mode at the
    cost of a fitted final-norm gain (measure its perplexity). `pooling` weighs the block
    boundaries of the uniform basis: "unit-trace" (each boundary equally) or "tokens" (by raw
    energy); which is better depends on the model (README).

    `method="default"` turns on every lever measured to help (README, "Quality");
    `method="paper"` is the paper's algorithm. Each lever can be set alone: `compensate`
    ("writers": refit each step's output weights against the dense model, `core.compensation`,
    with `ridge`; "all": its input weights too; "off"; the dense model runs on `dense_share` of
    the calibration batches, 1 = all of them: the fits' targets on the others are the dense
    weights' output on the sliced input),
    `widths` ("adaptive": each boundary its own width within the same parameter count;
    "equal"), `parameters` (a fraction of the dense parameter count, every added matrix
    counted, instead of `sparsity`), and `mlp_width` (prune MLP neurons in compensation's
    fit: a fraction to keep, or "auto", the default's: `sparsity` of the decoder layers'
    weights, or `parameters`, removed by pruning neurons first, `core.widths.plan_widths`). Where the stream
    keeps its full width, nothing is rotated and the result is a stock model.

    Called on every rank of an initialised torch.distributed process group, each rank
    calibrates on its share of the windows and all return the same sliced model.
    """
    compensate, widths, mlp = resolve_levers(method, compensate, widths, rotation, mlp_width)
    check_dense_share(dense_share)
    source_model = ""
    if isinstance(model, (str, os.PathLike)):
        source_model = str(model)
        loaded = load_model(model)
        model, tokenizer = loaded.model, tokenizer or loaded.tokenizer
    if sliced_structure(model) is not None:
        raise SliceGPTError("this model is already sliced; slice the dense model instead")
    adapter = get_adapter(model.config)
    hidden = get_path(model, adapter.embeddings[0]).weight.shape[1]  # the residual width
    uniform = rotation == "uniform"
    slice_head = uniform or slice_head or adapter.slice_head_required
    sliced_dim(hidden, sparsity, round_to)  # validate before any slow work
    if uniform and standard:
        check_standard(model, adapter, accept_deviation)

    calibration_info: dict = {}
    if isinstance(calibration, Windows):
        windows = calibration
    elif isinstance(calibration, torch.Tensor):
        if calibration.dim() != 2:
            raise SliceGPTError("calibration token ids must be a [samples, seqlen] tensor")
        windows = Windows(calibration, torch.ones_like(calibration))
    else:
        if tokenizer is None:
            raise SliceGPTError("a tokenizer is needed to calibrate on text")
        windows = calibration_data(tokenizer, calibration, samples, seqlen, seed)
        calibration_info = {"source": str(calibration), "seed": seed}
    calibration_info.update(samples=len(windows.input_ids), seqlen=windows.input_ids.shape[1],
                            tokens=windows.tokens)

    dense = count_parameters(model)
    ranks = Ranks.current()
    ranks.agree({"sparsity": sparsity, "rotation": rotation, "method": method, "compensate": compensate,
                 "widths": widths, "parameters": parameters, "ridge": ridge, "round_to": round_to, "mlp": mlp,
                 "dense_share": dense_share,
                 "batch_size": batch_size, "slice_head": slice_head, "keep_tied_head": keep_tied_head,
                 "fit_tied_head": fit_tied_head, "pooling": pooling, "calibration": calibration_info,
                 "windows": [len(windows), windows.input_ids.shape[1], windows.tokens]})
    if len(windows) < ranks.world_size:
        raise SliceGPTError(f"{len(windows)} calibration windows cannot be shared by {ranks.world_size} processes")
    batches, dense_batches = dense_first_batches(windows, batch_size, ranks,
                                                 dense_share if compensate != "off" else 1.0)
    progress = progress and ranks.writer
    check_rotation(rotation, pooling, fit_tied_head)
    view = ResidentModel(model)
    tied = (uniform_ties(view, adapter, fit_tied_head) if uniform
            else per_layer_ties(view, adapter, keep_tied_head, slice_head))
    plan, widths, neurons = plan_widths(view, adapter, batches, rotation=rotation, rule=widths, sparsity=sparsity,
                                        parameters=parameters, dense_parameters=dense, round_to=round_to, tied=tied,
                                        slice_head=slice_head, progress=progress, ranks=ranks, mlp=mlp)
    identity, rotation, slice_head, fit_tied_head = planned_layout(plan, hidden, neurons, rotation, slice_head,
                                                                   fit_tied_head)
    if identity:  # a stock model whatever was asked
        uniform, standard = True, True
    outcome = slice_resident(model, adapter, batches, plan[0], rotation=rotation,
                             slice_head=slice_head, keep_tied_head=keep_tied_head, fit_tied_head=fit_tied_head,
                             pooling=pooling, progress=progress, compensate=compensate, ridge=ridge, widths=plan,
                             ranks=ranks, neurons=neurons, identity=identity, dense_batches=dense_batches)
    config = SlicingConfig(
        sparsity=sparsity if parameters is None and neurons is None else effective_sparsity(plan, hidden),
        hidden_size=hidden,
        sliced_hidden_size=round(sum(plan[:-1]) / (len(plan) - 1)) if not uniform else plan[0],
        method=method, compensate=compensate, ridge=ridge if compensate != "off" else None,
        dense_share=dense_share if compensate != "off" else None, widths_rule=widths,
        parameters_budget=parameters, widths=plan, compensation=summarize(outcome.fits),
        mlp_width=mlp, mlp_neurons=neurons, mlp_neurons_dense=dense_neurons(model, adapter) if neurons else None,
        model_type=model.config.model_type, family=adapter.family, rotation=rotation, round_to=round_to,
        slice_head=slice_head, tied_head=outcome.tied_head,
        fit_tied_head=fit_tied_head, pooling=pooling if uniform else "", calibration=calibration_info, source_model=source_model,
        parameters_dense=dense, parameters_sliced=count_parameters(model), spectra=outcome.spectra,
        distributed={"world_size": ranks.world_size,
                     "tokens_per_rank": ranks.gather(sum(int(mask.sum()) for _, mask in batches))})
    if uniform and standard:
        # the deviation check's sample: 128 tokens are enough to show a wrong conversion, and a
        # whole window's logits are a vocabulary-wide tensor per token (1 GB for Gemma 3's 262k)
        model = make_standard(model, config, accept_deviation, windows.input_ids[:1, :128])
    return model, config


def resolve_levers(method: str, compensate: str | bool | None, widths: str | None,
                   rotation: str = "per-layer", mlp_width: float | str | None = None
                   ) -> tuple[str, str, float | str | None]:
    """The levers a method turns on, each overridable: (compensate, widths rule, MLP width)."""
    if method not in METHODS:
        raise SliceGPTError(f"method must be one of {', '.join(METHODS)}, got {method!r}")
    paper = method == "paper"
    if widths is not None and widths not in WIDTHS:
        raise SliceGPTError(f"widths must be one of {', '.join(WIDTHS)}, got {widths!r}")
    if rotation == "uniform":  # one basis, one width
        if widths == "adaptive":
            raise SliceGPTError("adaptive widths apply to per-layer rotation (uniform has one basis, one width)")
        widths = "equal"
    if compensate is None or isinstance(compensate, bool):
        on = not paper if compensate is None else compensate
        compensate = DEFAULT_COMPENSATION if on else "off"
    if compensate not in COMPENSATIONS:
        raise SliceGPTError(f"compensate must be one of {', '.join(COMPENSATIONS)}, got {compensate!r}")
    mlp = parse_mlp_width(mlp_width) if mlp_width is not None else (None if paper else DEFAULT_MLP_WIDTH)
    if mlp is not None and compensate == "off":
        if mlp_width is not None:
            raise SliceGPTError("pruning MLP neurons refits the down projection: it needs compensation "
                                "(--compensate writers or all)")
        mlp = None
    return compensate, (widths or ("equal" if paper else DEFAULT_WIDTHS)), mlp


def parse_mlp_width(value: float | str) -> float | str | None:
    """ "auto", or the fraction of MLP neurons to keep (1: none pruned, returned as None)."""
    if value == "auto":
        return value
    try:
        fraction = float(value)
    except (TypeError, ValueError):
        raise SliceGPTError(f"--mlp-width is 'auto' or the fraction of MLP neurons to keep, got {value!r}") from None
    if not 0.0 < fraction <= 1.0:
        raise SliceGPTError(f"--mlp-width is the fraction of MLP neurons to keep, in (0, 1]; got {value}")
    return None if fraction == 1.0 else fraction


def unrotated(widths: list[int], hidden: int, neurons: int | None) -> bool:
    """Whether only MLP neurons are pruned: the stream keeps its width, so nothing is rotated."""
    return neurons is not None and all(w == hidden for w in widths)


class Layout(NamedTuple):
    """How the planned model is built: `identity` (only neurons pruned) overrides the asked rotation."""

    identity: bool
    rotation: str
    slice_head: bool
    fit_tied_head: bool


def planned_layout(widths: list[int], hidden: int, neurons: int | None, rotation: str, slice_head: bool,
                   fit_tied_head: bool) -> Layout:
    """The rotation settings once the widths are planned. With only neurons pruned there is one
    (identity) basis: uniform, a stock model, and the head reads the stock final norm, so there is
    no tied head's gain to fit."""
    if unrotated(widths, hidden, neurons):
        return Layout(True, "uniform", True, False)
    return Layout(False, rotation, slice_head, fit_tied_head)


def dense_neurons(model: nn.Module, adapter) -> int | None:
    """Neurons per MLP of the dense model (what `--mlp-width` is a fraction of), from its config."""
    return getattr(model.config, adapter.config_neurons, None)


def effective_sparsity(widths: list[int], hidden: int) -> float:
    """1 - mean width / d over the boundaries the layers read (what `--parameters` came to)."""
    return round(1.0 - sum(widths[:-1]) / ((len(widths) - 1) * hidden), 4)


def check_rotation(rotation: str, pooling: str, fit_tied_head: bool) -> None:
    """Refuse settings that do not go together, before any slow work."""
    if rotation not in ROTATIONS:
        raise SliceGPTError(f"rotation must be 'per-layer' or 'uniform', got {rotation!r}")
    if rotation == "uniform" and pooling not in POOLINGS:
        raise SliceGPTError(f"pooling must be one of {', '.join(POOLINGS)}, got {pooling!r}")
    if fit_tied_head and rotation != "uniform":
        raise SliceGPTError("fitting a tied head's gain applies to --rotation uniform only")


def slice_resident(model: nn.Module, adapter, batches, dim: int, *, rotation: str = "per-layer",
                   slice_head: bool = False, keep_tied_head: bool = True, fit_tied_head: bool = False,
                   pooling: str = "unit-trace", progress: bool = True, compensate: str = "off",
                   ridge: float = RIDGE, widths: list[int] | None = None, ranks: Ranks | None = None,
                   neurons: int | None = None, identity: bool = False, dense_batches: int | None = None):
    """Slice a model held in memory, in place, with one width `dim` at every boundary (or `widths`).

    `batches`: this rank's share of the calibration windows when `ranks` is distributed; the
    dense model runs on the first `dense_batches` of them (None: all; `dense_first_batches`)."""
    check_rotation(rotation, pooling, fit_tied_head)
    view = ResidentModel(model)
    if rotation == "uniform":
        return slice_uniform(view, adapter, batches, widths[0] if widths else dim, fit_tied_head=fit_tied_head,
                             unit_trace=pooling == "unit-trace", progress=progress, compensate=compensate,
                             ridge=ridge, ranks=ranks, neurons=neurons, identity=identity,
                             dense_batches=dense_batches)
    steps = len(get_path(model, adapter.layers)) * len(branch_groups(adapter.branches))
    return slice_layers(view, adapter, batches, widths or [dim] * (steps + 1), slice_head=slice_head,
                        keep_tied_head=keep_tied_head, progress=progress, compensate=compensate, ridge=ridge,
                        ranks=ranks, neurons=neurons, dense_batches=dense_batches)


def make_standard(model: nn.Module, config: SlicingConfig, accept_deviation: bool = False,
                  sample: torch.Tensor | None = None) -> nn.Module:
    """The stock-architecture model of a uniformly sliced one; records the deviation in `config`."""
    stock, report = to_standard(model, accept_deviation, sample)
    config.standard = True
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
