"""Wall time and peak memory of a piece of work (process RSS on CPU, allocator peak on CUDA)."""

from __future__ import annotations

import resource
import time
from contextlib import contextmanager
from dataclasses import dataclass

import torch


def _read_status_kib(key: str = "VmHWM") -> int | None:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(f"{key}:"):
                    return int(line.split()[1])
    except OSError:
        return None
    return None


@dataclass
class Measurement:
    seconds: float = 0.0
    peak_bytes: int = 0
    start_bytes: int = 0  # memory in use when the block started (RSS, or CUDA allocated)


@contextmanager
def measure(device: str = "cpu"):
    """Time the block and record its peak memory; the peak counts from the block's start on Linux."""
    result = Measurement()
    cuda = str(device).startswith("cuda") and torch.cuda.is_available()
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        result.start_bytes = torch.cuda.memory_allocated()
    else:
        try:  # writing 5 to clear_refs resets the peak RSS (VmHWM) to the current RSS
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")
        except OSError:
            pass
        result.start_bytes = 1024 * (_read_status_kib("VmRSS") or 0)
    start = time.perf_counter()
    try:
        yield result
    finally:
        if cuda:
            torch.cuda.synchronize()
            result.peak_bytes = torch.cuda.max_memory_allocated()
        else:
            hwm = _read_status_kib("VmHWM")
            result.peak_bytes = 1024 * (hwm if hwm is not None else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)
        result.seconds = time.perf_counter() - start
