"""Llama-like decoders: pre-RMSNorm, sequential attention then gated MLP.

Mistral, Qwen2 (q/k/v biases) and Qwen3 (per-head q/k norms, which act inside the
attention and never touch the residual stream) share the same residual layout.
"""

from slicegpt.adapters.base import Branch, Heads, ModelAdapter

ATTENTION = Branch(
    name="attn",
    kind="attention",
    norm="input_layernorm",
    module="self_attn",
    inputs=("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"),
    outputs=("self_attn.o_proj",),
    heads=Heads(query="self_attn.q_proj", key="self_attn.k_proj", value="self_attn.v_proj",
                head_dim="self_attn.head_dim", groups="self_attn.num_key_value_groups"),
)
MLP = Branch(
    name="mlp",
    kind="mlp",
    norm="post_attention_layernorm",
    module="mlp",
    inputs=("mlp.gate_proj", "mlp.up_proj"),
    outputs=("mlp.down_proj",),
    neurons=("mlp.gate_proj", "mlp.up_proj"),
)

ADAPTER = ModelAdapter(
    family="llama",
    model_types=("llama", "mistral", "qwen2", "qwen3"),
    layers="model.layers",
    embeddings=("model.embed_tokens",),
    final_norm="model.norm",
    head="lm_head",
    branches=(ATTENTION, MLP),
)
