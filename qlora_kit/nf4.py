"""The frozen 4-bit base: bitsandbytes' NF4/FP4 linear layer as qlora-kit uses it, and the one module that knows
bitsandbytes' internals (its layer and parameter classes, quantization states, kernels' quirks). The rest of
qlora-kit asks this module: build a layer, read its weight and state, dequantize, move a state, save it
through autograd.

A quantized weight is a pair: `data`, the packed 4-bit codes (two a byte, stored in `quant.storage_dtype`), and
a `QuantState`: per block of 64 weights an absmax scale (itself 8-bit quantized with an fp32 scale per 256
blocks under double quantization), the code table (NF4's 16 values), the original shape and dtype. Weights are
dequantized into the dtype they were quantized from, then cast to the compute dtype.
"""

from __future__ import annotations

from collections.abc import Callable

import bitsandbytes as bnb
import torch
from bitsandbytes.functional import QuantState, dequantize_4bit, dequantize_blockwise
from bitsandbytes.nn.modules import fix_4bit_weight_quant_state_from_module
from torch import nn

from qlora_kit import cpu
from qlora_kit.config import QuantConfig
from qlora_kit.errors import UserError

Linear4bit = bnb.nn.Linear4bit
__all__ = ["Linear4bit", "QuantState"]  # re-exported: type hints elsewhere name them through this module


def is_4bit(module: nn.Module) -> bool:
    return isinstance(module, Linear4bit)


def quantized_linear(linear: nn.Linear, weight: torch.Tensor | None, quant: QuantConfig, dtype: torch.dtype,
                     device: torch.device) -> Linear4bit:
    """A frozen 4-bit layer shaped like `linear`, holding `weight` quantized on `device`, computing in `dtype`.
    `weight` None: an empty meta shell of the packed shape, its quantization state to come (FSDP's other
    processes). The layer never repacks itself (`keep_layout`)."""
    storage = getattr(torch, quant.storage_dtype)
    q = Linear4bit(linear.in_features, linear.out_features, bias=linear.bias is not None, compute_dtype=dtype,
                   compress_statistics=quant.double_quant, quant_type=quant.quant_type, quant_storage=storage,
                   device="meta")
    state = None
    if weight is None:  # two 4-bit codes a byte, in storage-dtype elements: the shape bitsandbytes gives a real one
        weight = torch.empty((linear.in_features * linear.out_features + 1) // 2 // storage.itemsize, 1,
                             dtype=storage, device="meta")
    elif weight.is_meta:  # the memory trace: `Params4bit.to` never quantizes on the meta device, this does
        # bitsandbytes caches its 8-bit code table on the device of the first tensor it quantizes: made on the
        # meta device, every later real quantization in the process would fail. It goes to the CPU first.
        bnb.functional.name2qmap.setdefault("dynamic", bnb.functional.create_dynamic_map())
        weight, state = bnb.functional.quantize_4bit(weight, blocksize=quant.blocksize, quant_type=quant.quant_type,
                                                     compress_statistics=quant.double_quant, quant_storage=storage)
    # module=q: quantizing also sets `q.quant_state`, where bitsandbytes finds the state again when FSDP hands the
    # layer a plain view of its weight. `.to` quantizes, on the device.
    packed = weight.is_meta
    q.weight = bnb.nn.Params4bit(weight, requires_grad=False, quant_state=state, compress_statistics=quant.double_quant,
                                 quant_type=quant.quant_type, blocksize=quant.blocksize, quant_storage=storage,
                                 module=q, bnb_quantized=packed)
    q.quant_state = state
    if not packed:
        q.weight = q.weight.to(device)
    keep_layout(q)
    return q


