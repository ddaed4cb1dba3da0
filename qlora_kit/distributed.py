"""Start-up checks for FSDP-QLoRA: a wrong setting here trains garbage silently, so it stops the run instead.

FSDP (version 1) flattens every tensor of a wrapped layer into one buffer of one dtype and hands the layer views
of it. 4-bit weights stored as uint8 next to bf16 norms and LoRA weights would be cast into that buffer: the
packed bytes come back as other numbers, and the run trains on noise (users report loss 0 or NaN, no error).
Storing the 4-bit bytes in the compute dtype (`quant.storage_dtype`) keeps them bit-exact through the
flattening. FSDP must also keep the original parameters (`use_orig_params`) so frozen 4-bit weights and
trainable LoRA weights can share a layer, and its mixed precision must not cast parameters (the packed bytes
again); qlora-kit computes in `quant.compute_dtype` itself.
"""

from __future__ import annotations

import torch
from torch import nn

from qlora_kit.errors import UserError


def fsdp_problems(model: nn.Module, storage_dtype: str, fsdp_version: int, use_orig_params: bool | None,
                  param_dtype: torch.dtype | None) -> list[str]:
    """What would make FSDP-QLoRA train garbage, one message per problem (empty: fine)."""
    problems = []
    dtypes = {p.dtype for p in model.parameters()}
    if fsdp_version != 1:
        problems.append(f"fsdp_version is {fsdp_version}: FSDP2 shards each parameter as a DTensor and loses "
                        "bitsandbytes' 4-bit parameter class; set fsdp_version: 1")
    if len(dtypes) > 1:
        names = ", ".join(sorted(str(d).removeprefix("torch.") for d in dtypes))
        others = sorted(str(d).removeprefix("torch.") for d in dtypes if d != getattr(torch, storage_dtype))
        fix = f"set quant.storage_dtype={others[0]}" if len(others) == 1 else "use one dtype for all parameters"
        problems.append(f"quant.storage_dtype is {storage_dtype} but the model's other parameters are "
                        f"{', '.join(others)} (parameters in {names}): FSDP would cast the packed 4-bit bytes "
                        f"into one flat buffer and train on noise; {fix}")
    if use_orig_params is False:
        problems.append("fsdp_use_orig_params is false: frozen 4-bit and trainable LoRA weights share each layer; "
                        "set fsdp_use_orig_params: true")
    if param_dtype is not None and param_dtype not in dtypes:
        problems.append(f"FSDP mixed precision casts parameters to {str(param_dtype).removeprefix('torch.')}, "
                        "which would cast the packed 4-bit bytes; set mixed_precision: 'no' (qlora-kit computes in "
                        "quant.compute_dtype)")
    return problems


def check_fsdp(model: nn.Module, storage_dtype: str, plugin) -> None:
    """Raise one `UserError` listing every problem of an Accelerate FSDP plugin for this model."""
    policy = getattr(plugin, "mixed_precision_policy", None)
    problems = fsdp_problems(model, storage_dtype, getattr(plugin, "fsdp_version", 1),
                             getattr(plugin, "use_orig_params", None), getattr(policy, "param_dtype", None))
    if problems:
        raise UserError("FSDP-QLoRA: " + "; ".join(problems))
