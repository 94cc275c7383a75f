"""Speed of dense and sliced models side by side: prefill throughput, decode latency, memory.

Prefill is what a prompt costs (tokens/s over whole sequences, logits for the last position
only, as `generate` does); decode is what every further token costs with the KV cache
(milliseconds per generated token after the prompt is cached). The paper code's users found
a sliced Llama-2-7B *decoding slower* than the dense one (the skip-connection matmuls and odd
widths), so both are measured. Memory is the peak above the process's memory before the
measurement (allocator peak on CUDA), next to the bytes of the model's weights.

GGUF files are measured where they run, in real llama.cpp (`gguf_speed`, node-llama-cpp's CPU
build): PyTorch's speed of a sliced model says little about llama.cpp's, whose kernels and
memory traffic differ. Each speedup there comes with its cheap limit (`gguf_limits`).
"""

from __future__ import annotations

import inspect
import os
import statistics
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import torch
from torch import nn
from tqdm.auto import tqdm

from slicegpt.errors import SliceGPTError
from slicegpt.evaluation.measure import measure
from slicegpt.formats.llama_cpp import node_llama_cpp_version, run_node_script


@dataclass
class SpeedRow:
    model: str
    phase: str  # "prefill" or "decode"
    batch: int
    seqlen: int  # prompt length
    tokens_per_second: float
    ms_per_token: float  # per sequence position: decode latency, or prefill time / seqlen
    peak_bytes: int  # peak working memory above the start of the measurement
    weight_bytes: int

    def to_dict(self) -> dict:
        return asdict(self)


def weight_bytes(model: nn.Module) -> int:
    return sum(p.numel() * p.element_size() for p in model.parameters())


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def _prompt(model: nn.Module, batch: int, seqlen: int, seed: int = 0) -> torch.Tensor:
    vocab = model.get_input_embeddings().weight.shape[0]
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(3, vocab, (batch, seqlen), generator=generator)


@torch.no_grad()
def prefill(model: nn.Module, batch: int, seqlen: int, repeats: int = 3) -> tuple[float, int]:
    """(median seconds of one prefill of [batch, seqlen] tokens, peak working bytes)."""
    device = next(model.parameters()).device
    ids = _prompt(model, batch, seqlen).to(device)
    model(input_ids=ids, use_cache=False, logits_to_keep=1)  # warm-up
    times = []
    with measure(str(device)) as m:
        for _ in range(repeats):
            _sync(device)
            start = time.perf_counter()
            model(input_ids=ids, use_cache=False, logits_to_keep=1)
            _sync(device)
            times.append(time.perf_counter() - start)
    return statistics.median(times), m.peak_bytes - m.start_bytes


def cache_keyword(model: nn.Module) -> str:
    """The name under which this transformers version's forward takes the KV cache.

    transformers 5 renamed `past_key_values` to `cache` (outputs too) and warns on the old name
    (a FutureWarning on every call); older 5.x releases know only `past_key_values`.
    """
    return "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"


@torch.no_grad()
def decode(model: nn.Module, batch: int, seqlen: int, new_tokens: int = 32, repeats: int = 3) -> tuple[float, int]:
    """(median seconds per generated token with the KV cache after a [batch, seqlen] prompt, peak bytes)."""
    device = next(model.parameters()).device
    ids = _prompt(model, batch, seqlen).to(device)
    keyword = cache_keyword(model)
    times = []
    with measure(str(device)) as m:
        for _ in range(repeats + 1):  # the first round warms up
            out = model(input_ids=ids, use_cache=True, logits_to_keep=1)
            cache, token = out[keyword], out.logits[:, -1:].argmax(-1)
            _sync(device)
            start = time.perf_counter()
            for _ in range(new_tokens):
                out = model(input_ids=token, use_cache=True, **{keyword: cache})
                cache, token = out[keyword], out.logits[:, -1:].argmax(-1)
            _sync(device)
            times.append((time.perf_counter() - start) / new_tokens)
    return statistics.median(times[1:]), m.peak_bytes - m.start_bytes


