"""GPT-2: transformers' `Conv1D` linears (weights stored [in, out]), fused `c_attn`,
learned positions, tied head. The weight helpers transpose Conv1D weights, so the
description only names them. GPT2Model reshapes its output to the embedding width, so
the head is always sliced. Cross-attention variants are refused.
"""

from slicegpt.adapters.base import Branch, ModelAdapter
from slicegpt.errors import SliceGPTError


def _configure(adapter: ModelAdapter, config) -> ModelAdapter:
    if getattr(config, "add_cross_attention", False):
        raise SliceGPTError("GPT-2 models with cross-attention are not supported (decoder-only models only)")
    return adapter


ADAPTER = ModelAdapter(
    family="gpt2",
    model_types=("gpt2",),
    layers="transformer.h",
    embeddings=("transformer.wte", "transformer.wpe"),
    final_norm="transformer.ln_f",
    head="lm_head",
    branches=(
        Branch(name="attn", kind="attention", norm="ln_1", module="attn",
               inputs=("attn.c_attn",), outputs=("attn.c_proj",)),
        Branch(name="mlp", kind="mlp", norm="ln_2", module="mlp",
               inputs=("mlp.c_fc",), outputs=("mlp.c_proj",)),
    ),
    norm_kind="layernorm",
    slice_head_required=True,
    norm_eps_attr="eps",
    config_hidden=("n_embd",),
    config_eps="layer_norm_epsilon",
    standard_blocker="GPT-2's attention width is n_embd, so a stock GPT-2 cannot have a sliced hidden size",
    configure=_configure,
)
