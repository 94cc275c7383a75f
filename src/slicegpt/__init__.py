"""slicegpt: make causal language models smaller by deleting rows and columns (SliceGPT).

    import slicegpt
    print(slicegpt.plan_slice("default", size=0.8).rows())      # the plan, from the config alone
    loaded = slicegpt.load_model("default")            # or a hub id, a directory, a .gguf file
    model, config = slicegpt.slice_model(loaded.model, loaded.tokenizer, "shakespeare", size=0.8)
    slicegpt.save(model, loaded.tokenizer, config, "out/smollm2-80")
    again = slicegpt.load("out/smollm2-80")

    # the whole job, streamed: one layer at a time from disk, sharded output, resumable
    run = slicegpt.slice_and_save("default", "out/smollm2-80", size=0.8, activations_dir="/scratch")

    # the paper's algorithm at its own measure (25% of the hidden width removed)
    paper, config = slicegpt.slice_model("default", recipe="paper", slicing=0.25)

    # the default's output at this size is a stock LlamaForCausalLM: GGUF for llama.cpp
    slicegpt.export_gguf(model, loaded.tokenizer, "out/smollm2-80.gguf")

    # zero-shot accuracy with lm-eval (hub tasks such as piqa, or the shipped offline task)
    print(slicegpt.zero_shot(again.model, again.tokenizer, "shakespeare_next_line").average)

    # recover quality with LoRA adapters, merged into the weights on save
    result = slicegpt.finetune(again.model, again.tokenizer, "shakespeare", steps=200)
    slicegpt.save_finetuned(result, again.tokenizer, "out/smollm2-25-ft", again.sliced)
"""

from slicegpt.adapters import get_adapter, supported_model_types
from slicegpt.api import calibration_data, generate, make_standard, plan_slice, slice_model
from slicegpt.pipeline import SliceRun, slice_and_save
from slicegpt.config import SlicingConfig
from slicegpt.data import bos_token, evaluation_windows, load_text, tokenize
from slicegpt.errors import SliceGPTError
from slicegpt.evaluation.perplexity import count_parameters, perplexity
from slicegpt.finetune import FinetuneResult, finetune, save_finetuned
from slicegpt.formats.gguf import export_gguf
from slicegpt.formats.io import save
from slicegpt.formats.loading import load
from slicegpt.formats.loading import LoadedModel, load_model
from slicegpt.formats.standard import to_standard
from slicegpt.evaluation.zero_shot import ZeroShotResult, load_tasks, zero_shot
from slicegpt.plan import Plan, SliceSettings
from slicegpt.recipes import RECIPES, Levers
from slicegpt.version import __version__


__all__ = [
    "FinetuneResult", "Levers", "LoadedModel", "Plan", "RECIPES", "SliceGPTError", "SliceSettings", "__version__", "SlicingConfig", "ZeroShotResult", "bos_token",
    "calibration_data", "count_parameters", "evaluation_windows", "export_gguf", "finetune", "generate",
    "get_adapter", "load", "load_model", "load_tasks", "load_text", "make_standard", "perplexity", "plan_slice", "save",
    "save_finetuned", "slice_and_save", "slice_model", "SliceRun", "supported_model_types", "to_standard", "tokenize", "zero_shot",
]
