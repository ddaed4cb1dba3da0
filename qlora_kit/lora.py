"""LoRA: a trainable low-rank update on top of a frozen (4-bit) linear layer.

    y = base(x) + scale * B(A(dropout(x)))          W_effective = W + scale * B @ A

        x ──► base (frozen W, d_out x d_in) ─────────────────┐
        │                                                     + ──► y
        └──► dropout ──► A (r x d_in) ──► B (d_out x r) ──► * scale

Hu et al. 2021, https://arxiv.org/abs/2106.09685: A is Kaiming-uniform, B is zero, so the adapter starts as
the identity (no change to the base model's outputs) and learns only the update. scale = alpha / r, or
alpha / sqrt(r) with rank-stabilised LoRA (https://arxiv.org/abs/2312.03732).

Tensor names follow PEFT (`base_layer`, `lora_A.weight`, `lora_B.weight`), so the model's state dict filtered
on "lora_" is the adapter file PEFT, vLLM and transformers load.
"""

from __future__ import annotations

import math
import re

import torch
from torch import nn

from qlora_kit import experts, nf4
from qlora_kit.errors import UserError
from qlora_kit.fused import lora_4bit


class LoRALinear(nn.Module):
    """Wraps one frozen linear layer (4-bit, see nf4.py, or `nn.Linear`) with a trainable rank-r update."""

    def __init__(self, base_layer: nn.Module, r: int, alpha: float, dropout: float = 0.0,
                 use_rslora: bool = False, dtype: torch.dtype = torch.float32) -> None:
        super().__init__()
        self.base_layer = base_layer
        self.in_features, self.out_features = base_layer.in_features, base_layer.out_features
        self.r, self.alpha = r, alpha
        self.scale = lora_scale(r, alpha, use_rslora)
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        device = _device_of(base_layer)
        self.lora_A = nn.Linear(self.in_features, r, bias=False, device=device, dtype=dtype)
        self.lora_B = nn.Linear(r, self.out_features, bias=False, device=device, dtype=dtype)
        self.base_kernel = False  # compute the base with its own forward (bitsandbytes' kernels), not fused.py
        self.lora_dtype = dtype
        self.reset_lora_parameters()

    def reset_lora_parameters(self) -> None:
        # Same init as nn.Linear and PEFT: Kaiming-uniform with a=sqrt(5) for A; zeros for B.
        nn.init.kaiming_uniform_(self.lora_A.weight, a=math.sqrt(5))
        nn.init.zeros_(self.lora_B.weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self._fused(x):  # same maths, less work and memory: see fused.py
            p = self.dropout.p if self.training and isinstance(self.dropout, nn.Dropout) else 0.0
            base = self.base_layer
            weight, state = nf4.weight_and_state(base)
            y = lora_4bit(x.reshape(-1, self.in_features).to(base.compute_dtype), self.lora_A.weight,
                          self.lora_B.weight, weight, state, base.bias, self.scale, p)
            return y.view(*x.shape[:-1], self.out_features).to(x.dtype)
        y = self.base_layer(x)
        update = self.lora_B(self.lora_A(self.dropout(x.to(self.lora_dtype))))
        return y + (update * self.scale).to(y.dtype)

    def _fused(self, x: torch.Tensor) -> bool:
        """A 4-bit base whose compute dtype the LoRA weights share (what `train` and the loaders build): training
        and inference then dequantize the same way, so a model computes the same numbers with or without grad.
        Not when FSDP wraps the LoRA matrices as units of their own (`distributed.wrap_fsdp`): their weights
        exist whole only while their own modules run."""
        base = self.base_layer
        return (not self.base_kernel and nf4.is_4bit(base) and type(self.lora_A) is nn.Linear
                and base.compute_dtype == self.lora_A.weight.dtype)

    def extra_repr(self) -> str:
        return f"r={self.r}, alpha={self.alpha}, scale={self.scale:g}"


def lora_dtype_for(compute_dtype: torch.dtype) -> torch.dtype:
    """LoRA weights train in bf16 where the model computes in bf16; fp16 weights are too coarse for Adam's
    updates, so fp32 otherwise (and an fp32 model computes with fp32 LoRA, whatever dtype the adapter was saved
    in: the upcast is exact)."""
    return torch.bfloat16 if compute_dtype == torch.bfloat16 else torch.float32


def lora_scale(r: int, alpha: float, use_rslora: bool) -> float:
    """The factor on B @ A: alpha / r, or alpha / sqrt(r) with rank-stabilised LoRA."""
    return alpha / math.sqrt(r) if use_rslora else alpha / r


def _device_of(module: nn.Module) -> torch.device:
    return next(module.parameters()).device


def select_targets(candidates: list[str], target_modules: str | list[str]) -> list[str]:
    """Which of the candidate linear names get LoRA.

    `all-linear` takes them all, expert projections included (each is a linear map per expert). Otherwise each
    entry is a module name, matched as PEFT does (the full name or its last components, `q_proj` matches
    `model.layers.0.self_attn.q_proj`), or else a regex matched against the full name; an MoE block's experts
    module (`experts`, `mlp.experts`) names both its projections. An entry that matches nothing is an error: a
    typo must not silently train fewer layers.
    """
    if target_modules == "all-linear":
        return list(candidates)
    chosen: set[str] = set()
    for entry in target_modules:
        hits = [n for n in candidates if n == entry or n.endswith("." + entry) or _fullmatch(entry, n)
                or experts.is_projection(n) and _names_block(entry, n.rpartition(".")[0])]
        if not hits:
            leaf_names = sorted({n.rsplit(".", 1)[-1] for n in candidates})
            raise UserError(f"'lora.target_modules': {entry!r} matches no linear layer; the model's linear "
                            f"layers are named {', '.join(leaf_names)}")
        chosen.update(hits)
    return [n for n in candidates if n in chosen]


def _names_block(entry: str, block: str) -> bool:
    return block == entry or block.endswith("." + entry)


def _fullmatch(pattern: str, name: str) -> bool:
    try:
        return re.fullmatch(pattern, name) is not None
    except re.error:
        return False


def add_lora(model: nn.Module, targets: list[str], r: int, alpha: float, dropout: float,
             use_rslora: bool, dtype: torch.dtype) -> None:
    """Wrap each target linear in a `LoRALinear` (in place), give each targeted expert projection a LoRA pair per
    expert (experts.py), and leave only LoRA tensors trainable."""
    model.requires_grad_(False)
    for name in targets:
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name)
        module = getattr(parent, child)
        if isinstance(module, experts.PackedExperts):
            module.add_lora(r, lora_scale(r, alpha, use_rslora), dropout, dtype)
        else:
            setattr(parent, child, LoRALinear(module, r, alpha, dropout, use_rslora, dtype))
    for name, param in model.named_parameters():
        param.requires_grad = is_lora(name)


def is_lora(name: str) -> bool:
    """The one filter that freezing, saving and merging rely on."""
    return "lora_" in name


def lora_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v for k, v in model.state_dict().items() if is_lora(k)}
