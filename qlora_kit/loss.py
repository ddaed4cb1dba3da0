"""Next-token cross-entropy, summed over the label positions of a batch.

Returning the sum and the token count (not the mean) lets the training loop normalise by the number of label
tokens in the whole optimizer step, across micro-batches and processes, so every token weighs the same
whatever the padding, the accumulation or the number of GPUs.

The output head runs only where a label follows (`logits_to_keep`): prompts, padding and the last position
never pay for the vocabulary projection. With a 49k vocabulary and short answers after long prompts, as in
chat data, that is most of the head's cost and most of the logits' memory.
"""

from __future__ import annotations

import inspect

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
    targets = batch["labels"][:, 1:]
    mask = targets != IGNORE
    keep = mask.any(dim=0).nonzero().squeeze(1)  # positions whose next token is a label, in any row
    if _takes_logits_to_keep(model):
        logits = model(**forward_inputs(batch), logits_to_keep=keep).logits  # (batch, len(keep), vocab)
        targets, mask = targets[:, keep], mask[:, keep]
    else:
        logits = model(**forward_inputs(batch)).logits[:, :-1]
    return F.cross_entropy(logits[mask].float(), targets[mask], reduction="sum"), int(mask.sum())


def _takes_logits_to_keep(model: nn.Module) -> bool:
    inner = getattr(model, "module", model)  # DDP wraps the model
    return "logits_to_keep" in inspect.signature(inner.forward).parameters
