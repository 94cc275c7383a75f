"""Test material: random-weight checkpoints of any size, written one layer at a time, and a small tokenizer.

A model bigger than memory cannot be built with `from_config` and saved; this writes its
shards directly, as a sharded transformers checkpoint (`model-0000N-of-0000M.safetensors` and
an index), so the whole model never exists in memory.
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

import torch


def write_random_llama(path: str | os.PathLike, layers: int, hidden: int = 1024, intermediate: int = 4096,
                       heads: int = 16, kv_heads: int = 4, vocab: int = 300, dtype: torch.dtype = torch.float32,
                       seed: int = 0, tokenizer=None) -> int:
    """Write a Llama with random weights (norm gains near 1); returns its size in bytes on disk."""
    from safetensors.torch import save_file
    from transformers import LlamaConfig

    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    config = LlamaConfig(vocab_size=vocab, hidden_size=hidden, intermediate_size=intermediate,
                         num_hidden_layers=layers, num_attention_heads=heads, num_key_value_heads=kv_heads,
                         max_position_embeddings=4096, tie_word_embeddings=False, dtype=str(dtype).split(".")[-1])
    config.save_pretrained(path)
    if tokenizer is not None:
        tokenizer.save_pretrained(path)
    g = torch.Generator().manual_seed(seed)
    head_dim = hidden // heads

    def linear(out: int, inp: int) -> torch.Tensor:
        return (torch.randn(out, inp, generator=g) / math.sqrt(inp)).to(dtype)

    def gain(n: int) -> torch.Tensor:
        return (1 + 0.1 * torch.randn(n, generator=g)).to(dtype)

    parts = layers + 2
    weight_map: dict[str, str] = {}
    total = 0

    def write(index: int, tensors: dict[str, torch.Tensor]) -> None:
        nonlocal total
        name = f"model-{index + 1:05d}-of-{parts:05d}.safetensors"
        save_file(tensors, str(path / name), metadata={"format": "pt"})
        weight_map.update({k: name for k in tensors})
        total += sum(t.numel() * t.element_size() for t in tensors.values())

    write(0, {"model.embed_tokens.weight": (0.02 * torch.randn(vocab, hidden, generator=g)).to(dtype)})
    for i in range(layers):
        p = f"model.layers.{i}."
        write(i + 1, {
            p + "input_layernorm.weight": gain(hidden), p + "post_attention_layernorm.weight": gain(hidden),
            p + "self_attn.q_proj.weight": linear(heads * head_dim, hidden),
            p + "self_attn.k_proj.weight": linear(kv_heads * head_dim, hidden),
            p + "self_attn.v_proj.weight": linear(kv_heads * head_dim, hidden),
            p + "self_attn.o_proj.weight": linear(hidden, heads * head_dim),
            p + "mlp.gate_proj.weight": linear(intermediate, hidden),
            p + "mlp.up_proj.weight": linear(intermediate, hidden),
            p + "mlp.down_proj.weight": linear(hidden, intermediate),
        })
    write(layers + 1, {"model.norm.weight": gain(hidden), "lm_head.weight": linear(vocab, hidden)})
    (path / "model.safetensors.index.json").write_text(json.dumps(
        {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}, indent=2))
    return sum(f.stat().st_size for f in path.glob("model-*.safetensors"))


def train_tokenizer(text: str, vocab_size: int = 300):
    """A byte-level BPE tokenizer trained on `text` (with <unk>, <s>, </s>), for tiny test models."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=["<unk>", "<s>", "</s>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator([text], trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>")
