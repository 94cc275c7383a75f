"""Benchmark: where a model loses to llama.cpp's quantization, simulated in PyTorch, part by part.

llama.cpp's CPU matmul with a q8_0 or q4_0 weight quantizes its input (the activations) to q8_0 as
well, in blocks of 32 along the input width; an f16 weight takes f16 inputs. This script rounds, with
the `gguf` package's own quantizers, the weights of every linear (the head aside) and/or their inputs,
and measures held-out perplexity each way:

- weights alone (q8_0, q4_0), inputs alone (q8_0), both (llama.cpp's q8_0 and q4_0 files);
- the inputs of one group of linears at a time (q/k/v, o, gate/up, down), to find the sensitive one.

Where "both" matches llama.cpp's perplexity of the exported file and "weights alone" stays near the
unquantized model, the loss comes from the inputs, i.e. from how each input coordinate's scale is split
between a norm's gain and its readers' columns (docs/outputs.md#quantized-gguf).

    .venv/bin/python bench/quant_sensitivity.py out/gemma-0.9 --eval-samples 8 --eval-seqlen 256
    .venv/bin/python bench/quant_sensitivity.py gemma3-270m --eval-samples 8 --eval-seqlen 256

The raw figures go to bench/results/quant_sensitivity-<name>-<date>-<commit>.json.
"""

from __future__ import annotations

import argparse
import contextlib
from pathlib import Path

import numpy as np
import torch

from common import evaluation, save_results  # bench/common.py
from slicegpt.formats.gguf import BLOCK  # q8_0 / q4_0 values per block

GROUPS = {"q/k/v": ("q_proj", "k_proj", "v_proj"), "o": ("o_proj",), "gate/up": ("gate_proj", "up_proj"),
          "down": ("down_proj",)}


def roundtrip(x: torch.Tensor, qtype: str) -> torch.Tensor:
    """`x` quantized to a GGML block type along its last axis and back (zero-padded to whole blocks)."""
    from gguf import GGMLQuantizationType, quants

    kind = GGMLQuantizationType[qtype.upper()]
    shape = x.shape
    flat = x.detach().to(torch.float32).reshape(-1, shape[-1])
    if pad := -shape[-1] % BLOCK:
        flat = torch.cat([flat, flat.new_zeros(flat.shape[0], pad)], dim=1)
    back = quants.dequantize(quants.quantize(flat.cpu().numpy(), kind), kind)
    out = torch.from_numpy(np.ascontiguousarray(back))[:, :shape[-1]].reshape(shape)
    return out.to(device=x.device, dtype=x.dtype)


def linears(model: torch.nn.Module) -> dict[str, torch.nn.Linear]:
    """Every linear but the output head (llama.cpp keeps the head's input unquantized only for f16 heads)."""
    head = model.get_output_embeddings()
    return {n: m for n, m in model.named_modules() if isinstance(m, torch.nn.Linear) and m is not head}


def group_of(name: str) -> str | None:
    leaf = name.rsplit(".", 1)[-1]
    return next((g for g, leaves in GROUPS.items() if leaf in leaves), None)


@torch.no_grad()
def measure(model: torch.nn.Module, windows) -> dict[str, float]:
    import slicegpt

    modules = linears(model)
    weights = {n: m.weight.detach().clone() for n, m in modules.items()}
    ppl = lambda: float(slicegpt.perplexity(model, windows, progress=False))  # noqa: E731

    def set_weights(qtype: str | None) -> None:
        for n, m in modules.items():
            m.weight.copy_(weights[n] if qtype is None else roundtrip(weights[n], qtype))

    @contextlib.contextmanager
    def inputs_quantized(names):
        hooks = [modules[n].register_forward_pre_hook(lambda _, args: (roundtrip(args[0], "q8_0"), *args[1:]))
                 for n in names]
        try:
            yield hooks
        finally:
            for h in hooks:
                h.remove()

    figures = {"none": ppl()}
    for qtype in ("q8_0", "q4_0"):
        set_weights(qtype)
        figures[f"weights {qtype}"] = ppl()
        with inputs_quantized(modules):
            figures[f"weights {qtype} + inputs q8_0"] = ppl()
    set_weights(None)
    with inputs_quantized(modules):
        figures["inputs q8_0"] = ppl()
    for group in GROUPS:
        with inputs_quantized([n for n in modules if group_of(n) == group]) as hooks:
            if hooks:
                figures[f"inputs q8_0: {group} only"] = ppl()
    return figures


def main(argv: list[str] | None = None) -> dict:
    import slicegpt

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("model", help="a model directory, a slicegpt output, or a name slicegpt loads (default, "
                                 "gemma3-270m)")
    p.add_argument("--data", default="shakespeare")
    p.add_argument("--eval-samples", type=int, default=8)
    p.add_argument("--eval-seqlen", type=int, default=256)
    args = p.parse_args(argv)
    loaded = slicegpt.load_model(args.model)  # a name, a checkpoint or a slicegpt output
    model = loaded.model.to(torch.float32).eval()
    windows = evaluation(loaded.tokenizer, args)
    figures = measure(model, windows)
    width = max(map(len, figures))
    print(f"{args.model}: held-out perplexity, {windows.tokens} tokens of {args.data} (PyTorch, gguf's quantizers)")
    for what, value in figures.items():
        print(f"  {what:<{width}}  {value:.2f}")
    name = Path(args.model).name if Path(args.model).exists() else args.model
    data = {"model": args.model, "data": args.data, "eval_samples": args.eval_samples,
            "eval_seqlen": args.eval_seqlen, "tokens": windows.tokens, "perplexity": figures}
    data["path"] = str(save_results(f"quant_sensitivity-{name}", data))
    return data


if __name__ == "__main__":
    main()
