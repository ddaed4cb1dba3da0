"""Tokenised examples -> micro-batches, without computing on padding (`data.packing`).

- `padding_free` (default): a micro-batch's `micro_batch_size` examples, drawn exactly as for padded batches,
  concatenated into one row of shape (1, total tokens). Same steps, same per-example losses, no padding.
- `pack`: examples packed into rows of at most `seq_len` tokens (best-fit decreasing, planned once), and
  `micro_batch_size` rows per micro-batch: fewer, fuller steps, so another trajectory.
- `none`: right-padded (B, longest) batches of examples of similar length.

A concatenated row carries `position_ids` restarting at 0 for each example, and label IGNORE on each example's
first token (in a padded batch nothing predicts it either; here the previous example's last token would).
Every batch carries `attention_mask`, 1 on real tokens and 0 on padding: the loop counts real tokens with it,
and padded batches give it to the model. Rows with `position_ids` give the model the examples' spans and,
unless all its layers attend per example from them, a block-diagonal causal mask instead (`forward_inputs`).
"""

from __future__ import annotations

import math
from bisect import bisect_left, insort
from collections.abc import Iterator, Sequence
from functools import partial
from typing import Any

import torch
from datasets import Dataset
from torch import nn
from torch.utils.data import DataLoader, Sampler
from torch.utils.data import Dataset as TorchDataset

from qlora_kit.attention import SEGMENTS, needs_block_mask
from qlora_kit.formats import IGNORE

Example = dict[str, Any]  # input_ids, labels (lists of ints), length


def build_loader(examples: Dataset, packing: str, micro_batch_size: int, seq_len: int, pad_id: int, seed: int,
                 shuffle: bool = True) -> DataLoader:
    """The loader for one `data.packing` layout, over `load_examples`' dataset (which has a `length` column)."""
    # The loader's own generator: each `iter(loader)` draws a seed from it, which would otherwise come from the
    # global RNG and shift dropout masks between a run and its resumed copy.
    generator = torch.Generator().manual_seed(seed)
    lengths = list(examples["length"])
    if packing == "none":
        return DataLoader(examples, batch_sampler=LengthGroupedBatches(lengths, micro_batch_size, seed, shuffle),
                          collate_fn=partial(collate, pad_id=pad_id), generator=generator)
    if packing == "pack":
        rows = PackedRows(examples, pack_rows(lengths, seq_len))
        return DataLoader(rows, batch_size=micro_batch_size, sampler=EpochShuffle(len(rows), seed, shuffle),
                          generator=generator, collate_fn=partial(collate_rows, pad_id=pad_id))
    return DataLoader(examples, batch_size=micro_batch_size, sampler=EpochShuffle(len(examples), seed, shuffle),
                      generator=generator, collate_fn=collate_padding_free)


def collate(examples: Sequence[Example], pad_id: int) -> dict[str, torch.Tensor]:
    """Right-pad a micro-batch to its longest example."""
    width = max(len(e["input_ids"]) for e in examples)
    batch = {
        "input_ids": torch.full((len(examples), width), pad_id, dtype=torch.long),
        "labels": torch.full((len(examples), width), IGNORE, dtype=torch.long),
        "attention_mask": torch.zeros((len(examples), width), dtype=torch.long),
    }
    for i, e in enumerate(examples):
        n = len(e["input_ids"])
        batch["input_ids"][i, :n] = torch.tensor(e["input_ids"])
        batch["labels"][i, :n] = torch.tensor(e["labels"])
        batch["attention_mask"][i, :n] = 1
    return batch


def collate_padding_free(examples: Sequence[Example]) -> dict[str, torch.Tensor]:
    """All examples of a micro-batch in one row: nothing to pad."""
    return collate_rows([examples], pad_id=0)


def collate_rows(rows: Sequence[Sequence[Example]], pad_id: int) -> dict[str, torch.Tensor]:
    """Each row the concatenation of its examples, right-padded to the longest row.

    Padding gets positions 0, 1, ... too, which makes it a block of its own: real tokens never attend to it,
    and its own attention rows are never empty (an empty row would give NaN in SDPA).
    """
    width = max(sum(len(e["input_ids"]) for e in row) for row in rows)
    batch = {key: torch.full((len(rows), width), fill, dtype=torch.long)
             for key, fill in (("input_ids", pad_id), ("labels", IGNORE), ("position_ids", 0), ("attention_mask", 0))}
    for r, row in enumerate(rows):
        start = 0
        for e in row:
            end = start + len(e["input_ids"])
            batch["input_ids"][r, start:end] = torch.tensor(e["input_ids"])
            batch["labels"][r, start + 1:end] = torch.tensor(e["labels"][1:], dtype=torch.long)
            batch["position_ids"][r, start:end] = torch.arange(end - start)
            batch["attention_mask"][r, start:end] = 1
            start = end
        batch["position_ids"][r, start:] = torch.arange(width - start)
    return batch


def forward_inputs(batch: dict[str, torch.Tensor], model: nn.Module | None = None) -> dict[str, Any]:
    """The model's keyword arguments for a batch: padded batches as they are; rows of concatenated examples with
    their position ids, the examples' spans, and a block-diagonal causal mask unless `model` does without it.

    Position ids alone do not keep examples apart reliably: transformers derives the block mask from them only
    when the model runs without a KV cache; with `use_cache` on (e.g. a model loaded with its own config) the
    second example attends to the first. An explicit (B, 1, T, T) boolean mask, which SDPA takes as it is, works
    either way. It costs T^2 bytes per micro-batch, e.g. 64 MiB for 4 examples of 2,048 tokens.

    A `model` whose every layer attends per example from the spans (`attention.needs_block_mask`) gets no block
    mask, and an all-ones 2D mask: given zeros (padding) or, with `use_cache` off, no 2D mask, transformers would
    build a (T x T) mask itself, where the spans already say where each row's examples and padding are.
    Without `model`, rows get the block mask.
    """
    if "position_ids" not in batch:
        return {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}
    inputs = {"input_ids": batch["input_ids"], "position_ids": batch["position_ids"], SEGMENTS: example_spans(batch)}
    if model is not None and not needs_block_mask(model):
        return inputs | {"attention_mask": torch.ones_like(batch["attention_mask"])}
    return inputs | {"attention_mask": block_causal_mask(batch["position_ids"])}


