"""Attention for concatenated examples: each example attends only to itself, at the cost of itself.

A row that concatenates examples (`data.packing: padding_free` or `pack`) needs block-diagonal causal attention.
Given as a (T x T) mask, SDPA computes every query against every key of the row and then masks: with four
examples of similar length that is ~4x the work of attending within each example, and a mask rules out the
fused causal kernels (and, with grouped-query attention, makes transformers copy the key/value heads).

`segment_sdpa` runs SDPA once per example (`is_causal`, no mask, GQA in the kernel) when the batch says where its
examples are (`SEGMENTS`, set by `batching.forward_inputs`) and the layer has nothing that per-example causal
attention would drop (sliding window, soft-capping, position bias). Otherwise it is transformers' own SDPA
attention with the block-diagonal mask, which every batch also carries, so a model that does not pass the
keyword through still computes the right thing, only slower.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, sdpa_mask

NAME = "qlora_kit_sdpa"
SEGMENTS = "qlora_kit_segments"  # keyword: per row, the (start, end) of each example


def segment_sdpa(module: nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                 attention_mask: torch.Tensor | None, dropout: float = 0.0, scaling: float | None = None,
                 **kwargs) -> tuple[torch.Tensor, None]:
    """transformers' attention-function interface; q/k/v are (batch, heads, T, head_dim)."""
    segments = kwargs.pop(SEGMENTS, None)
    if segments is None or not _per_example_ok(module, query, key, segments, kwargs):
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                                      **kwargs)
    gqa, t = query.shape[1] != key.shape[1], query.shape[2]
    rows = []
    for row, spans in enumerate(segments):
        q, k, v = query[row:row + 1], key[row:row + 1], value[row:row + 1]
        # (1, T, heads, head_dim) pieces, the layout transformers wants back: one copy (the cat) per row
        parts = [F.scaled_dot_product_attention(q[:, :, a:b], k[:, :, a:b], v[:, :, a:b], dropout_p=dropout,
                                                is_causal=True, scale=scaling, enable_gqa=gqa).transpose(1, 2)
                 for a, b in spans]
        end = spans[-1][1] if spans else 0
        if end < t:  # padding at the end of a row: zeros, attended by nothing
            parts.append(q.new_zeros(1, t - end, q.shape[1], value.shape[-1]))
        rows.append(torch.cat(parts, dim=1))
    return (rows[0] if len(rows) == 1 else torch.cat(rows)), None


def _per_example_ok(module: nn.Module, query: torch.Tensor, key: torch.Tensor, segments, kwargs: dict) -> bool:
    longest = max((end - start for spans in segments for start, end in spans), default=0)
    window = getattr(module, "sliding_window", None)
    return (query.shape[2] == key.shape[2] and getattr(module, "is_causal", True)
            and (window is None or longest <= window)
            and kwargs.get("softcap") is None and kwargs.get("position_bias") is None
            and not kwargs.get("output_attentions", False))


def use_segment_attention(model: nn.Module) -> None:
    """Switch a model loaded with SDPA attention to `segment_sdpa` (identical without `SEGMENTS`)."""
    AttentionInterface.register(NAME, segment_sdpa)
    ALL_MASK_ATTENTION_FUNCTIONS.register(NAME, sdpa_mask)  # masks are built exactly as for "sdpa"
    model.set_attn_implementation(NAME)
