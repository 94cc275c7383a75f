"""Calibration split across processes with torch.distributed: each rank a share of the tokens.

Every statistic the algorithm uses is a sum over calibration tokens (covariances, the least-squares
sums of compensation, token counts, perplexity's NLL), so ranks that each hold a share of the
samples compute partial sums and add them (`sum_`, an all-reduce in float64). What is decided from
the sums (a basis, a fitted matrix) every rank computes, then takes rank 0's result (`same`, a
broadcast), so every rank changes its copy of the layer identically, to the bit. Rank 0 writes
the output.

`Ranks()` is the single process: every call is a no-op, so the engine is written once. The
process group is torch.distributed's (set up by `torchrun` + `init`, or by the caller); a
collective that fails (a rank died, a timeout passed) becomes a one-line `SliceGPTError`.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass, field
from datetime import timedelta
from typing import Any

import torch

from slicegpt.errors import SliceGPTError

TIMEOUT_S = 1800.0  # default collective timeout: longer than the slowest rank's work between two collectives
TIMEOUT_ENV = "SLICEGPT_DIST_TIMEOUT"


def _reason(e: BaseException) -> str:
    """The backend's own words, short: its first sentence without the source location."""
    import re

    text = (str(e).strip().splitlines() or [type(e).__name__])[0]
    text = re.sub(r"^\[[^\]]*\]\s*", "", text)  # "[.../gloo/transport/tcp/pair.cc:537] "
    return text.split(". ")[0][:160]


