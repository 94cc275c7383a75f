"""The cases of the golden test (test_golden.py) and how each one is built and run.

Every case is a tiny dense float64 model of one family (tests/conftest.py `make_config`)
whose weights are drawn here from one seeded `torch.Generator` -- not by transformers'
init code, which may change between versions -- sliced by `slicegpt.slice_model` on seeded
calibration token ids, then run on a separate seeded eval input.

Numbers pinned per case (tests/data/golden.safetensors and golden.json, written by
tests/make_golden.py): the sliced model's float64 logits on the eval input, the PCA spectra
(`config.spectra`, concatenated), the parameter counts, the sliced width, whether the head
stayed tied, and the name and shape of every tensor in the sliced model's state_dict.

Everything runs inside `exact_float64()`: transformers rounds RMSNorms, MoE router softmaxes
and Gemma 2's eager attention softmax through float32 even for a float64 model. Those
roundings are deterministic, but a float32 rounding step turns a 1e-16 reordering inside
slicegpt (a legitimate refactor) into a 1e-8 jump, which would break the 1e-9 comparison
for no real reason. With the patches every step is float64, so the golden numbers move
only when the algorithm really changes.
"""

from __future__ import annotations

import contextlib
import importlib
import math
from dataclasses import dataclass, field

import torch

from conftest import FAMILIES, exact_gemma_rmsnorm_forward, exact_rmsnorm_forward, exact_router_forward, make_config

WEIGHT_SEED = 0
CALIBRATION_SEED = 1
EVAL_SEED = 2
CALIBRATION_SHAPE = (8, 32)
EVAL_SHAPE = (2, 16)
# Stored logits: every 4th vocabulary column (75 of 300, more than the hidden width, so any
# change of the final hidden states shows) plus the logsumexp over the whole vocabulary
# (any column moving shows there). All 300 columns of every case would be ~3 MB.
LOGIT_COLUMNS = slice(0, None, 4)
SPARSITY = 0.25
MOE = ("mixtral", "qwen2_moe", "qwen3_moe")

# Families whose stock model (uniform, standard=True) only approximates the sliced one.
NEEDS_ACCEPT_DEVIATION = ("gemma2", "gemma3_text", "qwen3", "qwen3_moe")


@dataclass(frozen=True)
class Case:
    name: str
    family: str
    options: dict = field(default_factory=dict)  # keyword arguments of slicegpt.slice_model
    sparsity: float = SPARSITY

    @property
    def id(self) -> str:  # the pytest id
        return self.name


NEURONS = ("llama", "qwen2", "gemma3_text")  # families the default prunes MLP neurons of


def _cases() -> list[Case]:
    cases = []
    for family in FAMILIES:
        cases.append(Case(f"per-layer/{family}", family, {"rotation": "per-layer"}))
    cases.append(Case("per-layer/llama/untied", "llama", {"rotation": "per-layer", "keep_tied_head": False}))
    cases.append(Case("per-layer/llama/slice-head", "llama", {"rotation": "per-layer", "slice_head": True}))
    # beyond the minimum (each case costs ~0.05 s): a tied LayerNorm family untied / head sliced,
    # a post-norm family untied, and a deeper cut
    cases.append(Case("per-layer/opt/untied", "opt", {"rotation": "per-layer", "keep_tied_head": False}))
    cases.append(Case("per-layer/gpt2/slice-head", "gpt2", {"rotation": "per-layer", "slice_head": True}))
    cases.append(Case("per-layer/gemma2/untied", "gemma2", {"rotation": "per-layer", "keep_tied_head": False}))
    cases.append(Case("per-layer/llama/sparsity-0.5", "llama", {"rotation": "per-layer"}, sparsity=0.5))
    for family in FAMILIES:  # the exact sliced model (skip-free, slicegpt format)
        cases.append(Case(f"uniform/{family}", family, {"rotation": "uniform", "standard": False}))
    # the stock model of the family: LayerNorm families (gpt2, gpt_neox*, opt*) are refused,
    # make_golden records it and the test checks they still are
    for family in FAMILIES:
        options = {"rotation": "uniform", "standard": True}
        if family in NEEDS_ACCEPT_DEVIATION:
            options["accept_deviation"] = True
        cases.append(Case(f"uniform-standard/{family}", family, options))
    cases.append(Case("uniform/llama/tokens", "llama", {"rotation": "uniform", "standard": False,
                                                        "pooling": "tokens"}))
    cases.append(Case("uniform/opt/tokens", "opt", {"rotation": "uniform", "standard": False,
                                                    "pooling": "tokens"}))
    cases.append(Case("uniform-standard/llama/tokens", "llama", {"rotation": "uniform", "standard": True,
                                                                 "pooling": "tokens"}))
    cases.append(Case("uniform-standard/llama/fit-tied-head", "llama", {"rotation": "uniform", "standard": True,
                                                                        "fit_tied_head": True}))
    # the quality levers (issue 12): the default method, each lever alone, a parameter budget
    # (the families with MLP neurons keep the stream sliced in their default/ cases, --mlp-width 1: the
    # numbers pinned before neurons; default-neurons/ pins the neurons default, and tests/test_mlp.py
    # checks its pruning against the direct least-squares fit)
    # The cases made before compensation's dense share pin the dense stream on every window
    # (dense_share 1.0, the numbers of then); default-neurons/ follows the default share, and
    # local-targets/ has none (every target the dense weights' output on the sliced input).
    stream = {"mlp_width": 1.0, "dense_share": 1.0}
    exact = {"dense_share": 1.0}
    for family in ("llama", "qwen2", "gemma3_text", "phi", "gpt2", "opt", "gpt_neox"):
        cases.append(Case(f"default/{family}", family, {"method": "default",
                                                         **(stream if family in NEURONS else exact)}))
    for family in NEURONS:  # the default with neurons (--mlp-width auto): the stream unrotated, a stock model
        cases.append(Case(f"default-neurons/{family}", family, {"method": "default"}))
    cases.append(Case("default-neurons/llama/dense-everywhere", "llama", {"method": "default", **exact}))
    cases.append(Case("local-targets/llama", "llama", {"method": "default", "dense_share": 0.0}))
    cases.append(Case("compensation-all/llama", "llama", {"method": "paper", "compensate": "all", **exact}))
    cases.append(Case("compensation-writers/gemma2", "gemma2", {"method": "paper", "compensate": "writers",
                                                                **exact}))
    cases.append(Case("adaptive-widths/llama", "llama", {"method": "paper", "widths": "adaptive"}, sparsity=0.4))
    cases.append(Case("parameters-0.8/llama", "llama", {"method": "default", "parameters": 0.8, **stream}))
    cases.append(Case("parameters-0.8-adaptive/llama", "llama", {"method": "default", "parameters": 0.8,
                                                                  "widths": "adaptive", **stream}))
    cases.append(Case("uniform-compensation/llama", "llama", {"method": "default", "rotation": "uniform",
                                                              "standard": False, **stream}))
    cases.append(Case("uniform-standard-compensation/qwen2", "qwen2", {"method": "default", "rotation": "uniform",
                                                                       "standard": True, **stream}))
    return cases


