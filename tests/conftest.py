"""Tiny random-weight models of each supported family, built from config classes (no download)."""

from __future__ import annotations

import copy
import os
import subprocess
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
    import transformers as t

    common = dict(vocab_size=300, hidden_size=64, intermediate_size=96, num_hidden_layers=3,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256)
    special = dict(pad_token_id=0, bos_token_id=1, eos_token_id=2)
    small = dict(vocab_size=300, num_hidden_layers=3, num_attention_heads=4, max_position_embeddings=256)
    moe = dict(num_experts=4, num_experts_per_tok=2, moe_intermediate_size=48)
    # sliding windows shorter than the test sequences, so per-layer masks really differ
    gemma = dict(**common, head_dim=16, **special, sliding_window=8)
    return {
        "llama": lambda: t.LlamaConfig(**common, tie_word_embeddings=True),
        "mistral": lambda: t.MistralConfig(**common, sliding_window=None),
        "qwen2": lambda: t.Qwen2Config(**common, tie_word_embeddings=False),
        "qwen3": lambda: t.Qwen3Config(**common, head_dim=16),
        "phi3": lambda: t.Phi3Config(**common, **special),
        "gemma": lambda: t.GemmaConfig(**common, head_dim=16, **special),
        "gemma2": lambda: t.Gemma2Config(**gemma),
        "gemma3_text": lambda: t.Gemma3TextConfig(
            **gemma, layer_types=["sliding_attention", "full_attention", "sliding_attention"]),
        "opt": lambda: t.OPTConfig(**small, hidden_size=64, ffn_dim=96, word_embed_proj_dim=64, **special),
        "opt_project": lambda: t.OPTConfig(**small, hidden_size=64, ffn_dim=96, word_embed_proj_dim=48, **special),
        "phi": lambda: t.PhiConfig(**small, hidden_size=64, intermediate_size=96, partial_rotary_factor=0.5,
                                   **special),
        "gpt_neox": lambda: t.GPTNeoXConfig(**small, hidden_size=64, intermediate_size=96, rotary_pct=0.25,
                                            use_parallel_residual=True, **special),
        "gpt_neox_sequential": lambda: t.GPTNeoXConfig(**small, hidden_size=64, intermediate_size=96,
                                                       use_parallel_residual=False, **special),
        "gpt2": lambda: t.GPT2Config(vocab_size=300, n_embd=64, n_layer=3, n_head=4, n_positions=256,
                                     n_inner=96, bos_token_id=1, eos_token_id=2),
        "mixtral": lambda: t.MixtralConfig(**common, num_local_experts=4, num_experts_per_tok=2),
        "qwen2_moe": lambda: t.Qwen2MoeConfig(**common, **moe, shared_expert_intermediate_size=64,
                                              mlp_only_layers=[1]),
        "qwen3_moe": lambda: t.Qwen3MoeConfig(**common, **moe, head_dim=16),
    }


FAMILIES = sorted(_configs())


def make_config(model_type: str, **overrides):
    config = _configs()[model_type]()
    for key, value in overrides.items():
        setattr(config, key, value)
    return config


def make_model(model_type: str, dtype=torch.float32, seed: int = 0, **overrides):
    """A random model whose norm gains are not 1, so folding them is actually exercised."""
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(make_config(model_type, **overrides)).to(dtype).eval()
    if dtype == torch.float64 and "moe" in model_type or model_type == "mixtral":
        model.set_experts_implementation("eager")  # grouped_mm has no float64 kernel
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name or ".ln_" in name:  # gemma stores w for x * (1 + w): random either way
                p.copy_(1 + 0.3 * torch.randn_like(p))
            elif name.endswith("bias"):
                p.copy_(0.1 * torch.randn_like(p))
    return model


def exact_router_forward(self, hidden_states):
    """MoE top-k routing without the float32 softmax (same choices, float64 weights)."""
    hidden_states = hidden_states.reshape(-1, self.weight.shape[1])
    logits = torch.nn.functional.linear(hidden_states, self.weight)
    probs = torch.softmax(logits, dim=-1)
    top, index = torch.topk(probs, self.top_k, dim=-1)
    if getattr(self, "norm_topk_prob", True):
        top = top / top.sum(dim=-1, keepdim=True)
    return logits, top.to(hidden_states.dtype), index


@pytest.fixture
def exact_norms(monkeypatch):
    """Patch RMSNorms (and MoE routers) of the test families to compute in the input dtype.

    transformers deliberately rounds norms and router softmaxes through float32; the
    float64 equivalence checks need every step in float64 to reach 1e-8.
    """
    import importlib

    gemma_style = {"gemma", "gemma2", "gemma3"}
    for family in ["llama", "mistral", "qwen2", "qwen3", "phi3", "gemma", "gemma2", "gemma3", "mixtral",
                   "qwen2_moe", "qwen3_moe"]:
        module = importlib.import_module(f"transformers.models.{family}.modeling_{family}")
        for name, cls in vars(module).items():
            if isinstance(cls, type) and name.endswith("RMSNorm"):
                forward = exact_gemma_rmsnorm_forward if family in gemma_style else exact_rmsnorm_forward
                monkeypatch.setattr(cls, "forward", forward)
            elif isinstance(cls, type) and name.endswith("TopKRouter"):
                monkeypatch.setattr(cls, "forward", exact_router_forward)


@pytest.fixture(scope="session")
def tokenizer():
    """A small byte-level BPE tokenizer trained on the shipped Shakespeare excerpt."""
    from slicegpt.testing import train_tokenizer

    return train_tokenizer(TEXT)


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


def _mount_tmpfs(path: Path, size: str, *options: str) -> bool:
    path.mkdir(exist_ok=True)
    return subprocess.run(["mount", "-t", "tmpfs", "-o", ",".join([f"size={size}", *options]), "tmpfs", str(path)],
                          capture_output=True).returncode == 0


@pytest.fixture
def small_disk(tmp_path):
    """A 600 KB tmpfs (root only; skipped elsewhere), unmounted afterwards."""
    disk = tmp_path / "disk"
    if os.geteuid() != 0 or not _mount_tmpfs(disk, "600k"):
        pytest.skip("mounting a tmpfs needs root")
    try:
        yield disk
    finally:
        subprocess.run(["umount", "-l", str(disk)], capture_output=True)
