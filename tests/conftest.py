"""Tiny random-weight models of each supported family, built from config classes (no download)."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch

DATA = Path(__file__).parent / "data"
TEXT = (DATA / "tempest_excerpt.txt").read_text()


def exact_rmsnorm_forward(self, x):
    """RMSNorm without the float32 round trip, so float64 tests can check 1e-8 equivalence."""
    eps = getattr(self, "variance_epsilon", getattr(self, "eps", None))
    return self.weight * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps))


def exact_gemma_rmsnorm_forward(self, x):
    return (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps)) * (1.0 + self.weight)


def _configs():
    from transformers import GemmaConfig, LlamaConfig, MistralConfig, Phi3Config, Qwen2Config, Qwen3Config

    common = dict(vocab_size=300, hidden_size=64, intermediate_size=96, num_hidden_layers=3,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256)
    return {
        "llama": lambda: LlamaConfig(**common, tie_word_embeddings=True),
        "mistral": lambda: MistralConfig(**common, sliding_window=None),
        "qwen2": lambda: Qwen2Config(**common, tie_word_embeddings=False),
        "qwen3": lambda: Qwen3Config(**common, head_dim=16),
        "phi3": lambda: Phi3Config(**common, pad_token_id=0, bos_token_id=1, eos_token_id=2),
        "gemma": lambda: GemmaConfig(**common, head_dim=16, pad_token_id=0, bos_token_id=1, eos_token_id=2),
    }


FAMILIES = sorted(_configs())


def make_config(model_type: str):
    return _configs()[model_type]()


def make_model(model_type: str, dtype=torch.float32, seed: int = 0):
    """A random model whose norm gains are not 1, so folding them is actually exercised."""
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(make_config(model_type)).to(dtype).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:  # gemma stores w for x * (1 + w): random either way
                p.copy_(1 + 0.3 * torch.randn_like(p))
            elif name.endswith("bias"):
                p.copy_(0.1 * torch.randn_like(p))
    return model


@pytest.fixture
def exact_norms(monkeypatch):
    """Patch every RMSNorm class of the test families to compute in the input dtype."""
    from transformers.models.gemma import modeling_gemma
    from transformers.models.llama import modeling_llama
    from transformers.models.phi3 import modeling_phi3
    from transformers.models.mistral import modeling_mistral
    from transformers.models.qwen2 import modeling_qwen2
    from transformers.models.qwen3 import modeling_qwen3

    for module, name in [(modeling_llama, "LlamaRMSNorm"), (modeling_mistral, "MistralRMSNorm"),
                         (modeling_qwen2, "Qwen2RMSNorm"), (modeling_qwen3, "Qwen3RMSNorm"),
                         (modeling_phi3, "Phi3RMSNorm")]:
        monkeypatch.setattr(getattr(module, name), "forward", exact_rmsnorm_forward)
    monkeypatch.setattr(modeling_gemma.GemmaRMSNorm, "forward", exact_gemma_rmsnorm_forward)


@pytest.fixture(scope="session")
def tokenizer():
    """A small byte-level BPE tokenizer trained on the shipped Shakespeare excerpt."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=["<unk>", "<s>", "</s>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator([TEXT], trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>")


@pytest.fixture
def calibration(tokenizer):
    from slicegpt.data import calibration_windows, tokenize

    return calibration_windows(tokenize(tokenizer, TEXT), samples=8, seqlen=64, seed=0)


@pytest.fixture
def tiny_model_dir(tmp_path_factory, tokenizer):
    """A dense tiny Llama saved as a normal transformers directory with its tokenizer."""
    path = tmp_path_factory.mktemp("tiny-llama")
    make_model("llama").save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def clone(model):
    return copy.deepcopy(model)
