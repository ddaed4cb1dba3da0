"""Next-token cross-entropy, summed over the label positions of a batch.

Returning the sum and the token count (not the mean) lets the training loop normalise by the number of label
tokens in the whole optimizer step, across micro-batches and processes, so every token weighs the same
whatever the padding, the accumulation or the number of GPUs.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from qlora_kit.batching import forward_inputs
from qlora_kit.formats import IGNORE


def token_loss_sum(model: nn.Module, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, int]:
    """(sum of per-token losses, number of label tokens). Only label positions are upcast to fp32.

    Works on every `data.packing` layout: in concatenated rows each example's first label is IGNORE, so the shift
    by one never makes an example predict the next one's first token.
    """
    logits = model(**forward_inputs(batch)).logits
    targets = batch["labels"][:, 1:]
    mask = targets != IGNORE
    picked = logits[:, :-1][mask].float()
    return F.cross_entropy(picked, targets[mask], reduction="sum"), int(mask.sum())
