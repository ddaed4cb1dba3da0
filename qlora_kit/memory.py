"""Memory: the peak a process reached, what is still free, and sizes in bytes as people read them."""

from __future__ import annotations

import resource
import sys

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
    return _proc_kib("/proc/meminfo", "MemAvailable:") if device.type == "cpu" else None


def _proc_kib(path: str, field: str) -> int | None:
    """A `field: N kB` line of a Linux /proc file, in bytes; None elsewhere."""
    try:
        with open(path) as lines:
            return next((int(line.split()[1]) * 1024 for line in lines if line.startswith(field)), None)
    except OSError:
        return None


def human_bytes(n: float, unit: str | None = None, digits: int = 1) -> str:
    """`n` bytes in the largest binary unit below it (B to GiB), or in `unit` (tables that align their figures)."""
    units = ("B", "KiB", "MiB", "GiB")
    if unit is None:
        unit = next((u for i, u in enumerate(units) if n < 1024 ** (i + 1)), "GiB")
    return f"{n / 1024 ** units.index(unit):.{digits}f} {unit}"
