"""Speed of dense and sliced models side by side: prefill throughput, decode latency, memory.

Prefill is what a prompt costs (tokens/s over whole sequences, logits for the last position
only, as `generate` does); decode is what every further token costs with the KV cache
(milliseconds per generated token after the prompt is cached). The paper code's users found
a sliced Llama-2-7B *decoding slower* than the dense one (the skip-connection matmuls and odd
widths), so both are measured. Memory is the peak above the process's memory before the
measurement (allocator peak on CUDA), next to the bytes of the model's weights.
"""

from __future__ import annotations

import inspect
import statistics
import time
from dataclasses import asdict, dataclass

import torch
from torch import nn
from tqdm.auto import tqdm

from slicegpt.evaluation.measure import measure


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
