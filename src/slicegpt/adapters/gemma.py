"""Gemma (v1): Llama layout, RMSNorm computing x * (1 + w), embeddings scaled by sqrt(d).

The embedding scale is a constant factor, so it commutes with the rotation; the sliced
model keeps the original sqrt(d) because its config keeps the original hidden size.
"""

from dataclasses import replace

from slicegpt.adapters.llama import ADAPTER as LLAMA

ADAPTER = replace(LLAMA, family="gemma", model_types=("gemma",), norm_offset=1.0, norm_eps_attr="eps")
