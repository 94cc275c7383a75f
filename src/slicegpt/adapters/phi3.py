"""Phi-3: Llama layout with fused projections.

`qkv_proj` and `gate_up_proj` read the residual as one matrix each, so rotating their
columns is the same operation as for separate q/k/v or gate/up linears. The residual
dropouts are identity at inference (and `resid_pdrop` is 0 in released configs).
"""

from dataclasses import replace

from slicegpt.adapters.base import Branch
from slicegpt.adapters.llama import ADAPTER as LLAMA

ADAPTER = replace(
    LLAMA,
    family="phi3",
    model_types=("phi3",),
    branches=(
        Branch(name="attn", kind="attention", norm="input_layernorm", module="self_attn",
               inputs=("self_attn.qkv_proj",), outputs=("self_attn.o_proj",)),
        Branch(name="mlp", kind="mlp", norm="post_attention_layernorm", module="mlp",
               inputs=("mlp.gate_up_proj",), outputs=("mlp.down_proj",)),
    ),
)
