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
from slicegpt.core.weights import attention_heads, layer_mlp_neurons, mlp_neurons, resolve_all, weight_of
from slicegpt.modeling.runtime import build_skeleton, get_path, record_structure, set_parameter, sliced_structure


@dataclass
class StandardReport:
    """What the conversion changed and how far the stock model is from the sliced one."""

    deviations: list[str] = field(default_factory=list)
    max_logit_deviation: float | None = None  # on the sample given to `to_standard`


def _is_norm(module: nn.Module) -> bool:
    return isinstance(module, nn.LayerNorm) or type(module).__name__.endswith(("RMSNorm", "LayerNorm"))


def standard_obstacles(model: nn.Module, adapter: ModelAdapter, unrotated: bool = False) -> tuple[str, list[str]]:
    """(blocker, deviations) for writing `model`'s family as a stock model with a sliced width.

    A blocker means the stock class cannot hold the shapes at all. A deviation means it
    can, but computes something slightly different from the sliced model. `unrotated`: the
    stream kept its width and basis (only MLP neurons pruned), so there is no deviation.
    """
    if adapter.standard_blocker:
        return adapter.standard_blocker, []
    if unrotated:
        return "", []
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


def check_standard(model: nn.Module, adapter=None, accept_deviation: bool = False, unrotated: bool = False
                   ) -> list[str]:
    """Refuse early (before slicing) what `to_standard` would refuse; return the deviations."""
    blocker, deviations = standard_obstacles(model, adapter or get_adapter(model.config), unrotated)
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


def stock_tensors(tensors: dict[str, torch.Tensor], adapter: ModelAdapter, hidden: int, dim: int, tied: bool,
                  bias_norms: set[str]) -> dict[str, torch.Tensor]:
    """The stock model's tensors for (part of) a uniformly sliced model's state dict.

    Works on the whole state dict or on one part of it (the embeddings, one layer, the final
    norm and head), so a streamed run converts each part as it is written:

    - a branch-output norm's rotation is folded: `out_rotation(post_norm(y))` becomes
      `post_norm'(y Q)` at width d': the writer's rows are rotated and sliced, the norm's RMS is
      then taken over d' instead of d (equal when y lies in the kept subspace), and its gain
      becomes the least-squares diagonal of Q^T diag(gain) Q, times sqrt(d/d');
    - Gemma multiplies embeddings by sqrt(config hidden size): they keep sqrt(d) although the
      config says d' (and a tied head's final norm shrinks to match);
    - stock LayerNorms get their bias back, zero (the kept coordinates sum to zero);
    - norm gains come back out of the linears that read them (`equalize_readers`).
    """
    out = dict(tensors)
    equalize_readers(out, adapter)
    for branch in adapter.branches:
        if not branch.post_norm:
            continue
        suffix = f".{branch.out_rotation}"
        for key in [k for k in out if k.endswith(suffix)]:
            prefix = key[: -len(suffix)]
            q = out.pop(key).to(torch.float64)
            for path in branch.outputs:
                w = out[f"{prefix}.{path}.weight"]
                out[f"{prefix}.{path}.weight"] = (q.T @ w.to(torch.float64)).to(w.dtype)
                bias = out.get(f"{prefix}.{path}.bias")
                if bias is not None:
                    out[f"{prefix}.{path}.bias"] = (bias.to(torch.float64) @ q).to(bias.dtype)
            norm = f"{prefix}.{branch.post_norm}.weight"
            gain = out[norm].to(torch.float64) + adapter.norm_offset
            fitted = (q * q * gain[:, None]).sum(dim=0) * math.sqrt(hidden / dim)
            out[norm] = (fitted - adapter.norm_offset).to(out[norm].dtype)
    if adapter.scales_embeddings and dim != hidden:  # (an unsliced stream: factor 1, nothing to do)
        factor = math.sqrt(hidden / dim)
        embedding = f"{adapter.embeddings[0]}.weight"
        if embedding in out:
            out[embedding] = (out[embedding].to(torch.float64) * factor).to(out[embedding].dtype)
        final = f"{adapter.final_norm}.weight"
        if tied and final in out:
            gain = (out[final].to(torch.float64) + adapter.norm_offset) / factor
            out[final] = (gain - adapter.norm_offset).to(out[final].dtype)
    for name in bias_norms:  # LayerNorm on a stream whose kept coordinates sum to zero: no bias
        weight = out.get(f"{name}.weight")
        if weight is not None and f"{name}.bias" not in out:
            out[f"{name}.bias"] = torch.zeros_like(weight)
    return out