def keep_layout(model: nn.Module) -> None:
    """Make every 4-bit layer of `model` compute in its compute dtype from its own weights, on every CPU.

    On CPUs with AVX512-BF16, bitsandbytes' `Linear4bit.forward` repacks the layer's weight in place at its first
    eval forward without grad (bf16 block scales, another nibble order) and computes in bf16 from then on,
    whatever the compute dtype. The same adapter would then give other numbers on other machines, an evaluation
    during training would change the base the next steps train on, and state dicts read afterwards would hold
    re-quantized block scales. qlora-kit turns this off per layer, for every layer it builds
    (`quantized_linear`) and for reference models in tests: bitsandbytes layers built by anyone else in the
    process are left as they are. The opt-in bf16 kernel for generation (`use_cpu_bf16_kernel`) is the one way
    back.
    """
    for module in model.modules():
        if is_4bit(module):
            module.support_avx512bf16_for_cpu = False


def use_cpu_bf16_kernel(model: nn.Module) -> None:
    """Opt in to bitsandbytes' bf16 kernel for `model`'s 4-bit layers: faster generation on CPUs with
    AVX512-BF16 (see docs/performance.md), at bf16 precision. For `generate` only: the layers are repacked at
    their first forward, so the model must not be scored, merged, saved or trained afterwards."""
    if not bnb.functional.has_avx512bf16():
        raise UserError("--cpu-bf16-kernel needs a CPU with AVX512-BF16 (`avx512_bf16` in /proc/cpuinfo); "
                        "this one has none")
    for module in model.modules():
        if is_4bit(module):
            module.support_avx512bf16_for_cpu = True
        if hasattr(module, "base_kernel"):  # LoRA layers: through the base layer's own forward, where it lives
            module.base_kernel = True


def weight_and_state(layer: Linear4bit) -> tuple[torch.Tensor, QuantState]:
    """The layer's packed codes and quantization state. FSDP hands the layer a plain view of its weight, which
    has lost the state: bitsandbytes keeps a copy on the layer, put back here."""
    fix_4bit_weight_quant_state_from_module(layer)
    return layer.weight.data, layer.weight.quant_state


def dequantize(weight: torch.Tensor, state: QuantState, dtype: torch.dtype) -> torch.Tensor:
    """The weight `weight` and `state` encode, in `dtype`. On the CPU (`cpu.speedups`), double-quantized block
    scales are decoded once and kept with the state: one float per 64 weights, a fifth of each dequantization."""
    if not cpu.speedups(weight.device) or not state.nested:
        return dequantize_4bit(weight, state).to(dtype)
    flat = getattr(state, "qlora_kit_decoded", None)
    if flat is None:
        absmax = dequantize_blockwise(state.absmax, state.state2).add_(state.offset).float()
        flat = QuantState(absmax, shape=state.shape, code=state.code, blocksize=state.blocksize,
                          quant_type=state.quant_type, dtype=state.dtype)
        state.qlora_kit_decoded = flat
    return dequantize_4bit(weight, flat).to(dtype)


def quantize(weight: torch.Tensor, quant: QuantConfig, device: torch.device) -> tuple[torch.Tensor, QuantState]:
    """`weight` (2-D) quantized on `device` exactly as `Params4bit.to` quantizes a layer's weight: packed codes
    (shape (numel / 2 / storage itemsize, 1)) and their state. On the meta device (the memory trace) too."""
    if weight.is_meta:  # bitsandbytes' code table must not be first made on the meta device: see quantized_linear
        bnb.functional.name2qmap.setdefault("dynamic", bnb.functional.create_dynamic_map())
    return bnb.functional.quantize_4bit(weight.contiguous().to(device), blocksize=quant.blocksize,
                                        compress_statistics=quant.double_quant, quant_type=quant.quant_type,
                                        quant_storage=getattr(torch, quant.storage_dtype))


def quantize_roundtrip(weight: torch.Tensor, quant: QuantConfig, device: torch.device) -> torch.Tensor:
    """The weight a 4-bit layer computes with: `weight` quantized exactly as `quantized_linear` does, then
    dequantized (in `weight`'s dtype). Merging adds the adapter to this, not to the original weight."""
    return dequantize_4bit(*quantize(weight, quant, device))


