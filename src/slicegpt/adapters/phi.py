"""Phi-2: attention and MLP in parallel, both reading one LayerNorm; biases everywhere.

The head has a bias too, so the final norm's bias folds into it exactly. Partial rotary
embeddings and the optional per-head q/k LayerNorms act inside the attention.
"""

from slicegpt.adapters.base import Branch, ModelAdapter

ADAPTER = ModelAdapter(
    family="phi",
    model_types=("phi",),
    layers="model.layers",
    embeddings=("model.embed_tokens",),
    final_norm="model.final_layernorm",
    head="lm_head",
    branches=(
        Branch(name="attn", kind="attention", norm="input_layernorm", module="self_attn",
               inputs=("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"),
               outputs=("self_attn.dense",)),
        Branch(name="mlp", kind="mlp", norm="input_layernorm", module="mlp",
               inputs=("mlp.fc1",), outputs=("mlp.fc2",), parallel=True),
    ),
    norm_kind="layernorm",
    norm_eps_attr="eps",
    config_eps="layer_norm_eps",
)