def speed_report(models: list[tuple[str, nn.Module]], batch_sizes: list[int], seqlens: list[int],
                 decode_tokens: int = 32, repeats: int = 3, progress: bool = True) -> list[SpeedRow]:
    """Every model at every (batch, seqlen): prefill, then decode after that prompt.

    The models run in turns within each setting, so slow drifts of the machine (thermal,
    other load) hit all of them alike.
    """
    rows: list[SpeedRow] = []
    settings = [(b, s) for b in batch_sizes for s in seqlens]
    with tqdm(total=len(settings) * len(models), desc="speed", unit="run", disable=not progress) as bar:
        for batch, seqlen in settings:
            for name, model in models:
                seconds, peak = prefill(model, batch, seqlen, repeats)
                rows.append(SpeedRow(name, "prefill", batch, seqlen, batch * seqlen / seconds,
                                     1000 * seconds / seqlen, peak, weight_bytes(model)))
                per_token, peak = decode(model, batch, seqlen, decode_tokens, repeats)
                rows.append(SpeedRow(name, "decode", batch, seqlen, batch / per_token, 1000 * per_token, peak,
                                     weight_bytes(model)))
                bar.update()
    return rows


QUICK_PROMPT, QUICK_DECODE_TOKENS = 128, 16


def quick_speed(role: str, model: nn.Module, repeats: int = 3) -> list[dict]:
    """Batch 1, a 128-token prompt, 16 decoded tokens: the speed check `slice --report-bench` adds.

    Cheap (a few hundred tokens of work next to the ~65k that calibration and evaluation cost),
    but the dense model is measured before slicing and the sliced one after, not in turns, so
    on a shared machine load changes between the two show up as speedups; hence opt-in, and
    `slicegpt bench --save` remains the measurement to trust.
    """
    seqlen = min(QUICK_PROMPT, getattr(model.config, "max_position_embeddings", None) or QUICK_PROMPT)
    rows = speed_report([(role, model)], [1], [seqlen], QUICK_DECODE_TOKENS, repeats, progress=False)
    return [dict(r.to_dict(), role=role) for r in rows]


# ---------------------------------------------------------------------------------------------
# GGUF files in real llama.cpp (where sliced models are run), batch 1, as llama-bench measures:
# prompt processing (pp: the prompt in one batch) and generation (tg: one token at a time).

GGUF_SEQLENS = (128, 512)


@dataclass
class GGUFSpeedRow:
    """One file at one prompt length in llama.cpp; phase and figures named as SpeedRow's, so
    `slicegpt report` reads both kinds of record alike."""

    model: str  # the file
    phase: str  # "prefill" (prompt processing) or "decode" (generation after the prompt)
    batch: int  # 1
    seqlen: int  # prompt length
    tokens_per_second: float  # median over the turns
    ms_per_token: float  # prefill: prompt time / seqlen; decode: time per generated token
    file_bytes: int
    seconds: list[float]  # every turn's time (the whole prompt, or all generated tokens)
    role: str = "model"  # "dense" or "sliced" in a comparison
    speedup: float | None = None  # against the dense file, same phase and prompt (the dense file: 1.0)
    limit: float | None = None  # the most that speedup could be, from gguf_limits (the dense file: 1.0)

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass
class GGUFSpeed:
    """What one llama.cpp run measured, and with what."""

    rows: list[GGUFSpeedRow]
    llama_cpp: str  # the llama.cpp release node-llama-cpp was built from
    node_llama_cpp: str
    threads: int
    limits: dict[str, float] = field(default_factory=dict)  # by phase, in a comparison


def _magic(path: Path) -> bytes:
    with open(path, "rb") as f:
        return f.read(4)


def check_gguf(path: str | Path, what: str = "model") -> Path:
    """`path` as a GGUF file, or one SliceGPTError line saying why not (checked before llama.cpp starts)."""
    path = Path(path)
    if not path.exists():
        raise SliceGPTError(f"{what} {path}: no such file")
    if not path.is_file() or _magic(path) != b"GGUF":
        raise SliceGPTError(f"{what} {path} is not a GGUF file; llama.cpp measures .gguf files only "
                            f"(`slicegpt export MODEL --out FILE.gguf` writes one)")
    return path


