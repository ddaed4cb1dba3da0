"""Next-token cross-entropy, summed over the label positions of a batch.

Returning the sum and the token count (not the mean) lets the training loop normalise by the number of label
tokens in the whole optimizer step, across micro-batches and processes, so every token weighs the same
whatever the padding, the accumulation or the number of GPUs.

The output head runs only where a label follows (`logits_to_keep`): prompts, padding and the last position
never pay for the vocabulary projection. With a 49k vocabulary and short answers after long prompts, as in
chat data, that is most of the head's cost and most of the logits' memory.

When the label positions' logits would still be large (2,048 labels x a 128k vocabulary: 1 GiB in fp32, ~4 GiB
with log-softmax and gradients), the head and the loss run in chunks of `CHUNK_BYTES` of fp32 logits, each
recomputed in backward instead of kept: the memory of one chunk, for one more head matmul per chunk.
"""

from __future__ import annotations

import inspect
from collections.abc import Iterator
from contextlib import contextmanager

import torch
import torch.nn.functional as F
from torch import nn
from torch.distributed.fsdp import FullyShardedDataParallel
from torch.utils.checkpoint import checkpoint

from qlora_kit.batching import forward_inputs
from qlora_kit.formats import IGNORE

CHUNK_BYTES = 128 * 2**20  # fp32 logits per chunk: ~0.45 GiB at the peak of its backward


def token_loss_sum(model: nn.Module, batch: dict[str, torch.Tensor],
                   chunk_bytes: int = CHUNK_BYTES) -> tuple[torch.Tensor, int]:
    """(sum of per-token losses, number of label tokens). Only label positions are upcast to fp32.

    Works on every `data.packing` layout: in concatenated rows each example's first label is IGNORE, so the shift
    by one never makes an example predict the next one's first token.
    """
    targets = batch["labels"][:, 1:]
    mask = targets != IGNORE
    keep = mask.any(dim=0).nonzero().squeeze(1)  # positions whose next token is a label, in any row
    n = int(mask.sum())
    if not _takes_logits_to_keep(model):
        logits = model(**forward_inputs(batch, model)).logits[:, :-1]
        return cross_entropy_sum(logits[mask].float(), targets[mask]), n
    targets, mask = targets[:, keep], mask[:, keep]
    inner = getattr(model, "module", model)  # DDP and FSDP wrap the model
    head = inner.get_output_embeddings()
    # Chunks read the head's weight outside the model's forward, where FSDP holds only this process's shard.
    plain = not isinstance(model, FullyShardedDataParallel) and _plain_head(inner, head)
    chunk = max(1, chunk_bytes // (4 * head.weight.shape[0])) if plain else n
    if n <= chunk:
        logits = model(**forward_inputs(batch, model), logits_to_keep=keep).logits  # (batch, len(keep), vocab)
        return cross_entropy_sum(_labelled(logits, mask).float(), _labelled(targets, mask)), n
    with _head_returns_hidden(inner, head):
        hidden = _labelled(model(**forward_inputs(batch, model), logits_to_keep=keep).logits, mask)  # (n, hidden)
    targets = _labelled(targets, mask)
    total = sum(checkpoint(_loss_sum, hidden[i:i + chunk], head.weight, targets[i:i + chunk], use_reentrant=False)
                for i in range(0, n, chunk))
    return total, n


def _labelled(t: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """t[mask] for (batch, positions, ...) t; a view when every kept position is a label (one concatenated row),
    which spares a copy of the logits and, in backward, a zero-filled logits-sized gradient to scatter into."""
    return t.flatten(0, 1) if bool(mask.all()) else t[mask]


def _loss_sum(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    return cross_entropy_sum(F.linear(hidden, weight).float(), targets)


def cross_entropy_sum(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """`F.cross_entropy(logits, targets, reduction="sum")` for fp32 (n, vocab) logits that nothing else uses."""
    return _CrossEntropySum.apply(logits, targets)


class _CrossEntropySum(torch.autograd.Function):
    """sum_i logsumexp(z_i) - z_i[t_i]. Its gradient, softmax(z) - onehot(t), is written over the logits in
    backward: the logits are the one (n, vocab) tensor kept, where `F.cross_entropy` keeps its log-softmax and
    allocates two more in backward (a zero-filled gradient to scatter into, the log-softmax gradient). At a 49k
    vocabulary and 300 labels that is 120 MB less to allocate, page in and write per micro-batch."""

    @staticmethod
    def forward(ctx, logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        lse = torch.logsumexp(logits, dim=-1)
        ctx.save_for_backward(logits, targets, lse)
        return (lse - logits.gather(1, targets[:, None]).squeeze(1)).sum()

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        logits, targets, lse = ctx.saved_tensors
        softmax = logits.sub_(lse[:, None]).exp_()  # in place: the logits are not needed again
        softmax[torch.arange(len(targets), device=targets.device), targets] -= 1
        return softmax.mul_(grad), None


def _plain_head(model: nn.Module, head: nn.Module) -> bool:
    """A bias-free linear head whose logits the model does not rescale or soft-cap after it."""
    config = model.config.get_text_config()
    return (isinstance(head, nn.Linear) and head.bias is None
            and getattr(config, "final_logit_softcapping", None) is None
            and getattr(config, "logit_scale", None) in (None, 1.0)
            and getattr(config, "logits_scaling", None) in (None, 1.0))


@contextmanager
def _head_returns_hidden(model: nn.Module, head: nn.Module) -> Iterator[None]:
    """The model's forward with its head replaced by the identity: `.logits` are the final hidden states."""
    name = next(n for n, m in model.named_children() if m is head)
    setattr(model, name, nn.Identity())
    try:
        yield
    finally:
        setattr(model, name, head)


def _takes_logits_to_keep(model: nn.Module) -> bool:
    inner = getattr(model, "module", model)  # DDP wraps the model
    return "logits_to_keep" in inspect.signature(inner.forward).parameters