@dataclass
class Ranks:
    """This process's place among the ranks that share one slicing job."""

    rank: int = 0
    world_size: int = 1
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))  # where collectives run
    reduced_bytes: int = 0  # float64 bytes all-reduced so far (the benchmark reports it)

    @classmethod
    def current(cls) -> "Ranks":
        """The initialised default process group, or the single process."""
        import torch.distributed as dist

        if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
            return cls()
        device = torch.device("cpu")
        if dist.get_backend() == "nccl":  # this rank's GPU: LOCAL_RANK under torchrun, else the current one
            local = os.environ.get("LOCAL_RANK")
            device = torch.device("cuda", int(local) if local is not None else torch.cuda.current_device())
        return cls(dist.get_rank(), dist.get_world_size(), device)

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    @property
    def writer(self) -> bool:
        """Whether this rank writes files (rank 0)."""
        return self.rank == 0

    def share(self, n: int) -> list[int]:
        """Which of `n` items (calibration or evaluation windows) this rank takes: every world_size-th."""
        return list(range(self.rank, n, self.world_size))

    def part(self, windows):
        """This rank's share of `windows` (`data.Windows`; itself in one process)."""
        return windows.select(self.share(len(windows)))

    # --- collectives (no-ops in one process) ---

    def _call(self, what: str, fn, *args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except SliceGPTError:
            raise
        except Exception as e:  # DistBackendError, RuntimeError from Gloo/NCCL: a peer died or timed out
            raise SliceGPTError(f"rank {self.rank}: {what} across {self.world_size} processes failed ({_reason(e)}); "
                                "another rank died, hung past the timeout or was stopped. Nothing was "
                                "published; run the same command again to resume") from None

    def sum_(self, *tensors: torch.Tensor) -> None:
        """Add each tensor over all ranks, in place, in float64."""
        if not self.distributed:
            return
        import torch.distributed as dist

        for t in tensors:
            buf = t.detach().to(self.device, torch.float64)
            self.reduced_bytes += buf.numel() * buf.element_size()
            self._call("an all-reduce", dist.all_reduce, buf, op=dist.ReduceOp.SUM)
            t.copy_(buf.to(t.device, t.dtype))

    def sum_number(self, value: float) -> float:
        if not self.distributed:
            return value
        t = torch.tensor([value], dtype=torch.float64)
        self.sum_(t)
        return float(t[0])

    def same(self, *tensors: torch.Tensor) -> None:
        """Every rank takes rank 0's values, in place (a basis, a fit: computed once, used everywhere)."""
        if not self.distributed:
            return
        import torch.distributed as dist

        for t in tensors:
            buf = t.detach().to(self.device).contiguous()
            self._call("a broadcast", dist.broadcast, buf, src=0)
            t.copy_(buf.to(t.device))

    def gather(self, obj: Any) -> list[Any]:
        """Every rank's `obj` (small, picklable), in rank order."""
        if not self.distributed:
            return [obj]
        import torch.distributed as dist

        out: list[Any] = [None] * self.world_size
        self._call("an all-gather", dist.all_gather_object, out, obj)
        return out

    def from_writer(self, obj: Any) -> Any:
        """Rank 0's `obj` on every rank."""
        if not self.distributed:
            return obj
        import torch.distributed as dist

        box = [obj if self.writer else None]
        self._call("a broadcast", dist.broadcast_object_list, box, src=0)
        return box[0]

    def on_writer(self, fn):
        """`fn()` run by rank 0 alone; every rank returns its result or raises its SliceGPTError."""
        if not self.distributed:
            return fn()
        outcome = None
        if self.writer:
            try:
                outcome = ("ok", fn())
            except SliceGPTError as e:
                outcome = ("error", str(e))
        kind, value = self.from_writer(outcome)
        if kind == "error":
            raise SliceGPTError(value, shared=True)
        return value

    def barrier(self) -> None:
        if self.distributed:
            self.gather(None)  # through the same backend and timeout as everything else

    def agree(self, arguments: dict, what: str = "arguments") -> None:
        """Refuse a job whose ranks were started with different `arguments` (before any slow work)."""
        if not self.distributed:
            return
        mine = json.loads(json.dumps(arguments, sort_keys=True, default=str))
        everyone = self.gather(mine)
        for r, theirs in enumerate(everyone):
            if theirs != everyone[0]:
                keys = sorted(k for k in set(theirs) | set(everyone[0]) if theirs.get(k) != everyone[0].get(k))
                raise SliceGPTError(f"the ranks were started with different {what}: rank {r} differs from rank 0 "
                                    f"in {', '.join(keys)}; start every rank with the same command", shared=True)

    def check_shared(self, directory: os.PathLike) -> None:
        """Every rank must see rank 0's files under `directory` (the output and its run directory)."""
        if not self.distributed:
            return
        from pathlib import Path

        token = Path(directory) / ".ranks-check"
        stamp = hashlib.sha256(os.urandom(16)).hexdigest()
        if self.writer:
            token.write_text(stamp)
        stamp = self.from_writer(stamp)
        seen = token.is_file() and token.read_text() == stamp
        blind = [r for r, ok in enumerate(self.gather(seen)) if not ok]
        self.barrier()
        if self.writer:
            token.unlink(missing_ok=True)
        if blind:
            raise SliceGPTError(f"rank {blind[0]} cannot see {directory} as rank 0 writes it: --out must be on a "
                                "filesystem that every node reads (the run's progress and output live there)",
                                shared=True)


def init(device: str, timeout_s: float | None = None) -> Ranks:
    """Join the job `torchrun` started (its environment names rank, world size and rendezvous), if any.

    NCCL for CUDA devices (each rank on GPU LOCAL_RANK), Gloo on CPUs. A single process
    (no WORLD_SIZE, or 1) gets `Ranks()` and no process group.
    """
    import torch.distributed as dist

    world = int(os.environ.get("WORLD_SIZE", "1") or 1)
    if world <= 1:
        return Ranks()
    if dist.is_initialized():
        return Ranks.current()
    timeout = timeout_s if timeout_s is not None else float(os.environ.get(TIMEOUT_ENV, TIMEOUT_S))
    cuda = str(device).startswith("cuda")
    if cuda:
        # a failed or timed-out NCCL collective raises in the calling thread (then one line),
        # instead of the watchdog aborting the process
        os.environ.setdefault("TORCH_NCCL_BLOCKING_WAIT", "1")
        local = int(os.environ.get("LOCAL_RANK", "0"))
        if local >= torch.cuda.device_count():
            raise SliceGPTError(f"local rank {local} has no GPU ({torch.cuda.device_count()} visible); "
                                "start at most one process per GPU (--nproc-per-node)")
        torch.cuda.set_device(local)
    rank = int(os.environ.get("RANK", "0"))
    try:
        dist.init_process_group("nccl" if cuda else "gloo", timeout=timedelta(seconds=timeout))
    except Exception as e:
        first = _reason(e)
        where = f"{os.environ.get('MASTER_ADDR', '?')}:{os.environ.get('MASTER_PORT', '?')}"
        raise SliceGPTError(f"rank {rank}: the {world} processes could not meet at {where} within {timeout:.0f} s "
                            f"({first}); start every rank (torchrun on every node) with the same --rdzv-endpoint"
                            ) from None
    return Ranks.current()


def finish() -> None:
    """Leave the process group this module joined (a no-op without one)."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def local_device(device: str, ranks: Ranks) -> str:
    """`cuda` means this rank's own GPU in a distributed job."""
    if ranks.distributed and device == "cuda":
        return str(ranks.device) if ranks.device.type == "cuda" else f"cuda:{torch.cuda.current_device()}"
    return device