def gguf_speed(files: list[str | Path], seqlens: list[int] | tuple[int, ...] = GGUF_SEQLENS,
               generate_tokens: int = 32, repeats: int = 3, threads: int | None = None,
               seed: int = 0) -> GGUFSpeed:
    """Prompt processing and generation speed of GGUF files in llama.cpp, batch 1.

    One node process loads every file once and measures them in alternating turns (a, b, a, b,
    ... `repeats` times per prompt length, after one warm-up turn each), so load changes on a
    shared machine hit all files alike; the figures are medians. The prompt is `seqlen` random
    token ids (seeded: the same ids for every file), generation greedy after it.
    """
    paths = [check_gguf(f) for f in files]
    threads = threads or os.cpu_count() or 1
    result = run_node_script("llama_cpp_speed.mjs", {
        "files": [str(p.resolve()) for p in paths], "seqlens": list(seqlens), "generate": generate_tokens,
        "repeats": repeats, "threads": threads, "seed": seed})
    rows = []
    for r in result["results"]:
        path = paths[r["index"]]
        size, seqlen = path.stat().st_size, r["seqlen"]
        prompt = statistics.median(r["prompt_seconds"])
        rows.append(GGUFSpeedRow(str(path), "prefill", 1, seqlen, seqlen / prompt, 1000 * prompt / seqlen, size,
                                 r["prompt_seconds"]))
        per_token = statistics.median(r["generate_seconds"]) / max(r["generated"], 1)
        rows.append(GGUFSpeedRow(str(path), "decode", 1, seqlen, 1 / per_token, 1000 * per_token, size,
                                 r["generate_seconds"]))
    return GGUFSpeed(rows, str(result.get("llama_cpp", "?")), node_llama_cpp_version(), int(result.get("threads") or threads))


def weight_multiply_adds(path: str | Path, head: bool = True) -> int:
    """Multiply-adds of a GGUF model's weight matrices per token: what bounds prompt processing.

    Every matrix counts once except the token embedding (a lookup), which counts when it is also
    the output head (no output.weight); MoE experts count by the share of experts a token uses.
    `head=False` leaves the output head out: a prompt computes logits at its last position only.
    Attention over the prompt (scores and weighted sums) is left out: it shrinks only when heads
    are removed, so for other slices the ratio of these counts bounds the prompt speedup from above.
    """
    from gguf import GGUFReader

    reader = GGUFReader(str(path))
    fields = reader.fields
    arch = fields["general.architecture"].contents() if "general.architecture" in fields else ""
    used, experts = fields.get(f"{arch}.expert_used_count"), fields.get(f"{arch}.expert_count")
    share = used.contents() / experts.contents() if used is not None and experts is not None else 1.0
    names = {t.name for t in reader.tensors}
    total = 0.0
    for t in reader.tensors:
        if len(t.shape) < 2 or (t.name == "token_embd.weight" and "output.weight" in names):
            continue
        if not head and (t.name == "output.weight" or (t.name == "token_embd.weight" and "output.weight" not in names)):
            continue
        total += int(t.n_elements) * (share if "_exps." in t.name else 1.0)
    return int(total)


def gguf_limits(dense: str | Path, sliced: str | Path) -> dict[str, float]:
    """How much faster the sliced file could be at most, cheaply: generation reads every weight
    once per token (bound by memory bandwidth: the file sizes' ratio); prompt processing is bound
    by arithmetic (the weight multiply-adds' ratio, the head left out: logits of the last position only)."""
    return {"decode": Path(dense).stat().st_size / Path(sliced).stat().st_size,
            "prefill": weight_multiply_adds(dense, head=False) / weight_multiply_adds(sliced, head=False)}


def gguf_bench(model: str | Path, compare: str | Path | None = None,
               seqlens: list[int] | tuple[int, ...] = GGUF_SEQLENS, generate_tokens: int = 32, repeats: int = 3,
               threads: int | None = None) -> GGUFSpeed:
    """`slicegpt bench FILE.gguf [--compare DENSE.gguf]`: the sliced file beside its dense one in one
    llama.cpp run (dense first in every round), each speedup next to its limit."""
    model = check_gguf(model)
    dense = check_gguf(compare, "--compare") if compare is not None else None
    if dense is not None and dense.resolve() == model.resolve():
        raise SliceGPTError(f"--compare {dense} is the file being measured; give the dense model's GGUF file")
    result = gguf_speed(([dense] if dense else []) + [model], seqlens, generate_tokens, repeats, threads)
    if dense is None:
        return result
    result.limits = gguf_limits(dense, model)
    base = {(r.phase, r.seqlen): r for r in result.rows if r.model == str(dense)}
    rows = []
    for r in result.rows:
        ref, is_dense = base[(r.phase, r.seqlen)], r.model == str(dense)
        speedup = r.tokens_per_second / ref.tokens_per_second  # decode: ms ratio, the same number
        rows.append(replace(r, role="dense" if is_dense else "sliced", speedup=speedup,
                            limit=1.0 if is_dense else result.limits[r.phase]))
    result.rows = rows
    return result
