"""A uniformly sliced model as a *stock* model of its family with hidden size d'.

With one rotation for the whole stream there are no skip matrices, so the sliced model is
the family's own architecture, smaller: plain `AutoModelForCausalLM.from_pretrained` loads
it, and so can llama.cpp (see `gguf_export`). What changes besides the weights:

- the config's hidden size becomes d' (the head dimension is written out, since most
  families would otherwise derive it from the hidden size);
- the norms' epsilon becomes eps * d/d' (RMS over d' coordinates is sqrt(d/d') times RMS
  over d; the gain sqrt(d/d') is already in the norm weights), so the config's one epsilon
  is rewritten;
- LayerNorm families get their stock LayerNorms back (zero bias): the uniform basis makes
  the d' kept coordinates of every signal sum to zero, so the mean they subtract is zero.

Where the stock class cannot say exactly what the sliced model computes, `standard_obstacles`
names why; `to_standard` then refuses unless the deviation is accepted, and measures it.
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass, field

import torch
from torch import nn

from slicegpt.adapters import ModelAdapter, get_adapter
from slicegpt.errors import SliceGPTError
from slicegpt.sliced_modeling import build_skeleton, get_path, set_parameter
from slicegpt.weights import resolve_all, rotate_output


@dataclass
class StandardReport:
    """What the conversion changed and how far the stock model is from the sliced one."""

    deviations: list[str] = field(default_factory=list)
    max_logit_deviation: float | None = None  # on the sample given to `to_standard`


def _is_norm(module: nn.Module) -> bool:
    return isinstance(module, nn.LayerNorm) or type(module).__name__.endswith(("RMSNorm", "LayerNorm"))


def standard_obstacles(model: nn.Module, adapter: ModelAdapter) -> tuple[str, list[str]]:
    """(blocker, deviations) for writing `model`'s family as a stock model with a sliced width.

    A blocker means the stock class cannot hold the shapes at all. A deviation means it
    can, but computes something slightly different from the sliced model.
    """
    if adapter.standard_blocker:
        return adapter.standard_blocker, []
    deviations = []
    post = [b.post_norm for b in adapter.branches if b.post_norm]
    if post:
        deviations.append(f"its branch-output norms ({', '.join(post)}) would take their RMS over d' "
                          "coordinates instead of all d")
    residual = set(adapter.norm_names()) | set(post)
    layer = get_path(model, adapter.layers)[0]
    shared = [name for name, module in layer.named_modules() if name and name not in residual and _is_norm(module)]
    if shared and adapter.config_eps:
        deviations.append(f"{', '.join(shared)} read the config's {adapter.config_eps}, which must grow by d/d' "
                          "for the residual norms")
    if adapter.config_eps is None:
        deviations.append("its norms' epsilon is fixed by the class, so it cannot grow by d/d'")
    return "", deviations


def check_standard(model: nn.Module, adapter=None, accept_deviation: bool = False) -> list[str]:
    """Refuse early (before slicing) what `to_standard` would refuse; return the deviations."""
    blocker, deviations = standard_obstacles(model, adapter or get_adapter(model.config))
    if blocker:
        raise SliceGPTError(f"no standard export for {model.config.model_type}: {blocker}; "
                            "use --rotation per-layer (slicegpt format)")
    if deviations and not accept_deviation:
        raise SliceGPTError(
            f"a stock {model.config.model_type} model cannot compute the sliced model exactly: "
            f"{'; '.join(deviations)}; pass --accept-deviation (accept_deviation=True) to write the "
            "approximation (its cost is reported), or use --rotation per-layer")
    return deviations


def head_dim(config) -> int:
    """Per-head width: explicit in the config, else derived from the (unsliced) hidden size."""
    return getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads


def _fold_post_norms(model: nn.Module, adapter: ModelAdapter) -> None:
    """Approximate `out_rotation(post_norm(y))` by `post_norm'(y Q)` at width d'.

    The writer's rows are rotated and sliced, the norm's RMS is then taken over d' instead
    of d (equal when y lies in the kept subspace), and its per-coordinate gain becomes the
    least-squares diagonal of Q^T diag(gain) Q, times sqrt(d/d').
    """
    for layer in get_path(model, adapter.layers):
        for branch in adapter.branches:
            rotation = getattr(layer, branch.out_rotation, None) if branch.post_norm else None
            if rotation is None:
                continue
            q = rotation.data.to(torch.float64)
            hidden, dim = q.shape
            for target in resolve_all(layer, branch.outputs):
                rotate_output(target, q)
            norm = get_path(layer, branch.post_norm)
            gain = norm.weight.data.to(torch.float64) + adapter.norm_offset
            fitted = (q * q * gain[:, None]).sum(dim=0) * math.sqrt(hidden / dim)
            set_parameter(norm, "weight", (fitted - adapter.norm_offset).to(norm.weight.dtype))
            delattr(layer, branch.out_rotation)


def standard_config(model: nn.Module, adapter: ModelAdapter):
    """The family's config with hidden size d' and the epsilon the resized norms use."""
    config = copy.deepcopy(model.config)
    hidden = getattr(config, adapter.config_hidden[0])
    dim = get_path(model, adapter.embeddings[0]).weight.shape[1]
    config.head_dim = head_dim(config)  # most families would derive it from the hidden size
    for attr in adapter.config_hidden:
        setattr(config, attr, dim)
    if adapter.config_eps is not None:
        setattr(config, adapter.config_eps, getattr(config, adapter.config_eps) * hidden / dim)
    for attr in ("slicegpt", "auto_map", "quantization_config"):
        if hasattr(config, attr):
            delattr(config, attr)
    return config


@torch.no_grad()
def to_standard(model: nn.Module, accept_deviation: bool = False, sample: torch.Tensor | None = None
                ) -> tuple[nn.Module, StandardReport]:
    """The stock-architecture version of a model sliced with ``rotation="uniform"``.

    Refuses (SliceGPTError) when the stock class cannot hold it, or when it would compute
    something different and `accept_deviation` is False. `sample` ([b, L] token ids) is run
    through both models to measure the largest logit difference.
    """
    slicing = getattr(model, "slicegpt_structure", None)
    if slicing is None:
        raise SliceGPTError("this model was not sliced by slicegpt")
    if slicing["structure"].get("rotation") != "uniform":
        raise SliceGPTError("only a model sliced with --rotation uniform can become a standard model: per-layer "
                            "rotation puts a matrix on every skip connection, which no stock architecture has")
    adapter = get_adapter(model.config)
    deviations = check_standard(model, adapter, accept_deviation)

    device = next(model.parameters()).device
    reference = model(sample.to(device)).logits if sample is not None else None
    changes_weights = adapter.scales_embeddings or any(b.post_norm for b in adapter.branches)
    working = copy.deepcopy(model) if changes_weights else model  # the sliced model stays intact
    _fold_post_norms(working, adapter)
    config = standard_config(working, adapter)
    if adapter.scales_embeddings:
        _rescale_embeddings(working, adapter, getattr(model.config, adapter.config_hidden[0]))
    dtype = next(working.parameters()).dtype
    stock = build_skeleton(config, dtype).to(device)
    state = {k: v for k, v in working.state_dict().items()}
    expected = stock.state_dict()
    problems = [f"{k} {tuple(v.shape)} vs {tuple(expected[k].shape)}" for k, v in state.items()
                if k in expected and v.shape != expected[k].shape]
    unexpected = [k for k in state if k not in expected]
    missing = [k for k in expected if k not in state]
    norm_biases = [k for k in missing if k.endswith(".bias") and _is_norm(stock.get_submodule(k.rpartition(".")[0]))]
    missing = [k for k in missing if k not in norm_biases and not _tied_alias(stock, k)]
    if problems or unexpected or missing:
        detail = (problems + [f"unexpected {k}" for k in unexpected] + [f"missing {k}" for k in missing])[:3]
        raise SliceGPTError(f"the stock {type(stock).__name__} does not match the sliced weights: {', '.join(detail)}")
    for k in norm_biases:  # LayerNorm on a stream whose kept coordinates sum to zero: no bias
        state[k] = torch.zeros_like(expected[k])
    stock.load_state_dict(state, strict=False)
    if getattr(config, "tie_word_embeddings", False):
        stock.tie_weights()
    stock.generation_config = model.generation_config
    stock.eval()
    report = StandardReport(deviations=deviations)
    if reference is not None:
        report.max_logit_deviation = float((stock(sample.to(device)).logits - reference).abs().max())
    return stock, report


def _rescale_embeddings(model: nn.Module, adapter: ModelAdapter, hidden: int) -> None:
    """Gemma multiplies embeddings by sqrt(hidden size): keep sqrt(d) although the config says d'.

    A tied head reads the same (now larger) table, so the final norm's gain shrinks to match.
    """
    embedding = get_path(model, adapter.embeddings[0])
    dim = embedding.weight.shape[1]
    factor = math.sqrt(hidden / dim)
    tied = model.get_output_embeddings().weight is embedding.weight
    embedding.weight.data = (embedding.weight.data.to(torch.float64) * factor).to(embedding.weight.dtype)
    if tied:
        norm = get_path(model, adapter.final_norm)
        gain = (norm.weight.data.to(torch.float64) + adapter.norm_offset) / factor
        norm.weight.data = (gain - adapter.norm_offset).to(norm.weight.dtype)


def _tied_alias(model: nn.Module, name: str) -> bool:
    """A head weight that is the embedding table (not stored separately)."""
    if not name.endswith("weight"):
        return False
    owner = model.get_submodule(name.rpartition(".")[0])
    embeddings = model.get_input_embeddings()
    return owner is model.get_output_embeddings() and owner.weight is embeddings.weight