CASES = _cases()
BY_NAME = {c.name: c for c in CASES}
assert len(BY_NAME) == len(CASES)


def _eager_attention_float64(module, query, key, value, attention_mask, dropout=0.0, scaling=None, softcap=None,
                             **kwargs):
    """Gemma 2's eager attention with the softmax in the input dtype (no float32 round trip)."""
    from transformers.models.gemma2.modeling_gemma2 import repeat_kv

    if scaling is None:
        scaling = module.head_dim ** -0.5
    key_states = repeat_kv(key, module.num_key_value_groups)
    value_states = repeat_kv(value, module.num_key_value_groups)
    attn_weights = torch.matmul(query, key_states.transpose(2, 3)) * scaling
    if softcap is not None:
        attn_weights = torch.tanh(attn_weights / softcap) * softcap
    if attention_mask is not None:
        attn_weights = attn_weights + attention_mask
    attn_weights = torch.nn.functional.softmax(attn_weights, dim=-1)
    attn_output = torch.matmul(attn_weights, value_states).transpose(1, 2).contiguous()
    return attn_output, attn_weights


@contextlib.contextmanager
def one_thread():
    """Run on one intra-op thread, restored on exit: the numbers then do not depend on the
    machine's core count, and the run does not stall when other processes load the cores
    (2 cores under load: 44 s with two OpenMP threads, 9 s with one)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


@contextlib.contextmanager
def exact_float64():
    """Patch transformers' float32 round trips (see the module docstring); restored on exit."""
    saved = []

    def patch(owner, name, value):
        saved.append((owner, name, getattr(owner, name)))
        setattr(owner, name, value)

    gemma_style = {"gemma", "gemma2", "gemma3"}
    try:
        for family in ["llama", "mistral", "qwen2", "qwen3", "phi3", "gemma", "gemma2", "gemma3", "mixtral",
                       "qwen2_moe", "qwen3_moe"]:
            module = importlib.import_module(f"transformers.models.{family}.modeling_{family}")
            for name, cls in list(vars(module).items()):
                if isinstance(cls, type) and name.endswith("RMSNorm"):
                    patch(cls, "forward", exact_gemma_rmsnorm_forward if family in gemma_style
                          else exact_rmsnorm_forward)
                elif isinstance(cls, type) and name.endswith("TopKRouter"):
                    patch(cls, "forward", exact_router_forward)
        gemma2 = importlib.import_module("transformers.models.gemma2.modeling_gemma2")
        patch(gemma2, "eager_attention_forward", _eager_attention_float64)
        yield
    finally:
        for owner, name, value in reversed(saved):
            setattr(owner, name, value)


