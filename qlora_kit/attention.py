"""Attention for concatenated examples: each example attends only to itself, at the cost of itself.

A row that concatenates examples (`data.packing: padding_free` or `pack`) needs block-diagonal causal attention.
Given as a (T x T) mask, SDPA computes every query against every key of the row and then masks: with four
examples of similar length that is ~4x the work of attending within each example, and a mask rules out the
fused causal kernels (and, with grouped-query attention, makes transformers copy the key/value heads). The mask
itself costs T^2 bytes, where T is all the examples of a micro-batch together.

`segment_sdpa` attends within each example (causal, no mask, GQA in the kernel) when the batch says where its
examples are (`SEGMENTS`, set by `batching.forward_inputs`) and the layer has nothing that per-example causal
attention would drop (sliding window shorter than an example, soft-capping, position bias): on CUDA in one call
of flash attention's variable-length kernel, elsewhere one SDPA call per example. Otherwise it is transformers'
own SDPA attention with the block-diagonal mask.

Which of the two a model gets is fixed when it is loaded (`use_segment_attention`): models whose layers all
qualify (`needs_block_mask` is False) get rows without any (T x T) tensor from `batching.forward_inputs(batch,
model)`; the others, and models that refuse SDPA (Gemma 2: SDPA has no logit soft-capping) and run eager
attention, get the mask with every row, as does every model when `forward_inputs` is not told which it is.
"""

from __future__ import annotations

from functools import lru_cache
from itertools import pairwise

import torch
import torch.nn.functional as F
from torch import nn
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, sdpa_mask

try:
    from torch.nn.attention.varlen import varlen_attn
except ImportError:  # torch before 2.10
    varlen_attn = None

NAME = "qlora_kit_sdpa"
SEGMENTS = "qlora_kit_segments"  # keyword: per row, the (start, end) of each example
Segments = tuple[tuple[tuple[int, int], ...], ...]


def segment_sdpa(module: nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                 attention_mask: torch.Tensor | None, dropout: float = 0.0, scaling: float | None = None,
                 **kwargs) -> tuple[torch.Tensor, None]:
    """transformers' attention-function interface; q/k/v are (batch, heads, T, head_dim), the output is
    (batch, T, heads, head_dim)."""
    segments = kwargs.pop(SEGMENTS, None)
    if segments is not None and _per_example_ok(module, query, key, segments, kwargs):
        gqa = query.shape[1] != key.shape[1]
        attend = varlen_sdpa if _varlen_ok(query, key, value, dropout, gqa) else per_example_sdpa
        return attend(query, key, value, segments, dropout, scaling, gqa), None
    if segments is not None and attention_mask is None:  # `needs_block_mask` said every layer would qualify
        raise RuntimeError(f"{type(module).__name__} cannot attend per example and got no block mask: "
                           "`attention.needs_block_mask` must be True for this model")
    return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                                  **kwargs)


def per_example_sdpa(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, segments: Segments,
                     dropout: float, scaling: float | None, gqa: bool) -> torch.Tensor:
    """One causal SDPA call per example; positions after a row's last example (padding) get zeros."""
    t = query.shape[2]
    rows = []
    for row, spans in enumerate(segments):
        q, k, v = query[row:row + 1], key[row:row + 1], value[row:row + 1]
        # (1, T, heads, head_dim) pieces, the layout transformers wants back: one copy (the cat) per row
        parts = [F.scaled_dot_product_attention(q[:, :, a:b], k[:, :, a:b], v[:, :, a:b], dropout_p=dropout,
                                                is_causal=True, scale=scaling, enable_gqa=gqa).transpose(1, 2)
                 for a, b in spans]
        end = spans[-1][1] if spans else 0
        if end < t:
            parts.append(q.new_zeros(1, t - end, q.shape[1], value.shape[-1]))
        rows.append(torch.cat(parts, dim=1))
    return rows[0] if len(rows) == 1 else torch.cat(rows)


def varlen_sdpa(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, segments: Segments,
                dropout: float, scaling: float | None, gqa: bool) -> torch.Tensor:
    """All examples of the batch in one call of the variable-length flash kernel, which takes them as one
    (total tokens, heads, head_dim) sequence cut at `cu_seqlens`. Padding after a row's examples is a sequence of
    its own: the kernel writes only the positions it is given, and padding must hold finite numbers.
    No dropout: the kernel has none (`_varlen_ok` sends such calls to `per_example_sdpa`)."""
    b, heads, t, _ = query.shape
    cu_seqlens, longest = _cu_seqlens(segments, t, query.device)
    q, k, v = (x.transpose(1, 2).reshape(b * t, x.shape[1], x.shape[3]) for x in (query, key, value))
    out = varlen_attn(q, k, v, cu_seqlens, cu_seqlens, longest, longest, scale=scaling, window_size=(-1, 0),
                      enable_gqa=gqa)  # window (-1, 0): causal
    return out.view(b, t, heads, value.shape[-1])


