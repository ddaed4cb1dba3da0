"""`train.offload_base`: the frozen 4-bit weights of the decoder layers live in CPU memory and visit the GPU
one layer at a time, so a model bigger than the card trains on it (70B: ~37 GB of 4-bit weights, 24 GB card).

The unit is a block of a decoder layer (its attention, its MLP): the block's 4-bit weights and quantization
states are copied to the GPU by a forward pre-hook and dropped by a forward hook, in the forward pass and again
in the recompute that gradient checkpointing runs before the layer's backward (transformers checkpoints a
layer's `forward`, so hooks on the layer itself would stay outside the recompute; its blocks' hooks run inside).
The backward needs no hook: `LoRA4bit` saves the weight tensor it was given (on the CPU, its dequantized copy),
so the recomputed block's copy stays alive exactly until its backward is done, then goes. The release hook also
runs when a recompute stops early, at the block's last saved tensor (see fused.py). That is why offloading needs
gradient checkpointing: without it, every block's copy would be kept for backward.

On a GPU the host copies are pinned, and while a block computes, the next one in the direction of travel
(ascending in forward, descending in the backward's recomputes) is copied on a side stream, so the copy
overlaps compute. On the CPU the "copies" are the stored tensors themselves, but a released block still holds
only an empty placeholder: any use of weights that were not installed fails instead of computing garbage.
Loading with offload (`load_quantized(..., park=True)`) quantizes each weight on the GPU and parks it in CPU
memory at once, so neither the 16-bit nor the 4-bit model is ever whole on the GPU.
"""

from __future__ import annotations

import bitsandbytes as bnb
import torch
from bitsandbytes.functional import QuantState
from torch import nn


class OffloadedLayers:
    """Installs each decoder-layer block's 4-bit weights on `device` around each of its forward calls."""

    def __init__(self, layers: nn.ModuleList, device: torch.device) -> None:
        self.device = device
        self.blocks = [block for layer in layers for block in layer.children()  # in execution order
                       if any(isinstance(m, bnb.nn.Linear4bit) for m in block.modules())]
        self.cuda = device.type == "cuda"
        self.stream = torch.cuda.Stream(device) if self.cuda else None
        self.index = {id(block): i for i, block in enumerate(self.blocks)}
        self.store: list[list[tuple[bnb.nn.Linear4bit, torch.Tensor, QuantState]]] = []
        self.prefetched: dict[int, tuple[list, torch.cuda.Event | None]] = {}
        self.last = -1
        for i, block in enumerate(self.blocks):
            entries = []
            for m in block.modules():
                if isinstance(m, bnb.nn.Linear4bit):
                    data = m.weight.data.to("cpu")
                    state = quant_state_to(m.weight.quant_state, "cpu")
                    entries.append((m, data.pin_memory() if self.cuda else data, state))
            self.store.append(entries)
            self._put(i, None)  # now: the unpinned copy goes at once, so host memory never holds two
            block.register_forward_pre_hook(self._install)
            block.register_forward_hook(self._release, always_call=True)  # also when a recompute stops early

    def _install(self, block: nn.Module, args) -> None:
        i = self.index[id(block)]
        copies, ready = self.prefetched.pop(i, None) or (self._copy(i), None)
        if ready is not None:
            torch.cuda.current_stream(self.device).wait_event(ready)
        self._put(i, copies)
        step = 1 if i >= self.last else -1  # forward goes up; the backward's recomputes come down
        self.last = i
        if self.cuda and 0 <= i + step < len(self.blocks) and i + step not in self.prefetched:
            with torch.cuda.stream(self.stream):
                copies_next = self._copy(i + step)
                event = torch.cuda.Event()
                event.record(self.stream)
            self.prefetched[i + step] = (copies_next, event)

    def _release(self, block: nn.Module, args, output) -> None:
        self._put(self.index[id(block)], None)

    def _copy(self, i: int) -> list[tuple[torch.Tensor, QuantState]]:
        return [(data.to(self.device, non_blocking=True), quant_state_to(state, self.device))
                for _, data, state in self.store[i]]

    def _put(self, i: int, copies) -> None:
        """Point block i's linears at `copies` (device tensors), or at empty placeholders (None)."""
        for k, (m, data, _) in enumerate(self.store[i]):
            if copies is None:
                m.weight.data = data.new_empty(0, device=self.device)
                m.weight.quant_state = None
            else:
                m.weight.data, m.weight.quant_state = copies[k]
            m.quant_state = m.weight.quant_state  # bitsandbytes restores the weight's state from here


def quant_state_to(state: QuantState, device: torch.device | str) -> QuantState:
    """A copy of `state` on `device` (bitsandbytes' `QuantState.to` moves the original in place)."""
    nested = None
    if state.nested:
        nested = QuantState(state.state2.absmax.to(device, non_blocking=True), code=state.state2.code.to(device),
                            blocksize=state.state2.blocksize, quant_type=state.state2.quant_type,
                            dtype=state.state2.dtype)
    return QuantState(state.absmax.to(device, non_blocking=True), shape=state.shape, code=state.code.to(device),
                      blocksize=state.blocksize, quant_type=state.quant_type, dtype=state.dtype,
                      offset=state.offset.to(device) if state.offset is not None else None, state2=nested)


def decoder_layers(model: nn.Module) -> nn.ModuleList:
    """The model's stack of decoder layers: the first ModuleList whose every entry holds 4-bit linears."""
    for module in model.modules():
        if isinstance(module, nn.ModuleList) and len(module) > 0 and all(
                any(isinstance(m, bnb.nn.Linear4bit) for m in layer.modules()) for layer in module):
            return module
    raise ValueError("train.offload_base: found no stack of decoder layers with 4-bit linears in this model")
