"""GGUF files in real llama.cpp: next-token probabilities equal the stock model's, family by family.

transformers' GGUF reader derives some families' head size from the (sliced) embedding width,
so it cannot check them; llama.cpp itself can. It runs through npm's node-llama-cpp (prebuilt
CPU binaries), installed by scripts/setup.sh into the slicegpt cache.
"""

import json
import shutil
import subprocess
from pathlib import Path

import pytest
import torch

import slicegpt
from slicegpt.formats.gguf import export_gguf
from slicegpt.formats.loading import cache_dir
from conftest import TEXT, make_model

SAMPLE = TEXT[:300] + " -- 12345 world's ... \"ok?!\"  (yes)"  # punctuation runs, digits, spaces
SCRIPT = Path(__file__).parents[1] / "scripts" / "llama_cpp_probs.mjs"


def _runner() -> Path | None:
    home = cache_dir() / "node-llama-cpp"
    if shutil.which("node") and (home / "node_modules" / "node-llama-cpp").is_dir():
        return home
    return None


pytestmark = pytest.mark.skipif(_runner() is None, reason="node-llama-cpp not installed (scripts/setup.sh does it)")


def llama_cpp_run(path: Path, prompt: list[int], continuation: list[int], text: str = "") -> tuple[torch.Tensor, list]:
    """llama.cpp's next-token probabilities along prompt + continuation, and its tokens for `text`."""
    home = _runner()
    shutil.copy(SCRIPT, home / SCRIPT.name)
    done = subprocess.run(["node", SCRIPT.name, str(path.resolve()), json.dumps(prompt), json.dumps(continuation), text],
                          cwd=home, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    result = json.loads(done.stdout.strip().splitlines()[-1])
    return torch.tensor(result["probs"], dtype=torch.float64), result["tokens"]


GEMMA3_GLOBAL_EVERY_6 = dict(num_hidden_layers=6, layer_types=["sliding_attention"] * 5 + ["full_attention"])
DEFAULT = dict(size=0.8)  # the default recipe: MLP neurons alone meet it, the stream unrotated, a stock model
UNIFORM = dict(slicing=0.25, neurons="off", rotation="uniform")  # the stream sliced with one basis
FAMILIES = {  # family -> (config overrides, slice_model settings)
    "llama": ({}, UNIFORM),
    "mistral": ({}, DEFAULT),
    "qwen2": ({}, DEFAULT),
    "qwen3": ({}, DEFAULT),
    "phi3": ({"sliding_window": 32}, UNIFORM),  # written as llama with the context capped at the window
    "gemma": ({}, DEFAULT),
    # query_pre_attn_scalar 256 != head_dim 16: llama.cpp's fixed scale is folded into q_proj
    "gemma2": ({}, DEFAULT),
    "gemma3_text": (GEMMA3_GLOBAL_EVERY_6, DEFAULT),
    "mixtral": ({}, UNIFORM),
    "qwen3_moe": ({"norm_topk_prob": True}, dict(UNIFORM, accept_deviation=True)),
}


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_gguf_runs_in_llama_cpp_with_the_stock_models_probabilities(family, calibration, tokenizer, tmp_path):
    overrides, settings = FAMILIES[family]
    model = make_model(family, **overrides)
    stock, config = slicegpt.slice_model(model, tokenizer, calibration, progress=False, **settings)
    assert config.standard and config.rotation == "uniform"
    if settings is DEFAULT:  # what the default recipe gives at this size: only neurons pruned
        assert config.mlp_neurons < config.mlp_neurons_dense and set(config.widths) == {config.hidden_size}
    # a neutral name: llama.cpp looks for Phi-3 chat tokens when the name says phi3, and the test tokenizer has none
    path = export_gguf(stock, tokenizer, tmp_path / f"{family}.gguf", dtype="f32", name="slicegpt test model")
    if family == "phi3":
        from gguf import GGUFReader

        fields = GGUFReader(str(path)).fields
        assert fields["general.architecture"].contents() == "llama"
        assert fields["llama.context_length"].contents() == 32
    ids = calibration.input_ids[0, :24].tolist()
    prompt, continuation = ids[:16], ids[16:]
    with torch.no_grad():
        expected = torch.softmax(stock(torch.tensor([ids])).logits[0, 15:].double(), -1)
    got, tokens = llama_cpp_run(path, prompt, continuation, SAMPLE)
    assert got.shape == expected.shape
    assert (got - expected).abs().max() < 1e-4, family
    assert tokens == tokenizer(SAMPLE)["input_ids"]  # the tokenizer went in too (GPT-2 word splitting)


def _bpe_tokenizer(pre_tokenizer: str):
    """A byte-level BPE trained with one of the word splitters llama.cpp names, on text with digit runs."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    from slicegpt.formats.gguf import _LLAMA3_SPLIT

    byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=pre_tokenizer == "gpt-2")
    if pre_tokenizer != "gpt-2":
        pattern = _LLAMA3_SPLIT if pre_tokenizer == "llama-bpe" else _LLAMA3_SPLIT.replace(r"\p{N}{1,3}", r"\p{N}")
        byte_level = pre_tokenizers.Sequence([pre_tokenizers.Split(Regex(pattern), behavior="isolated"), byte_level])
    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer, tok.decoder = byte_level, decoders.ByteLevel()
    numbers = " ".join(str(n * 7919 % 100000) for n in range(3000))
    trainer = trainers.BpeTrainer(vocab_size=600, special_tokens=["<unk>", "<s>", "</s>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator([TEXT, TEXT.upper(), numbers], trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>")


def test_llama_cpp_splits_words_like_the_tokenizer_json_it_was_named_from(tmp_path):
    """gpt-2, llama-bpe (Llama 3: digits in threes, any-case contractions) and qwen2 (single digits)."""
    from gguf import GGUFReader

    text = SAMPLE + " 1234567 in 1599, 20245 MEN'S WORLD'S\n\n  x\t 42"
    seen = {}
    for pre in ("gpt-2", "llama-bpe", "qwen2"):
        tokenizer = _bpe_tokenizer(pre)
        model = make_model("llama", vocab_size=len(tokenizer))
        path = export_gguf(model, tokenizer, tmp_path / f"{pre}.gguf", dtype="f32", name="slicegpt test model")
        assert GGUFReader(str(path)).fields["tokenizer.ggml.pre"].contents() == pre
        _, tokens = llama_cpp_run(path, [1], [], text)
        expected = tokenizer(text)["input_ids"]
        assert tokens == expected, pre
        seen[pre] = [tokenizer.convert_ids_to_tokens(i) for i in expected]
    assert len({tuple(t) for t in seen.values()}) == 3  # the splitters really differ on this text
