"""LoRA over a frozen 4-bit linear as one autograd function: the training hot path.

Same maths as `LoRALinear`'s readable forward (y = x W^T + b + scale * B A dropout(x)), computed so that a step
does less work and holds less memory:

- the 4-bit weight is dequantized once in forward and once in backward, and never kept alive in between
  (bitsandbytes' `MatMul4Bit` does the same for the base; here the LoRA branch rides along in the same call);
- the LoRA update is added into the base output in place (`addmm_`), and the scale (with dropout's 1/(1-p)) is
  applied to the rank-r activations, not to a (tokens x d_out) tensor: no full-size multiply or add per adapter;
- saved for backward: the dropped-out input (or the input itself without dropout), the rank-r activations and the
  indices of the dropped entries; no fp32 copy of any frozen weight;
- on the CPU, dropout draws the gaps between dropped entries (below), several times cheaper than `bernoulli_`.
"""

from __future__ import annotations

import math

import torch
from bitsandbytes.functional import dequantize_4bit


def draw_dropped(shape: torch.Size, p: float, device: torch.device, per_round: int | None = None) -> torch.Tensor:
    """Which entries dropout zeroes, each independently with probability p: sorted flat indices on the CPU,
    a boolean mask on GPUs. Apply with `zero_dropped`.

    On the CPU, `bernoulli_` draws one random number per entry (~8 ns each here: as long as the matmul it feeds).
    The gaps between dropped entries of a Bernoulli(p) sequence are i.i.d. geometric(p), so drawing the gaps
    (floor(log U / log(1-p)) + 1, U uniform in (0, 1]) gives exactly the same distribution from ~p*n numbers
    instead of n, and indices (p*n of them) are cheaper to apply than a mask. GPUs draw Bernoulli masks at memory
    speed, and the gap method would need a host sync there. `per_round`: gaps drawn at a time (default: enough
    to cover the tensor in one round but for a 6-sigma shortfall).
    """
    if device.type != "cpu" or p >= 0.25:
        return torch.rand(shape, device=device) < p
    n, log_keep = math.prod(shape), math.log1p(-p)
    chunks, last = [], -1  # `last`: position of the last dropped entry so far
    while True:
        expected = (n - last) * p
        k = per_round or int(expected + 6 * math.sqrt(expected) + 16)
        gaps = torch.rand(k, dtype=torch.float64).neg_().add_(1).log_().div_(log_keep).floor_().add_(1)
        positions = gaps.cumsum_(0).add_(last).to(torch.int64)
        inside = int(torch.searchsorted(positions, n))  # sorted: the first `inside` are < n
        chunks.append(positions[:inside])
        if inside < k:
            return chunks[0] if len(chunks) == 1 else torch.cat(chunks)
        last = int(positions[-1])


def zero_dropped(t: torch.Tensor, dropped: torch.Tensor) -> torch.Tensor:
    """Zero (in place) the entries `draw_dropped` chose."""
    if dropped.dtype == torch.bool:
        return t.masked_fill_(dropped, 0)
    t.view(-1).index_fill_(0, dropped, 0)
    return t


class LoRA4bit(torch.autograd.Function):
    """y = x @ dequant(W)^T + bias + scale * (dropout(x) @ A^T) @ B^T, for 2-D x (tokens, d_in)."""

    @staticmethod
    def forward(ctx, x, lora_a, lora_b, weight, quant_state, bias, scale: float, p: float):
        w = dequantize_4bit(weight, quant_state).to(x.dtype)
        y = torch.mm(x, w.t())
        del w
        if bias is not None:
            y += bias
        drop = draw_dropped(x.shape, p, x.device) if p > 0 else None
        x_in = x if drop is None else zero_dropped(x.clone(), drop)
        h = torch.mm(x_in, lora_a.t())  # (tokens, r)
        s = scale / (1 - p)  # dropout's rescaling, applied at rank r
        y.addmm_(h, lora_b.t(), alpha=s)
        ctx.save_for_backward(x_in, h, drop, lora_a, lora_b, weight)
        ctx.quant_state, ctx.s = quant_state, s
        return y

    @staticmethod
    def backward(ctx, grad_y):
        x_in, h, drop, lora_a, lora_b, weight = ctx.saved_tensors
        s = ctx.s
        grad_h = torch.mm(grad_y, lora_b).mul_(s)  # (tokens, r), scale included
        grad_a = torch.mm(grad_h.t(), x_in) if ctx.needs_input_grad[1] else None
        grad_b = torch.mm(grad_y.t(), h).mul_(s) if ctx.needs_input_grad[2] else None
        grad_x = None
        if ctx.needs_input_grad[0]:
            w = dequantize_4bit(weight, ctx.quant_state).to(grad_y.dtype)
            grad_x = torch.mm(grad_y, w)
            del w
            if drop is None:
                grad_x.addmm_(grad_h, lora_a)
            else:
                grad_x += zero_dropped(torch.mm(grad_h, lora_a), drop)
        return grad_x, grad_a, grad_b, None, None, None, None, None