def equalize_readers(tensors: dict[str, torch.Tensor], adapter: ModelAdapter) -> None:
    """Give each folded layer norm a gain that leaves its readers' input columns at one scale (in place).

    A rotated stream folds every norm gain into the linears that read the norm, so a column of
    q/k/v or gate/up carries its coordinate's gain: Gemma's gains span 0 to ~50 within a layer,
    and a quantizer's 32-wide block of such a row is ruined by its largest entry. RMSNorm(x) g W^T/g
    is RMSNorm(x) W^T for any positive diagonal g (so is a stock LayerNorm's, whose bias is
    zero on the sliced stream), so each norm takes g = the RMS of its
    readers' columns and the columns are divided by it: the same model, exactly, whose
    readers quantize like a dense model's. Readers that are not plain matrices
    (fused experts) leave their norm as it is, and so does a norm that kept its own gain (an
    unrotated stream is not folded): the dense model's own split of each coordinate's scale
    between the norm's output and the readers is better still where llama.cpp quantizes the
    inputs of a matmul too (Gemma 3 270M at 0.9x, q8_0: 96.19 with RMS gains, 73.09 with its own;
    f16 72.76).
    """
    for norm in adapter.norm_names():
        paths = [path for b in adapter.branches if b.norm == norm for path in b.inputs]
        if any(ch in path for path in paths for ch in "?*"):
            continue
        suffix = f".{norm}.weight"
        for key in [k for k in tensors if k.endswith(suffix)]:
            if not bool(torch.all(tensors[key] == tensors[key].reshape(-1)[0])):
                continue  # not folded (a folded gain is one number, 1 or the sliced width's factor): its own gain
            prefix = key[: -len(suffix)]
            names = [f"{prefix}.{path}.weight" for path in paths]
            size = tensors[key].shape[-1]
            if not all(n in tensors and tensors[n].dim() == 2 and tensors[n].shape[1] == size for n in names):
                continue
            columns = torch.cat([tensors[n].to(torch.float64) for n in names])
            scale = columns.pow(2).mean(dim=0).sqrt()
            scale = torch.where(scale > 0, scale, torch.ones_like(scale))
            for n in names:
                tensors[n] = (tensors[n].to(torch.float64) / scale).to(tensors[n].dtype)
            gain = (tensors[key].to(torch.float64) + adapter.norm_offset) * scale
            tensors[key] = (gain - adapter.norm_offset).to(tensors[key].dtype)


def layernorms_with_bias(model: nn.Module) -> set[str]:
    """The stock model's LayerNorms that have a bias (named as in the state dict)."""
    return {name for name, module in model.named_modules()
            if isinstance(module, nn.LayerNorm) and getattr(module, "bias", None) is not None}


def standard_config_from(config, adapter: ModelAdapter, dim: int, tied: bool, neurons: int | None = None,
                         heads: tuple[int, int] | None = None):
    """The family's config with hidden size d', the epsilon the resized norms use, the MLP width and
    the attention heads (key/value heads, query heads each; one count for every layer)."""
    config = copy.deepcopy(config)
    if neurons is not None:
        setattr(config, adapter.config_neurons, neurons)
    hidden = getattr(config, adapter.config_hidden[0])
    config.head_dim = head_dim(config)  # most families would derive it from the hidden size
    spec = next((b.heads for b in adapter.branches if b.heads), None)
    if heads is not None and spec is not None:
        setattr(config, spec.config_kv_heads, heads[0])
        setattr(config, spec.config_heads, heads[0] * heads[1])
    for attr in adapter.config_hidden:
        setattr(config, attr, dim)
    if adapter.config_eps is not None:
        setattr(config, adapter.config_eps, getattr(config, adapter.config_eps) * hidden / dim)
    for attr in ("slicegpt", "auto_map", "quantization_config"):
        if hasattr(config, attr):
            delattr(config, attr)
    config.tie_word_embeddings = tied
    if config.get_text_config() is not config:
        config.get_text_config().tie_word_embeddings = tied
    return config


def standard_config(model: nn.Module, adapter: ModelAdapter):
    """The family's config with hidden size d' and the epsilon the resized norms use (MLP width: the
    widest layer's, where layers differ)."""
    dim = get_path(model, adapter.embeddings[0]).weight.shape[1]
    return standard_config_from(model.config, adapter, dim, bool(getattr(model.config, "tie_word_embeddings", False)),
                                mlp_neurons(model, adapter, widest=True), attention_heads(model, adapter))


