"""Registry of architecture adapters, keyed by `config.model_type` (never by model name)."""

from __future__ import annotations

from slicegpt.adapters.base import Branch, ModelAdapter
from slicegpt.adapters.gemma import ADAPTER as GEMMA
from slicegpt.adapters.gemma import GEMMA2
from slicegpt.adapters.gpt2 import ADAPTER as GPT2
from slicegpt.adapters.gpt_neox import ADAPTER as GPT_NEOX
from slicegpt.adapters.llama import ADAPTER as LLAMA
from slicegpt.adapters.moe import ADAPTER as MOE
from slicegpt.adapters.opt import ADAPTER as OPT
from slicegpt.adapters.phi import ADAPTER as PHI
from slicegpt.adapters.phi3 import ADAPTER as PHI3
from slicegpt.errors import SliceGPTError

ADAPTERS: tuple[ModelAdapter, ...] = (LLAMA, PHI3, GEMMA, GEMMA2, OPT, PHI, GPT_NEOX, GPT2, MOE)

# Families whose models have no causal decoder stack for SliceGPT to act on.
_ENCODER_TYPES = {"bert", "roberta", "distilbert", "albert", "electra", "deberta", "deberta-v2",
                  "xlm-roberta", "mpnet", "t5", "mt5", "bart", "mbart", "pegasus", "marian",
                  "whisper", "longt5", "umt5", "flan-t5"}


def supported_model_types() -> list[str]:
    return sorted(t for a in ADAPTERS for t in a.model_types)


def require_decoder(config) -> None:
    """Refuse encoder and encoder-decoder models: they have no causal LM to slice or evaluate."""
    model_type = getattr(config, "model_type", None)
    if model_type in _ENCODER_TYPES or getattr(config, "is_encoder_decoder", False):
        raise SliceGPTError(
            f"model type '{model_type}' is an encoder or encoder-decoder model; SliceGPT slices "
            f"decoder-only causal language models (supported: {', '.join(supported_model_types())})"
        )


def get_adapter(config) -> ModelAdapter:
    """Return the adapter for `config.model_type`, or raise a one-line SliceGPTError."""
    model_type = getattr(config, "model_type", None)
    for adapter in ADAPTERS:
        if model_type in adapter.model_types:
            return adapter.for_config(config)
    require_decoder(config)
    if getattr(config, "vision_config", None) is not None:
        raise SliceGPTError(
            f"model type '{model_type}' is a multimodal model (its image projector writes into the text "
            "stream); slice a text-only checkpoint of its decoder instead (for Gemma 3: model type gemma3_text)"
        )
    raise SliceGPTError(
        f"unsupported model type '{model_type}'; supported model types: "
        f"{', '.join(supported_model_types())}"
    )


__all__ = ["ADAPTERS", "Branch", "ModelAdapter", "get_adapter", "require_decoder", "supported_model_types"]