def make_dense_model(family: str, seed: int = WEIGHT_SEED):
    """A float64 model of `family` with every parameter drawn from one seeded generator.

    In `named_parameters()` order (tied tensors once): biases 0.1 * N(0, 1) (LayerNorm biases
    included), norm gains 1 + 0.3 * N(0, 1) (Gemma norms compute x * (1 + w): random either
    way), every other weight N(0, 1) / sqrt(its last dimension).
    """
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_config(make_config(family)).to(torch.float64).eval()
    if family in MOE:
        model.set_experts_implementation("eager")  # grouped_mm has no float64 kernel
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=generator, dtype=torch.float64)
            if name.endswith("bias"):
                p.copy_(0.1 * noise)
            elif "norm" in name or ".ln_" in name:
                p.copy_(1 + 0.3 * noise)
            else:
                p.copy_(noise / math.sqrt(p.shape[-1]))
    return model


def token_ids(shape: tuple[int, int], seed: int, vocab: int) -> torch.Tensor:
    """Seeded token ids in [3, vocab): no pad/bos/eos ids."""
    return torch.randint(3, vocab, shape, generator=torch.Generator().manual_seed(seed))


@dataclass
class Result:
    logits: torch.Tensor  # float64 [*EVAL_SHAPE, vocab]; `tensors` stores part of it
    spectra: torch.Tensor  # float64, every boundary's eigenvalues concatenated
    record: dict  # the JSON part


def settings_of(case: Case, model) -> dict:
    """The case's settings in today's terms (its stored definition keeps the words of when it was made).

    A case is the paper's algorithm unless it names a method; `sparsity` is the paper's slicing
    (the hidden width's share removed) except for the default method pruning MLP neurons, where
    it was the share of the decoder layers' weights removed: that is the `size` of the same count.
    The head options map to `head`, `mlp_width` to `neurons`, `parameters` to `size`; the default
    method keeps one MLP neuron count per layer (`allocation` "equal"), as it did when they were made."""
    options = dict(case.options)
    recipe = options.pop("method", "paper")
    settings: dict = {"recipe": recipe}
    neurons = options.pop("mlp_width", None)
    if neurons is not None:
        settings["neurons"] = neurons
    if options.pop("keep_tied_head", True) is False:
        settings["head"] = "untied"
    if options.pop("slice_head", False):
        settings["head"] = "sliced"
    if options.pop("fit_tied_head", False):
        settings["head"] = "fit"
    parameters = options.pop("parameters", None)
    if parameters is not None:
        settings["size"] = parameters
    elif recipe == "default" and neurons is None and case.family in NEURONS:
        dense = sum(p.numel() for p in model.parameters())
        layer_weights = sum(p.numel() for p in model.model.layers.parameters())
        settings["size"] = (dense - int(case.sparsity * layer_weights) + 0.5) / dense  # int(size * dense) exactly
    else:
        settings["slicing"] = case.sparsity
        if recipe == "default" and neurons is None:
            settings["neurons"] = "off"  # a family without MLP neurons: the stream alone, as then
    if recipe == "default" and settings.get("neurons") != "off":
        settings["allocation"] = "equal"  # the cases predate measured allocation: one neuron count per layer
    settings.update(options)
    return settings


def run_case(case: Case) -> Result:
    """Build, slice and evaluate one case (raises SliceGPTError where slicegpt refuses it)."""
    import slicegpt

    with exact_float64(), one_thread():
        model = make_dense_model(case.family)
        vocab = model.config.get_text_config().vocab_size
        calibration = token_ids(CALIBRATION_SHAPE, CALIBRATION_SEED, vocab)
        eval_ids = token_ids(EVAL_SHAPE, EVAL_SEED, vocab)
        sliced, config = slicegpt.slice_model(model, None, calibration, progress=False, batch_size=4,
                                              **settings_of(case, model))
        with torch.no_grad():
            logits = sliced(input_ids=eval_ids, use_cache=False).logits.detach().to(torch.float64).contiguous()
    spectra = [s.detach().to("cpu", torch.float64).reshape(-1) for s in config.spectra]
    record = {
        "parameters_dense": config.parameters_dense,
        "parameters_sliced": config.parameters_sliced,
        "sliced_hidden_size": config.sliced_hidden_size,
        "tied_head": config.tied_head,
        "spectra_lengths": [len(s) for s in spectra],
        "state_dict": sorted(f"{k}: {list(v.shape)}" for k, v in sliced.state_dict().items()),
    }
    if config.standard:
        record["deviations"] = len(config.deviations)
        record["max_logit_deviation"] = config.max_logit_deviation
    return Result(logits, torch.cat(spectra) if spectra else torch.zeros(0, dtype=torch.float64), record)


def tensors(case: Case, result: Result) -> dict[str, torch.Tensor]:
    """What golden.safetensors keeps of one case, by key."""
    return {
        f"logits/{case.name}": result.logits[..., LOGIT_COLUMNS].contiguous(),
        f"logsumexp/{case.name}": torch.logsumexp(result.logits, dim=-1).contiguous(),
        f"spectra/{case.name}": result.spectra.contiguous(),
    }


def describe(case: Case) -> dict:
    """The case's definition as stored in golden.json (the test checks it is unchanged)."""
    return {"family": case.family, "sparsity": case.sparsity, "options": dict(sorted(case.options.items()))}