def stock_layers_structure(adapter: ModelAdapter) -> dict:
    """The slicegpt structure of a model whose layers are the family's own, each MLP its own width."""
    return {"stock": True, "layers": adapter.layers}


def _mlp_tensor(adapter: ModelAdapter, name: str) -> bool:
    """A state-dict entry of an MLP's neuron readers or writer (whose shapes vary by layer)."""
    branch = next((b for b in adapter.branches if b.neurons), None)
    paths = (*branch.neurons, *branch.outputs) if branch else ()
    return any(f".{path}." in name for path in paths)



@torch.no_grad()
def to_standard(model: nn.Module, accept_deviation: bool = False, sample: torch.Tensor | None = None
                ) -> tuple[nn.Module, StandardReport]:
    """The stock-architecture version of a model sliced with ``rotation="uniform"``.

    Refuses (SliceGPTError) when the stock class cannot hold it, or when it would compute
    something different and `accept_deviation` is False. `sample` ([b, L] token ids) is run
    through both models to measure the largest logit difference.
    """
    slicing = sliced_structure(model)
    if slicing is None:
        raise SliceGPTError("this model was not sliced by slicegpt")
    if slicing["structure"].get("rotation") != "uniform":
        raise SliceGPTError("only a model sliced with --rotation uniform can become a standard model: per-layer "
                            "rotation puts a matrix on every skip connection, which no stock architecture has")
    adapter = get_adapter(model.config)
    hidden = getattr(model.config, adapter.config_hidden[0])
    dim = get_path(model, adapter.embeddings[0]).weight.shape[1]
    rotated = any(getattr(layer, b.out_rotation, None) is not None for layer in get_path(model, adapter.layers)
                  for b in adapter.branches if b.post_norm)
    deviations = check_standard(model, adapter, accept_deviation, unrotated=dim == hidden and not rotated)

    device = next(model.parameters()).device
    reference = model(sample.to(device)).logits if sample is not None else None
    tied = model.get_output_embeddings().weight is model.get_input_embeddings().weight
    config = standard_config(model, adapter)
    dtype = next(model.parameters()).dtype
    stock = build_skeleton(config, dtype).to(device)
    state = stock_tensors({k: v for k, v in model.state_dict().items()}, adapter, hidden, dim, tied,
                          layernorms_with_bias(stock))
    expected = stock.state_dict()
    neurons = layer_mlp_neurons(model, adapter)
    per_layer = neurons is not None and len(set(neurons)) > 1
    resized = [k for k, v in state.items() if k in expected and v.shape != expected[k].shape
               and per_layer and _mlp_tensor(adapter, k)]
    for k in resized:  # each MLP its own width: the stock modules take the sliced shapes
        owner, _, leaf = k.rpartition(".")
        set_parameter(stock.get_submodule(owner), leaf, torch.empty_like(state[k]))
    expected = stock.state_dict()
    problems = [f"{k} {tuple(v.shape)} vs {tuple(expected[k].shape)}" for k, v in state.items()
                if k in expected and v.shape != expected[k].shape]
    unexpected = [k for k in state if k not in expected]
    missing = [k for k in expected if k not in state and not _tied_alias(stock, k)]
    if problems or unexpected or missing:
        detail = (problems + [f"unexpected {k}" for k in unexpected] + [f"missing {k}" for k in missing])[:3]
        raise SliceGPTError(f"the stock {type(stock).__name__} does not match the sliced weights: {', '.join(detail)}")
    stock.load_state_dict(state, strict=False)
    if getattr(config, "tie_word_embeddings", False):
        stock.tie_weights()
    stock.generation_config = model.generation_config
    if per_layer:
        record_structure(stock, stock_layers_structure(adapter), {})
    stock.eval()
    report = StandardReport(deviations=deviations)
    if reference is not None:
        report.max_logit_deviation = float((stock(sample.to(device)).logits - reference).abs().max())
    return stock, report


def _tied_alias(model: nn.Module, name: str) -> bool:
    """A head weight that is the embedding table (not stored separately)."""
    if not name.endswith("weight"):
        return False
    owner = model.get_submodule(name.rpartition(".")[0])
    embeddings = model.get_input_embeddings()
    return owner is model.get_output_embeddings() and owner.weight is embeddings.weight
