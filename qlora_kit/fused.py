"""LoRA over a frozen 4-bit linear as one autograd function: the training hot path.

Same maths as `LoRALinear`'s readable forward (y = x W^T + b + scale * B A dropout(x)), computed so that a step
does less work and holds less memory:

- the 4-bit weight is dequantized for the forward and again for the backward, and not kept alive in between
  (bitsandbytes' `MatMul4Bit` does the same for the base; here the LoRA branch rides along in the same call);
- the LoRA update is added into the base output in place (`addmm_`), and the scale (with dropout's 1/(1-p)) is
  applied to the rank-r activations, not to a (tokens x d_out) tensor: no full-size multiply or add per adapter;
- saved for backward: the dropped-out input (or the input itself without dropout), the rank-r activations and the
  indices of the dropped entries; no fp32 copy of any frozen weight outside the block being recomputed (below);
- dropout's mask is drawn as booleans; on the CPU as the indices of the dropped entries (`cpu.dropped_indices`).

Under gradient checkpointing (`checkpoint_contexts`), a block's forward runs twice: once keeping nothing, then
again (the recompute) right before the block's backward, to rebuild what the backward needs. Two savings there:

- the recompute saves its tensors *before* computing the base matmul, and torch's non-reentrant checkpoint stops
  recomputing as soon as the block's last saved tensor is back: the last linear of a block (a Llama MLP's
  `down_proj`, the largest) never redoes its base matmul, whose output nothing in the backward reads;
- on the CPU (`cpu.speedups`), the recompute keeps its dequantized weight for the backward instead of
  dequantizing a third time: one block's weights at a time, freed by its backward. (On GPUs dequantizing is cheap
  and memory is not: one 70B layer's 16-bit weights are 1.7 GB.)
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from contextlib import contextmanager

import torch

from qlora_kit import cpu
from qlora_kit.nf4 import QuantState, dequantize, join_state, split_state

# Which pass a checkpointed decoder layer is in: "forward" / "recompute" (set by `checkpoint_contexts`), None
# outside checkpointing. Module state, not an argument: torch's checkpoint calls transformers' layer `forward`,
# and the only way in between is the `context_fn` contexts, which cannot pass anything down the call.
_phase: str | None = None

def phase() -> str | None:
    """The checkpoint pass running now (see `_phase`)."""
    return _phase


@contextmanager
def _checkpoint_phase(phase: str) -> Iterator[None]:
    global _phase
    previous, _phase = _phase, phase
    try:
        yield
    finally:
        _phase = previous


def checkpoint_contexts():
    """`context_fn` for `torch.utils.checkpoint` (non-reentrant): tells `lora_4bit` which pass it is in."""
    return _checkpoint_phase("forward"), _checkpoint_phase("recompute")


def draw_dropped(shape: torch.Size, p: float, device: torch.device, per_round: int | None = None) -> torch.Tensor:
    """Which entries dropout zeroes, each independently with probability p: a boolean mask, drawn as booleans
    (one byte an entry, no float per entry); on the CPU sorted flat indices (`cpu.dropped_indices`). Apply with
    `zero_dropped`."""
    if not cpu.speedups(device) or p >= 0.25:
        return torch.empty(shape, dtype=torch.bool, device=device).bernoulli_(p)
    return cpu.dropped_indices(math.prod(shape), p, per_round)


def zero_dropped(t: torch.Tensor, dropped: torch.Tensor) -> torch.Tensor:
    """Zero (in place) the entries `draw_dropped` chose."""
    if dropped.dtype == torch.bool:
        return t.masked_fill_(dropped, 0)
    t.view(-1).index_fill_(0, dropped, 0)
    return t


def lora_4bit(x: torch.Tensor, lora_a: torch.Tensor, lora_b: torch.Tensor, weight: torch.Tensor,
              quant_state: QuantState, bias: torch.Tensor | None, scale: float, p: float) -> torch.Tensor:
    """y = x @ dequant(W)^T + bias + scale * (dropout(x) @ A^T) @ B^T, for 2-D x (tokens, d_in)."""
    with torch.no_grad():  # the Function's inputs; their gradients are the Function's business
        w = dequantize(weight, quant_state, x.dtype) if _phase and cpu.speedups(x.device) else None
        drop = draw_dropped(x.shape, p, x.device) if p > 0 else None
        x_in = x if drop is None else zero_dropped(x.clone(), drop)
        h = torch.mm(x_in, lora_a.t())  # (tokens, r)
    s = scale / (1 - p)  # dropout's rescaling, applied at rank r
    recompute = _phase == "recompute"
    y = LoRA4bit.apply(x, lora_a, lora_b, weight, quant_state, w, bias, x_in, h, drop, s, recompute)
    if recompute:  # the recompute went on past this layer's saved tensors: its output is needed after all
        with torch.no_grad():
            _forward(y, x, weight, quant_state, w, bias, h, lora_b, s)
    return y


def _forward(y, x, weight, quant_state, w, bias, h, lora_b, s: float) -> None:
    """Fill y (tokens, d_out) in place: the same operations in the same order in forward and recompute."""
    w = dequantize(weight, quant_state, x.dtype) if w is None else w
    torch.mm(x, w.t(), out=y)
    del w
    if bias is not None:
        y += bias
    y.addmm_(h, lora_b.t(), alpha=s)


class LoRA4bit(torch.autograd.Function):
    """Given h = dropout(x) @ A^T, y = x @ W^T + bias + s * h @ B^T; gradients for x, A and B.

    `w`: the dequantized weight to use and keep for backward (else `weight` is kept and dequantized again).
    `recompute`: save, return y uncomputed; the caller fills it if recomputation did not stop at the save.
    The quantization state's tensors are saved like the weight, through autograd, never held on `ctx`: under
    checkpointing autograd drops saved tensors after the forward and brings back the recompute's, so with
    `train.offload_base` no layer's device copy outlives its use.
    """

    @staticmethod
    def forward(ctx, x, lora_a, lora_b, weight, quant_state, w, bias, x_in, h, drop, s: float, recompute: bool):
        state_tensors, ctx.state_layout = split_state(quant_state) if w is None else ((), None)
        ctx.save_for_backward(x_in, h, drop, lora_a, lora_b, weight if w is None else w, *state_tensors)
        ctx.s = s
        y = x.new_empty(x.shape[0], lora_b.shape[0])
        if not recompute:
            _forward(y, x, weight, quant_state, w, bias, h, lora_b, s)
        return y

    @staticmethod
    def backward(ctx, grad_y):
        x_in, h, drop, lora_a, lora_b, weight, *state_tensors = ctx.saved_tensors
        s = ctx.s
        grad_h = torch.mm(grad_y, lora_b).mul_(s)  # (tokens, r), scale included
        grad_a = torch.mm(grad_h.t(), x_in) if ctx.needs_input_grad[1] else None
        grad_b = torch.mm(h.t(), grad_y).mul_(s).t() if ctx.needs_input_grad[2] else None  # ~2x faster than B^T
        grad_x = None
        if ctx.needs_input_grad[0]:
            dequantized = ctx.state_layout is None
            w = weight if dequantized else dequantize(weight, join_state(state_tensors, ctx.state_layout),
                                                      grad_y.dtype)
            grad_x = torch.mm(grad_y, w)
            del w
            if drop is None:
                grad_x.addmm_(grad_h, lora_a)
            else:
                grad_x += zero_dropped(torch.mm(grad_h, lora_a), drop)
        return grad_x, grad_a, grad_b, None, None, None, None, None, None, None, None, None