def matmul(x: torch.Tensor, weight: torch.Tensor, state: QuantState) -> torch.Tensor:
    """x @ W^T for packed codes `weight` (as `quantize` returns them) through bitsandbytes' autograd function,
    which keeps the packed codes, not the dequantized weight, for the backward (what `Linear4bit.forward` does)."""
    return bnb.matmul_4bit(x, weight.t(), quant_state=state)


def split_state(state: QuantState) -> tuple[tuple[torch.Tensor | None, ...], tuple]:
    """A quantization state as (tensors, the rest): for `save_for_backward`, and for sending to other processes.
    On the CPU with double quantization the decoded scales (see `dequantize`) stand in for the nested ones, so the
    receiver does not decode them again."""
    state = getattr(state, "qlora_kit_decoded", None) or state
    nested = state.state2 if state.nested else None
    layout = (state.shape, state.blocksize, state.quant_type, state.dtype,
              (nested.blocksize, nested.quant_type, nested.dtype) if nested else None)
    return _tensors(state), layout


def join_state(tensors, layout: tuple) -> QuantState:
    """The inverse of `split_state`."""
    absmax, code, offset, absmax2, code2 = tensors
    shape, blocksize, quant_type, dtype, nested = layout
    state2 = None
    if nested is not None:
        state2 = QuantState(absmax2, code=code2, blocksize=nested[0], quant_type=nested[1], dtype=nested[2])
    return QuantState(absmax, shape=shape, code=code, blocksize=blocksize, quant_type=quant_type, dtype=dtype,
                      offset=offset, state2=state2)


def state_tensors(state: QuantState) -> list[torch.Tensor]:
    """Every tensor a quantization state holds."""
    return [t for t in _tensors(state) if t is not None]


def _tensors(state: QuantState) -> tuple[torch.Tensor | None, ...]:
    nested = state.state2 if state.nested else None
    return (state.absmax, state.code, state.offset, nested.absmax if nested else None,
            nested.code if nested else None)


def map_state(state: QuantState, fn: Callable[[torch.Tensor], torch.Tensor]) -> QuantState:
    """`state` with `fn` applied to each of its tensors (bitsandbytes' `QuantState.to` moves the original in
    place, and blocks on the small tensors)."""
    nested = None
    if state.nested:
        nested = QuantState(fn(state.state2.absmax), code=fn(state.state2.code), blocksize=state.state2.blocksize,
                            quant_type=state.state2.quant_type, dtype=state.state2.dtype)
    return QuantState(fn(state.absmax), shape=state.shape, code=fn(state.code), blocksize=state.blocksize,
                      quant_type=state.quant_type, dtype=state.dtype,
                      offset=fn(state.offset) if state.offset is not None else None, state2=nested)


def copy_to(t: torch.Tensor, device: torch.device | str) -> torch.Tensor:
    """A copy of `t` on `device`: asynchronous from pinned memory; a clone when `device` is where `t` is."""
    return t.to(device, non_blocking=True, copy=True)


def state_to(state: QuantState, device: torch.device | str) -> QuantState:
    """A copy of `state` on `device`, every tensor copied asynchronously."""
    return map_state(state, lambda t: copy_to(t, device))


def to_host(data: torch.Tensor, state: QuantState, pin: bool) -> tuple[torch.Tensor, QuantState]:
    """Host copies of a 4-bit weight and its state; pinned when they will be copied to a GPU."""
    def host(t: torch.Tensor) -> torch.Tensor:
        if t.is_meta:  # the memory trace: host copies of meta tensors are meta tensors, counted as host memory
            return t
        t = t.to("cpu")
        return t.pin_memory() if pin else t

    return host(data), map_state(state, host)


def move_to_host(layer: Linear4bit) -> None:
    """Move a layer's 4-bit weight and state to CPU memory (`train.offload_base` and FSDP load this way, so the
    whole model is never on the GPU)."""
    layer.weight.data, layer.weight.quant_state = layer.weight.data.to("cpu"), state_to(layer.weight.quant_state,
                                                                                        "cpu")
    layer.quant_state = layer.weight.quant_state
