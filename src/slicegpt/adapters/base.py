"""Architecture descriptions: *where* the norms and linears of a decoder family live.

An adapter holds no algorithm. `invariance` and `slicing` read these descriptions, so
adding a family means writing one small description, not new math. All names are
attribute paths in the Hugging Face module tree (`q_proj`, `mlp.down_proj`, ...). A path
may name a module with a `weight` (Linear, transformers' transposed Conv1D, a router) or a
raw stacked parameter such as fused MoE experts (``[experts, out, in]``). A trailing ``?``
marks a path that only some layers have (dense layers between MoE layers).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Literal

NormKind = Literal["rmsnorm", "layernorm"]
BranchKind = Literal["attention", "mlp"]


@dataclass(frozen=True)
class Heads:
    """Where an attention branch's heads live, for pruning whole heads (`--heads`).

    Query head i reads key/value head i // (query heads per group), as transformers' `repeat_kv`
    does; the rows of `query` (and of `key`, `value`) are head_dim blocks, one per head, and the
    columns of the branch's single output linear are the query heads' blocks in the same order.
    The stock config holds one count of each for every layer."""

    query: str
    key: str
    value: str
    head_dim: str  # plain attribute holding the per-head width
    groups: str  # plain attribute: query heads per key/value head, rewritten when heads are pruned
    config_heads: str = "num_attention_heads"
    config_kv_heads: str = "num_key_value_heads"


@dataclass(frozen=True)
class Branch:
    """One residual branch of a decoder layer: ``x <- x + post_norm(module(norm(x)))``.

    `inputs` read the (normalised) residual stream, so their columns are rotated;
    `outputs` write into it, so their rows are rotated. `module` is the branch's module, or
    a sequence of them applied in turn (OPT keeps fc1, activation and fc2 on the layer).
    A `parallel` branch reads the same stream as the branch before it and the two outputs
    are added together (Phi-2, GPT-NeoX): they share one skip connection.
    `width_attrs` are plain attributes that store the residual width (a router's hidden_dim).
    `neurons` are the inputs whose output rows are an MLP's neurons (gate and up): with them
    the neurons can be pruned (`--neurons`), taking those rows and the matching columns of
    the single output linear. `heads` (an attention branch) describes its heads for `--heads`.
    """

    name: str
    kind: BranchKind
    norm: str
    module: str | tuple[str, ...]
    inputs: tuple[str, ...]
    outputs: tuple[str, ...]
    post_norm: str | None = None
    parallel: bool = False
    width_attrs: tuple[str, ...] = ()
    neurons: tuple[str, ...] = ()
    heads: Heads | None = None

    @property
    def shortcut(self) -> str:
        """Attribute name of the skip-connection matrix this branch gets when sliced."""
        return f"{self.name}_shortcut"

    @property
    def out_rotation(self) -> str:
        """Attribute of the matrix that rotates and slices a post-normed branch output."""
        return f"{self.name}_out_rotation"


def branch_groups(branches: tuple[Branch, ...]) -> list[tuple[Branch, ...]]:
    """Branches grouped by the residual stream they read: parallel branches join the previous one."""
    groups: list[list[Branch]] = []
    for branch in branches:
        if branch.parallel and groups:
            groups[-1].append(branch)
        else:
            groups.append([branch])
    return [tuple(g) for g in groups]


@dataclass(frozen=True)
class ModelAdapter:
    """Description of one decoder family, chosen by `config.model_type`."""

    family: str
    model_types: tuple[str, ...]
    layers: str
    embeddings: tuple[str, ...]  # tables whose columns live in the residual stream
    final_norm: str
    head: str  # the linear reading the final norm (lm_head, or OPT's project_out)
    branches: tuple[Branch, ...]
    entry_writers: tuple[str, ...] = ()  # linears writing the stream before layer 0 (OPT project_in)
    norm_kind: NormKind = "rmsnorm"
    # The head input must be sliced too: the family's forward reshapes the final stream to
    # the embedding width (GPT-2), or its kernels keep the width (MoE experts).
    slice_head_required: bool = False
    # Gemma-style norms compute x * (offset + w); the fused "unit" gain is then w = 1 - offset.
    norm_offset: float = 0.0
    # Attribute holding a norm's epsilon (it is a plain float, not part of the state dict).
    norm_eps_attr: str = "variance_epsilon"
    # Config attributes that hold the residual width, and the norms' epsilon (None: not in the
    # config), rewritten when a uniformly sliced model becomes a stock model of the family.
    config_hidden: tuple[str, ...] = ("hidden_size",)
    config_eps: str | None = "rms_norm_eps"
    # Config attribute holding the MLP width, rewritten when pruned neurons make a stock model.
    config_neurons: str = "intermediate_size"
    # The family multiplies embeddings by sqrt(config hidden size) (Gemma).
    scales_embeddings: bool = False
    # Why the family's stock class cannot hold a sliced hidden size at all ("" = it can).
    standard_blocker: str = ""
    # Variants decided by the config (parallel residual, projections); may refuse the config.
    configure: Callable[[ModelAdapter, object], ModelAdapter] | None = field(default=None, compare=False)
    notes: str = ""

    def for_config(self, config) -> ModelAdapter:
        """This description specialised to one model's config."""
        return self.configure(self, config) if self.configure else self

    def norm_names(self) -> list[str]:
        """The distinct per-layer norms that read the residual stream, in order."""
        return list(dict.fromkeys(b.norm for b in self.branches))

    def structure(self, tied_head: bool = False, rotation: str = "per-layer") -> dict:
        """JSON-able layer structure, saved with a sliced model so it loads without adapters.

        `tied_head`: the embeddings and head stay tied and unsliced; the first layer projects
        the stream with an entry matrix, and the final norm stays the stock module.
        `rotation="uniform"`: one basis everywhere, so the skip connections carry no matrix.
        """
        per_layer = rotation == "per-layer"
        structure = {
            "layers": self.layers,
            "branches": [
                {"name": b.name, "kind": b.kind, "norm": b.norm,
                 "module": b.module if isinstance(b.module, str) else list(b.module),
                 "post_norm": b.post_norm, "parallel": b.parallel,
                 "shortcut": b.shortcut if per_layer else None,
                 "out_rotation": b.out_rotation if b.post_norm else None}
                for b in self.branches
            ],
            "entry_rotation": tied_head,
            "rotation": rotation,
        }
        if self.norm_kind == "layernorm":  # these become RMSNorm modules (see invariance)
            structure["rms_norms"] = {"layer": self.norm_names(), "model": [] if tied_head else [self.final_norm]}
        return structure
