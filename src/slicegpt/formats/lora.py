"""LoRA adapters saved beside a model (`slicegpt finetune --adapters-only`): found and merged on load.

Loading lives here, not in `finetune`, so that every loader can merge an adapter without
importing the training code (and without an import cycle).
"""

from __future__ import annotations

import os
import warnings
from contextlib import contextmanager
from pathlib import Path

from torch import nn

ADAPTER_DIR = "lora"  # the peft adapter of an --adapters-only output, beside the model files


@contextmanager
def peft_quietly():
    """peft (0.21) reads a property transformers 5 deprecated; the warning is theirs, not the user's."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)
        yield


def load_adapter(model: nn.Module, directory: str | os.PathLike) -> nn.Module:
    """`model` with the peft adapter in `directory` merged into its weights."""
    from peft import PeftModel

    with peft_quietly():
        return PeftModel.from_pretrained(model, str(directory)).merge_and_unload()


def has_adapter(directory: str | os.PathLike) -> bool:
    """Whether a model directory carries an --adapters-only LoRA adapter beside its weights."""
    return (Path(directory) / ADAPTER_DIR / "adapter_config.json").is_file()


def with_saved_adapter(model: nn.Module, directory: str | os.PathLike) -> nn.Module:
    """`model` loaded from `directory`, with the directory's --adapters-only LoRA adapter (lora/) merged, if any."""
    return load_adapter(model, Path(directory) / ADAPTER_DIR) if has_adapter(directory) else model
