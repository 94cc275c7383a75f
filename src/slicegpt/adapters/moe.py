"""Mixture-of-experts decoders: Mixtral, Qwen2-MoE, Qwen3-MoE (Llama attention).

In transformers 5 the experts are fused 3-D parameters, ``gate_up_proj [E, 2I, d]`` and
``down_proj [E, d, I]``, so the description names parameters rather than modules. The
router reads the normalised stream like any input linear (its top-k choice is unchanged
by the rotation) and stores the width in `hidden_dim`. Qwen2-MoE adds a shared expert and
its sigmoid gate, both reading the stream. Qwen MoE models may keep dense MLPs in some
layers (`mlp_only_layers`), hence the optional (``?``) paths. The expert kernels write
an output as wide as their input, so the last layer cannot widen the stream back to d
for an unsliced head: the head is always sliced.
"""

from dataclasses import replace

from slicegpt.adapters.base import Branch
from slicegpt.adapters.llama import ADAPTER as LLAMA
from slicegpt.adapters.llama import ATTENTION

MOE = Branch(
    name="mlp",
    kind="mlp",
    norm="post_attention_layernorm",
    module="mlp",
    inputs=("mlp.gate?", "mlp.experts.gate_up_proj?",
            "mlp.shared_expert.gate_proj?", "mlp.shared_expert.up_proj?", "mlp.shared_expert_gate?",
            "mlp.gate_proj?", "mlp.up_proj?"),
    outputs=("mlp.experts.down_proj?", "mlp.shared_expert.down_proj?", "mlp.down_proj?"),
    width_attrs=("mlp.gate.hidden_dim?", "mlp.experts.hidden_dim?"),
)

ADAPTER = replace(LLAMA, family="moe", model_types=("mixtral", "qwen2_moe", "qwen3_moe"),
                  branches=(replace(ATTENTION, heads=None), MOE),  # heads: not yet measured with routed experts
                  slice_head_required=True)
