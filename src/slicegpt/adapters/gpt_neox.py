"""GPT-NeoX (Pythia): fused query_key_value; attention and MLP in parallel by default.

With `use_parallel_residual` the two branches read the same stream through their own
LayerNorms and share one skip connection; without it they are sequential, as in Llama.
"""

from dataclasses import replace

from slicegpt.adapters.base import Branch, ModelAdapter

ATTENTION = Branch(name="attn", kind="attention", norm="input_layernorm", module="attention",
                   inputs=("attention.query_key_value",), outputs=("attention.dense",))
MLP = Branch(name="mlp", kind="mlp", norm="post_attention_layernorm", module="mlp",
             inputs=("mlp.dense_h_to_4h",), outputs=("mlp.dense_4h_to_h",))


def _configure(adapter: ModelAdapter, config) -> ModelAdapter:
    return replace(adapter, branches=(ATTENTION, replace(MLP, parallel=bool(config.use_parallel_residual))))


ADAPTER = ModelAdapter(
    family="gpt_neox",
    model_types=("gpt_neox",),
    layers="gpt_neox.layers",
    embeddings=("gpt_neox.embed_in",),
    final_norm="gpt_neox.final_layer_norm",
    head="lm_head",
    branches=(ATTENTION, MLP),
    norm_kind="layernorm",
    norm_eps_attr="eps",
    config_eps="layer_norm_eps",
    standard_blocker="GPT-NeoX's attention width is hidden_size, so a stock GPT-NeoX cannot have a sliced hidden size",
    configure=_configure,
)
