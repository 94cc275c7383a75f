"""Gemma (v1): Llama layout, RMSNorm computing x * (1 + w), embeddings scaled by sqrt(d).

The embedding scale is a constant factor, so it commutes with the rotation; the sliced
model keeps the original sqrt(d) because its config keeps the original hidden size.
"""

from slicegpt.adapters.base import ModelAdapter
from slicegpt.adapters.llama import ATTENTION, MLP

ADAPTER = ModelAdapter(
    family="gemma",
    model_types=("gemma",),
    layers="model.layers",
    embeddings=("model.embed_tokens",),
    final_norm="model.norm",
    head="lm_head",
    branches=(ATTENTION, MLP),
    norm_offset=1.0,
    norm_eps_attr="eps",
)
