"""Training metrics: one JSON object per logged optimizer step in `metrics.jsonl`, and peak memory."""

from __future__ import annotations

import ctypes
import json
import resource
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import torch


def peak_memory_bytes(device: torch.device) -> int:
    """Peak memory of this process: max allocated on CUDA; peak resident set size on CPU.

    On Linux this reads VmHWM: `ru_maxrss` survives `execve`, so a process started by a large parent would
    report the parent's peak as its own.
    """
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device)
    peak = _proc_kib("/proc/self/status", "VmHWM:")
    if peak is not None:
        return peak
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return rss if sys.platform == "darwin" else rss * 1024  # Linux reports KiB, macOS bytes


def available_memory_bytes(device: torch.device) -> int | None:
    """Memory a new allocation can still get: free GPU memory, or MemAvailable on Linux; None if unknown."""
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    return _proc_kib("/proc/meminfo", "MemAvailable:")


def _proc_kib(path: str, field: str) -> int | None:
    """A `field: N kB` line of a Linux /proc file, in bytes; None elsewhere."""
    try:
        with open(path) as lines:
            return next((int(line.split()[1]) * 1024 for line in lines if line.startswith(field)), None)
    except OSError:
        return None


def return_large_frees_to_os() -> None:
    """Have glibc serve allocations of 1 MiB and more with mmap, so freeing them gives the memory back at once.

    Streaming loops (load, merge) allocate and free tensor-sized blocks over and over. glibc's default raises
    its mmap threshold as such blocks are freed (up to 32 MiB) and then serves them from the heap, where
    fragmentation keeps freed memory resident: peak RSS then creeps up with the model's size instead of
    staying at one tensor or shard. No effect outside glibc.
    """
    _mallopt(M_MMAP_THRESHOLD, 1 << 20)


@contextmanager
def streaming_allocations() -> Iterator[None]:
    """`return_large_frees_to_os` for a streaming phase, then mmap from 4 MiB and heap trimming from 64 MiB.

    Training allocates the same activation sizes every step: served by fresh mmaps, or from heap memory that
    was trimmed and handed back, each one page-faults its memory in again, 4 KiB at a time (measured on the
    2-core CPU: a third of a SmolLM2 training step at the 1 MiB threshold). glibc's own adjustment would end at
    32 MiB, where heap fragmentation kept ~1 GB more resident (SmolLM2, 4 x 512 tokens); at 4 MiB the
    activations of common batch sizes still come from the heap.
    """
    return_large_frees_to_os()
    try:
        yield
    finally:
        _mallopt(M_MMAP_THRESHOLD, 4 << 20)
        _mallopt(M_TRIM_THRESHOLD, 64 << 20)


M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3


def _mallopt(option: int, value: int) -> None:
    try:
        ctypes.CDLL("libc.so.6").mallopt(option, value)
    except (OSError, AttributeError):
        pass


class MetricsLog:
    """Appends one JSON line per record and flushes, so a crash keeps every step logged so far."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._file = path.open("a")

    def write(self, record: dict) -> None:
        self._file.write(json.dumps(record) + "\n")
        self._file.flush()

    def close(self) -> None:
        self._file.close()


def human_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB"):
        if n < 1024:
            return f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} GiB"
