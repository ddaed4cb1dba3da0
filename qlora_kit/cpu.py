"""Training on the CPU: the speed paths only a CPU takes, behind one switch, and the host allocator's tuning.

On a CPU, dequantizing costs a real share of a matmul and a random number per dropout entry costs as much as
the matmul it feeds; on a GPU both are cheap and memory is not. So the CPU takes three shortcuts, each cheap in
memory, that GPUs do not:

- double-quantized block scales are decoded once per weight and kept with its quant state (`nf4.dequantize`);
- the recompute of a checkpointed layer keeps its dequantized weights for the backward (`fused.lora_4bit`), one
  layer's worth at a time, instead of dequantizing a third time;
- dropout draws the gaps between dropped entries (`dropped_indices`) instead of one number per entry.

`SPEEDUPS = False` makes the CPU run exactly the GPU's code path: tests use it to check on the CPU what a GPU
would hold in memory, and reading the GPU path means reading the code with these branches skipped.
"""

from __future__ import annotations

import ctypes
import math
from collections.abc import Iterator
from contextlib import contextmanager

import torch

SPEEDUPS = True


def speedups(device: torch.device) -> bool:
    """Whether the CPU-only shortcuts apply to tensors on `device`."""
    return SPEEDUPS and device.type == "cpu"


def dropped_indices(n: int, p: float, per_round: int | None = None) -> torch.Tensor:
    """Sorted flat indices of the entries of an n-entry tensor that dropout zeroes, each with probability p.

    The gaps between dropped entries of a Bernoulli(p) sequence are i.i.d. geometric(p), so drawing the gaps
    (floor(log(1-U) / log(1-p)) + 1, U uniform in [0, 1)) gives exactly `bernoulli_`'s distribution from ~p*n
    random numbers instead of n, and p*n indices are cheaper to apply than a mask. U is a float32 (a multiple of
    2^-24 below 1, so log(1-U) is finite and float32's vectorised log applies): only gaps of probability < 2^-24
    are cut short. `per_round`: gaps drawn at a time (default: enough to cover the tensor in one round but for a
    6-sigma shortfall).
    """
    log_keep = math.log1p(-p)
    chunks, last = [], -1  # `last`: position of the last dropped entry so far
    while True:
        expected = (n - last) * p
        k = per_round or int(expected + 6 * math.sqrt(expected) + 16)
        gaps = torch.rand(k).neg_().log1p_().div_(log_keep)  # log(1 - U) / log(1 - p) >= 0: truncating floors
        positions = gaps.to(torch.int64).add_(1).cumsum_(0).add_(last)
        inside = int(torch.searchsorted(positions, n))  # sorted: the first `inside` are < n
        chunks.append(positions[:inside])
        if inside < k:
            return chunks[0] if len(chunks) == 1 else torch.cat(chunks)
        last = int(positions[-1])


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
    was trimmed and handed back, each one page-faults its memory in again, 4 KiB at a time. glibc's own
    adjustment would end at 32 MiB, where heap fragmentation keeps more memory resident; at 4 MiB the
    activations of common batch sizes still come from the heap (docs/performance.md has the measurements).
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
