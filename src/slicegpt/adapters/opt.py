"""OPT: pre-LayerNorm with biases, learned positions, MLP linears directly on the layer.

OPT-350m puts its norms after the residual additions (post-LN): no norm sits between the
stream and the readers, so rotation invariance does not hold and it is refused. Where the
word-embedding width differs from the hidden size, `project_in` writes the stream and
`project_out` reads it, taking the roles of the embeddings and the head (the tied
embedding/lm_head pair then lives outside the residual stream and is left alone).
"""

from dataclasses import replace

from slicegpt.adapters.base import Branch, ModelAdapter
from slicegpt.errors import SliceGPTError


def _configure(adapter: ModelAdapter, config) -> ModelAdapter:
    if not getattr(config, "do_layer_norm_before", True):
        raise SliceGPTError("this OPT model normalises after the residual additions (post-LN, like "
                            "OPT-350m); SliceGPT needs pre-LN models")
    if getattr(config, "_remove_final_layer_norm", False):
        raise SliceGPTError("this OPT model has no final layer norm; SliceGPT needs one in front of the head")
    if getattr(config, "word_embed_proj_dim", config.hidden_size) != config.hidden_size:
        return replace(adapter, embeddings=("model.decoder.embed_positions",),
                       entry_writers=("model.decoder.project_in",), head="model.decoder.project_out")
    return adapter


ADAPTER = ModelAdapter(
    family="opt",
    model_types=("opt",),
    layers="model.decoder.layers",
    embeddings=("model.decoder.embed_tokens", "model.decoder.embed_positions"),
    final_norm="model.decoder.final_layer_norm",
    head="lm_head",
    branches=(
        Branch(name="attn", kind="attention", norm="self_attn_layer_norm", module="self_attn",
               inputs=("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"),
               outputs=("self_attn.out_proj",)),
        Branch(name="mlp", kind="mlp", norm="final_layer_norm", module=("fc1", "activation_fn", "fc2"),
               inputs=("fc1",), outputs=("fc2",)),
    ),
    norm_kind="layernorm",
    norm_eps_attr="eps",
    config_eps=None,  # OPT's LayerNorms use the fixed default 1e-5
    standard_blocker="OPT's attention width is hidden_size, so a stock OPT cannot have a sliced hidden size",
    configure=_configure,
)
