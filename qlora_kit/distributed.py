"""FSDP-QLoRA: the frozen 4-bit model sharded over the processes, LoRA trained on top.

Accelerate reads the FSDP settings (`recipes/accelerate/fsdp_qlora.yaml`); qlora-kit wraps the model itself
(`wrap_fsdp`), because QLoRA needs what a generic wrap does not do:

- Load once. Only the main process reads and quantizes the checkpoint; the others build the same model with
  empty 4-bit shells on the meta device (`model.load_quantized(..., read_weights=False)`), receive the
  quantization states (small), and FSDP copies the main process's weights into their shards
  (`sync_module_states`). A 70B model is never whole in any GPU's memory.
- LoRA matrices are FSDP units of their own (as PEFT's FSDP policy does): frozen 4-bit bytes, norms and
  trainable weights in one flat parameter would give the frozen parts gradient memory.
- FSDP flattens every tensor of a unit into one buffer of one dtype and hands the layer views of it. 4-bit
  weights stored as uint8 next to bf16 norms would be cast into that buffer: the packed bytes come back as other
  numbers, and the run trains on noise (users report loss 0 or NaN, no error). Storing the 4-bit bytes in the
  compute dtype (`quant.storage_dtype`) keeps them bit-exact through the flattening. FSDP must also keep the
  original parameters (`use_orig_params`) so frozen 4-bit weights and trainable LoRA weights can share a layer,
  and its mixed precision must not cast parameters (the packed bytes again); qlora-kit computes in
  `quant.compute_dtype` itself. `check_fsdp` stops a run whose settings would do otherwise.

Accelerate has no FSDP on CPUs: it runs an FSDP config there as plain multi-process. `fsdp_plugin` then reads
the same settings from the environment Accelerate's launcher sets, so the sharded code path runs (and is
tested) on the CPU too.
"""

from __future__ import annotations

import functools
import os

import torch
import torch.distributed as dist
from accelerate import Accelerator, FullyShardedDataParallelPlugin
from accelerate.utils import DistributedType, str_to_bool
from torch import nn
from torch.distributed.fsdp import FullyShardedDataParallel as FSDP
from torch.distributed.fsdp.wrap import _or_policy, lambda_auto_wrap_policy, transformer_auto_wrap_policy

from qlora_kit import nf4
from qlora_kit.errors import UserError
from qlora_kit.lora import is_lora
from qlora_kit.offload import decoder_layers


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


def fsdp_plugin(accelerator: Accelerator) -> FullyShardedDataParallelPlugin | None:
    """The run's FSDP settings, or None when it does not shard (see the module's docstring for CPUs)."""
    if accelerator.distributed_type == DistributedType.FSDP:
        return accelerator.state.fsdp_plugin
    if (accelerator.distributed_type == DistributedType.MULTI_CPU
            and str_to_bool(os.environ.get("ACCELERATE_USE_FSDP", "false"))):
        return FullyShardedDataParallelPlugin()  # from the FSDP_* environment, as Accelerate would
    return None


def wrap_fsdp(model: nn.Module, plugin: FullyShardedDataParallelPlugin, device: torch.device) -> FSDP:
    """Shard `model` (whole on the main process, shells elsewhere): decoder layers and LoRA matrices are units."""
    share_quant_states(model, device)
    on_gpu = device.type != "cpu"
    if not on_gpu:  # FSDP syncs module states on GPUs only
        device = torch.device("cpu")  # FSDP compares it with its own "cpu", which has no index
        broadcast_from_main(model)
    trainable_leaf = functools.partial(lambda_auto_wrap_policy, lambda_fn=lambda m: not list(m.children()) and any(
        p.requires_grad for p in m.parameters(recurse=False)))
    layers = functools.partial(transformer_auto_wrap_policy,
                               transformer_layer_cls={type(layer) for layer in decoder_layers(model)})
    return FSDP(model, auto_wrap_policy=functools.partial(_or_policy, policies=[trainable_leaf, layers]),
                sharding_strategy=plugin.sharding_strategy, cpu_offload=plugin.cpu_offload,
                backward_prefetch=plugin.backward_prefetch, forward_prefetch=plugin.forward_prefetch,
                limit_all_gathers=True, use_orig_params=True, device_id=device, sync_module_states=on_gpu,
                param_init_fn=lambda m: m.to_empty(device=device, recurse=False))


def broadcast_from_main(model: nn.Module) -> None:
    """The main process's parameters and buffers to all (what FSDP's `sync_module_states` does on GPUs), the
    other processes' meta parameters materialised first."""
    if any(p.is_meta for p in model.parameters()):
        model.to_empty(device="cpu")
    for tensor in [*model.parameters(), *model.buffers()]:
        dist.broadcast(tensor.data, src=0)


def share_quant_states(model: nn.Module, device: torch.device) -> None:
    """Give every process the main process's quantization states, on `device` (FSDP moves and syncs parameters,
    not these)."""
    linears = {n: m for n, m in model.named_modules() if nf4.is_4bit(m)}
    states = [{n: nf4.split_state(m.weight.quant_state) for n, m in linears.items()} if dist.get_rank() == 0 else None]
    dist.broadcast_object_list(states, src=0)
    for name, (tensors, layout) in states[0].items():
        state = nf4.join_state([t.to(device) if t is not None else None for t in tensors], layout)
        linears[name].quant_state = linears[name].weight.quant_state = state


def lora_state(model: FSDP) -> dict[str, torch.Tensor]:
    """The LoRA weights whole, on the main process (empty elsewhere), gathered one matrix at a time: never the
    frozen model. Every process must call it."""
    tensors = {}
    for name, unit in model.named_modules():
        if isinstance(unit, FSDP) and unit is not model:
            with FSDP.summon_full_params(unit, recurse=False, writeback=False):
                for key, param in unit.module.named_parameters(recurse=False):
                    full = f"{name}.{key}".replace("_fsdp_wrapped_module.", "")
                    if is_lora(full) and dist.get_rank() == 0:
                        tensors[full] = param.detach().to("cpu", copy=True)
    return tensors