def example_spans(batch: dict[str, torch.Tensor]) -> tuple[tuple[tuple[int, int], ...], ...]:
    """Per row, the (start, end) of each concatenated example: where `attention.segment_sdpa` cuts the row."""
    spans = []
    for positions, real in zip(batch["position_ids"].tolist(), batch["attention_mask"].sum(-1).tolist(), strict=True):
        starts = [i for i in range(real) if positions[i] == 0]
        spans.append(tuple(zip(starts, starts[1:] + [real], strict=True)))
    return tuple(spans)


def block_causal_mask(position_ids: torch.Tensor) -> torch.Tensor:
    """(B, 1, T, T) boolean, True where query i may attend to key j: same example (a block starts at position 0)
    and j <= i."""
    block = (position_ids == 0).cumsum(-1)
    t = position_ids.shape[-1]
    causal = torch.ones(t, t, dtype=torch.bool, device=position_ids.device).tril()
    return ((block[:, :, None] == block[:, None, :]) & causal)[:, None]


def padded_positions(batch: dict[str, torch.Tensor]) -> int:
    """Token positions padded batches of the same examples would fill: examples x the longest; for the padding
    report."""
    if "position_ids" not in batch:
        return batch["input_ids"].numel()
    real = batch["attention_mask"].bool()
    examples = int(((batch["position_ids"] == 0) & real).sum())
    return examples * (int(batch["position_ids"][real].max()) + 1)


class EpochShuffle(Sampler[int]):
    """A random order that is a pure function of (seed, epoch): a resumed run replays any epoch's order exactly,
    where a shared generator's order would depend on how many epochs this process happened to run."""

    def __init__(self, n: int, seed: int, shuffle: bool = True) -> None:
        self.n, self.seed, self.shuffle, self.epoch = n, seed, shuffle, 0

    def set_epoch(self, epoch: int) -> None:  # called by accelerate's `DataLoaderShard.set_epoch`
        self.epoch = epoch

    def __len__(self) -> int:
        return self.n

    def __iter__(self) -> Iterator[int]:
        if not self.shuffle:
            return iter(range(self.n))
        return iter(torch.randperm(self.n, generator=torch.Generator().manual_seed(self.seed + self.epoch)).tolist())


class LengthGroupedBatches(Sampler[list[int]]):
    """Padded batches of similar-length examples: shuffle, sort each window of 64 batches' worth of examples by
    length, cut it into batches, shuffle the batches. Padding drops to a few percent; batches stay random.

    Each pass reshuffles with `seed + pass number`; every process makes the same passes, so they agree.
    """

    WINDOW = 64  # batches per sorting window: larger sorts better, smaller keeps batches more random

    def __init__(self, lengths: Sequence[int], batch_size: int, seed: int, shuffle: bool = True) -> None:
        self.lengths, self.batch_size, self.seed, self.shuffle = list(lengths), batch_size, seed, shuffle
        self.drop_last = False  # read by accelerate when it shards batches across processes
        self.passes = 0

    def __len__(self) -> int:
        return math.ceil(len(self.lengths) / self.batch_size)

    def set_epoch(self, epoch: int) -> None:  # makes the order of a pass a function of (seed, epoch) for resuming
        self.passes = epoch

    def __iter__(self) -> Iterator[list[int]]:
        generator = torch.Generator().manual_seed(self.seed + self.passes)
        self.passes += 1
        n, size = len(self.lengths), self.WINDOW * self.batch_size
        order = torch.randperm(n, generator=generator).tolist() if self.shuffle else list(range(n))
        batches = []
        for w in range(0, n, size):
            window = sorted(order[w:w + size], key=self.lengths.__getitem__)
            batches += [window[i:i + self.batch_size] for i in range(0, len(window), self.batch_size)]
        if self.shuffle:
            batches = [batches[i] for i in torch.randperm(len(batches), generator=generator).tolist()]
        return iter(batches)


def pack_rows(lengths: Sequence[int], seq_len: int) -> list[list[int]]:
    """Example indices grouped into rows of at most `seq_len` tokens, by best-fit decreasing.

    Longest first, each example goes to the row it leaves least room in: rows come out nearly full, where
    filling them in data order wastes up to half a row at each boundary. Deterministic; the loader shuffles rows.
    """
    free: list[tuple[int, int]] = []  # (free tokens, row), sorted
    rows: list[list[int]] = []
    for i in sorted(range(len(lengths)), key=lambda i: -lengths[i]):
        k = bisect_left(free, (lengths[i], -1))
        if k == len(free):
            rows.append([])
            room, row = seq_len, len(rows) - 1
        else:
            room, row = free.pop(k)
        rows[row].append(i)
        insort(free, (room - lengths[i], row))
    return rows


class PackedRows(TorchDataset):
    """Rows of examples, as planned by `pack_rows`; item i is the list of row i's examples."""

    def __init__(self, examples: Sequence[Example], rows: list[list[int]]) -> None:
        self.examples, self.rows = examples, rows

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, i: int) -> list[Example]:
        return [self.examples[j] for j in self.rows[i]]
