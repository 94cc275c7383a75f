"""slicegpt: make causal language models smaller by deleting rows and columns (SliceGPT).

    import slicegpt
    loaded = slicegpt.load_model("default")            # or a hub id, a directory, a .gguf file
    model, config = slicegpt.slice_model(loaded.model, loaded.tokenizer, "shakespeare", 0.25)
    slicegpt.save(model, loaded.tokenizer, config, "out/smollm2-25")
    again = slicegpt.load("out/smollm2-25")

    # the whole job, streamed: one layer at a time from disk, sharded output, resumable
    run = slicegpt.slice_and_save("default", "out/smollm2-25", 0.25, offload="disk", offload_dir="/scratch")

    # one basis for the whole stream: a stock LlamaForCausalLM with hidden size 432, and GGUF
    stock, config = slicegpt.slice_model("default", sparsity=0.25, rotation="uniform")
    slicegpt.export_gguf(stock, loaded.tokenizer, "out/smollm2-25.gguf")

    # zero-shot accuracy with lm-eval (hub tasks such as piqa, or the shipped offline task)
    print(slicegpt.zero_shot(again.model, again.tokenizer, "shakespeare_next_line").average)

    # recover quality with LoRA adapters, merged into the weights on save
    result = slicegpt.finetune(again.model, again.tokenizer, "shakespeare", steps=200)
    slicegpt.save_finetuned(result, again.tokenizer, "out/smollm2-25-ft", again.sliced)
"""

from slicegpt.adapters import get_adapter, supported_model_types
from slicegpt.api import calibration_data, generate, make_standard, slice_model
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
from slicegpt.version import __version__


__all__ = [
    "FinetuneResult", "LoadedModel", "SliceGPTError", "SlicingConfig", "ZeroShotResult", "bos_token",
    "calibration_data", "count_parameters", "evaluation_windows", "export_gguf", "finetune", "generate",
    "get_adapter", "load", "load_model", "load_tasks", "load_text", "make_standard", "perplexity", "save",
    "save_finetuned", "slice_and_save", "slice_model", "SliceRun", "supported_model_types", "to_standard", "tokenize", "zero_shot",
]