@lru_cache(maxsize=4)  # built once per batch, not once per layer (one host-to-device copy each)
def _cu_seqlens(segments: Segments, t: int, device: torch.device) -> tuple[torch.Tensor, int]:
    """The rows' example boundaries in the flattened (batch x T) layout, and the longest piece."""
    bounds = [0]
    for row, spans in enumerate(segments):
        ends = [end for _, end in spans]
        bounds += [row * t + end for end in ends + ([t] if not ends or ends[-1] < t else [])]
    longest = max(b - a for a, b in pairwise(bounds))
    return torch.tensor(bounds, dtype=torch.int32, device=device), longest


def _varlen_ok(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, dropout: float, gqa: bool) -> bool:
    """Whether the variable-length kernel runs this call: flash attention on CUDA (fp16/bf16, head sizes and GPUs
    it supports, as SDPA decides for its own flash kernel) and no dropout."""
    if varlen_attn is None or not query.is_cuda or dropout:
        return False
    params = torch.backends.cuda.SDPAParams(query, key, value, None, 0.0, True, gqa)
    return torch.backends.cuda.can_use_flash_attention(params)


def _per_example_ok(module: nn.Module, query: torch.Tensor, key: torch.Tensor, segments: Segments,
                    kwargs: dict) -> bool:
    longest = max((end - start for spans in segments for start, end in spans), default=0)
    # Some models keep the window on the layer (Gemma, Qwen2), others pass it in (Mistral, Phi-3)
    window = kwargs.get("sliding_window", getattr(module, "sliding_window", None))
    return (query.shape[2] == key.shape[2] and getattr(module, "is_causal", True)
            and (window is None or longest <= window)
            and kwargs.get("softcap") is None and kwargs.get("position_bias") is None
            and not kwargs.get("output_attentions", False))


def needs_block_mask(model: nn.Module) -> bool:
    """Whether rows of concatenated examples must carry the (T x T) block mask for `model`: unless every layer
    attends per example from the spans alone. A function of the model's class and config, so fixed at load.

    Models from transformers pass the spans down to each layer's attention (as they do flash attention's
    sequence boundaries); a sliding window or soft-capping in the config may disqualify some layer, and for other
    code (`trust_remote_code`) nothing says the spans arrive.
    """
    model = getattr(model, "module", model)  # DDP wraps the model
    config = model.config.get_text_config()
    return not (model.config._attn_implementation == NAME and type(model).__module__.startswith("transformers.")
                and getattr(config, "sliding_window", None) is None
                and getattr(config, "attn_logit_softcapping", None) is None)


def use_segment_attention(model: nn.Module) -> None:
    """Set up the attention `model` (built by transformers with its own choice of SDPA or eager) trains with.

    SDPA becomes `segment_sdpa` (identical without `SEGMENTS`). Eager attention adds the mask to its scores, so
    the boolean block mask of `batching.forward_inputs` is turned into 0 where attended and the dtype's minimum
    elsewhere before the model runs."""
    if model.config._attn_implementation in ("sdpa", NAME):
        AttentionInterface.register(NAME, segment_sdpa)
        ALL_MASK_ATTENTION_FUNCTIONS.register(NAME, sdpa_mask)  # masks are built exactly as for "sdpa"
        model.set_attn_implementation(NAME)
    elif model.config._attn_implementation == "eager":
        model.register_forward_pre_hook(_additive_block_mask, with_kwargs=True)


def _additive_block_mask(model: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
    mask = kwargs.get("attention_mask")
    if mask is not None and mask.dim() == 4 and mask.dtype == torch.bool:
        dtype = model.dtype
        kwargs["attention_mask"] = torch.full(mask.shape, torch.finfo(dtype).min, dtype=dtype,
                                              device=mask.device).masked_fill_(mask, 0.0)
    return args, kwargs


def describe_attention(model: nn.Module) -> str:
    """One line for the training log: the attention `model` runs and whether rows carry the (T x T) mask."""
    model = getattr(model, "module", model)
    name = model.config._attn_implementation
    if name == "eager":
        return f"eager ({type(model).__name__} refuses SDPA), rows of examples with a (T x T) block mask"
    if name != NAME:
        return f"{name}, rows of examples with a (T x T) block mask"
    if needs_block_mask(model):
        return (f"{NAME}: per example where a layer allows (varlen kernel on CUDA), else with the (T x T) block "
                "mask that every row carries")
    return f"{NAME}: per example (varlen kernel on CUDA), no (T x T) block mask"
