"""Optimizer and learning-rate schedule for the LoRA matrices (the only trainable tensors)."""

from __future__ import annotations

import math

import bitsandbytes as bnb
import torch
from torch import nn

from qlora_kit.config import OptimConfig, TrainConfig

_OPTIMIZERS = {
    # Paged: optimizer state in unified memory, evicted to CPU RAM under GPU memory pressure instead of OOM.
    "paged_adamw_32bit": bnb.optim.PagedAdamW32bit,
    # 8-bit block-wise state: 75% less optimizer memory, same results in the 8-bit optimizers paper.
    "paged_adamw_8bit": bnb.optim.PagedAdamW8bit,
    "adamw": torch.optim.AdamW,
}


# The same states, allocated as ordinary tensors: paging needs CUDA's unified memory, which the memory trace's
# meta device does not have.
_UNPAGED = {"paged_adamw_32bit": bnb.optim.AdamW32bit, "paged_adamw_8bit": bnb.optim.AdamW8bit}


def build_optimizer(model: nn.Module, optim: OptimConfig, lr: float, paged: bool = True) -> torch.optim.Optimizer:
    params = [p for p in model.parameters() if p.requires_grad]
    cls = _OPTIMIZERS[optim.name] if paged else _UNPAGED.get(optim.name, _OPTIMIZERS[optim.name])
    return cls(params, lr=lr, betas=(optim.beta1, optim.beta2), eps=optim.eps, weight_decay=optim.weight_decay)


def build_scheduler(optimizer: torch.optim.Optimizer, train: TrainConfig, total_steps: int):
    """Linear warmup for `warmup_steps`, then constant or cosine decay to `lr * min_lr_ratio` at the last step."""

    def factor(step: int) -> float:
        if step < train.warmup_steps:
            return (step + 1) / (train.warmup_steps + 1)
        if train.lr_schedule == "constant":
            return 1.0
        progress = (step - train.warmup_steps) / max(1, total_steps - train.warmup_steps)
        cosine = 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))
        return train.min_lr_ratio + (1 - train.min_lr_ratio) * cosine

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)
