"""Gemma: Llama layout, RMSNorm computing x * (1 + w), embeddings scaled by sqrt(d).

The embedding scale is a constant factor, so it commutes with the rotation; the sliced
model keeps the original sqrt(d) because its config keeps the original hidden size.

Gemma 2 and 3 also normalise each branch *output* (`post_attention_layernorm`,
`post_feedforward_layernorm`) before it joins the stream. That norm's RMS is taken over
all d coordinates of the branch output in the original basis, so it cannot be folded into
the writer: the exact treatment keeps the writer (o_proj, down_proj) at full width d,
applies the stock norm there, and then rotates and slices its output with one d x d'
matrix per branch (`Branch.out_rotation`). Soft-capping of logits and attention scores
acts outside the residual stream and is untouched. Where only MLP neurons are pruned (the
stream unrotated), the writers are fitted before their norm, to the dense writer's output,
and the stock norms stay as they are.
"""

from dataclasses import replace

from slicegpt.adapters.base import Branch
from slicegpt.adapters.llama import ADAPTER as LLAMA
from slicegpt.adapters.llama import ATTENTION, MLP

ADAPTER = replace(LLAMA, family="gemma", model_types=("gemma",), norm_offset=1.0, norm_eps_attr="eps",
                  scales_embeddings=True)

GEMMA2 = replace(
    ADAPTER,
    family="gemma2",
    model_types=("gemma2", "gemma3_text"),
    branches=(
        replace(ATTENTION, post_norm="post_attention_layernorm"),
        Branch(name="mlp", kind="mlp", norm="pre_feedforward_layernorm", module="mlp",
               inputs=MLP.inputs, outputs=MLP.outputs, post_norm="post_feedforward_layernorm", neurons=MLP.neurons),
    ),
)
