"""`train.offload_base`: the frozen 4-bit weights of the decoder layers live in CPU memory and visit the GPU
one layer at a time, so a model bigger than the card trains on it (70B: ~37 GB of 4-bit weights, 24 GB card).

The unit is a decoder layer. Its 4-bit weights and quantization states are copied to the device when the first
of its blocks (attention, MLP: the children that hold 4-bit linears) starts, and the layer's linears point at
empty placeholders again when the last block has run: in the forward pass, and again in the recompute that
gradient checkpointing runs right before the layer's backward (transformers checkpoints a layer's `forward`,
so hooks on the layer itself would stay outside the recompute; its blocks' hooks run inside). The backward
needs no hook: `LoRA4bit` saves the weight and state tensors it used through autograd, so the recomputed
layer's copy lives exactly until its backward is done. That is why offloading needs gradient checkpointing:
without it, every layer's copy would be kept for backward.

The order of a training step is known: forward 0, 1, ..., L-1, then the backward recomputes L-1, L-2, ..., 0.
While a layer runs, the next one in that order is copied ahead on a side stream (on a GPU), so at any moment
at most two layers are on the device: the one in use and the one arriving. Every copy made on the side stream
is waited for by the compute stream before use and recorded on it (`record_stream`), so its memory is not
handed to the next copy while the compute stream may still read it. Host copies are pinned, so copies are
asynchronous. On the CPU the "device" copies are clones of the stored tensors: the bookkeeping, and the memory
it bounds, are the GPU's; a released layer holds only empty placeholders, so a use of weights that were not
installed fails instead of computing garbage.

Loading with offload (`load_quantized(..., keep_4bit_on_host=True)`) quantizes each weight on the GPU and moves it
to CPU memory at once, so neither the 16-bit nor the 4-bit model is ever whole on the GPU.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.multiprocessing.reductions import StorageWeakRef

from qlora_kit import nf4
from qlora_kit.fused import phase
from qlora_kit.nf4 import QuantState

Copies = list[tuple[torch.Tensor, QuantState]]  # per linear of a layer: (4-bit data, quant state), on the device


class OffloadedLayers:
    """Installs each decoder layer's 4-bit weights on `device` while it runs, one layer ahead at most."""

    def __init__(self, layers: nn.ModuleList, device: torch.device) -> None:
        self.device = device
        self.cuda = device.type == "cuda"
        self.stream = torch.cuda.Stream(device) if self.cuda else None
        self.linears: list[list[nf4.Linear4bit]] = []
        self.store: list[list[tuple[torch.Tensor, QuantState]]] = []  # host copies, pinned on GPUs
        self.blocks: list[int] = []  # blocks per layer
        self.blocks_left: list[int] = []  # blocks of the layer still to run in this pass
        self.installed: int | None = None
        self.prefetched: dict[int, tuple[Copies, torch.cuda.Event | None]] = {}
        self.copies: list[tuple[int, StorageWeakRef]] = []  # every device copy made, to count what is alive
        self.max_resident = 0  # most layers on the device at once, seen when a layer starts
        for i, layer in enumerate(layers):
            blocks = [b for b in layer.children() if any(nf4.is_4bit(m) for m in b.modules())]
            linears = [m for b in blocks for m in b.modules() if nf4.is_4bit(m)]
            self.linears.append(linears)
            self.store.append([nf4.to_host(m.weight.data, m.weight.quant_state, pin=self.cuda) for m in linears])
            self.blocks.append(len(blocks))
            self.blocks_left.append(len(blocks))
            self._point(i, None)  # the loaded copies go now, so memory never holds two
            for block in blocks:
                block.register_forward_pre_hook(lambda *_, i=i: self._start(i))
                block.register_forward_hook(lambda *_, i=i: self._finish(i), always_call=True)

    def resident(self) -> set[int]:
        """Layers with any device copy still alive: installed, arriving, or kept by autograd for backward."""
        self.copies = [(i, ref) for i, ref in self.copies if not ref.expired()]
        return {i for i, _ in self.copies}

    def _start(self, i: int) -> None:
        if self.installed == i:
            return
        if self.installed is not None:  # a pass that stopped inside a layer (an error): let it go
            self._point(self.installed, None)
        copies, ready = self.prefetched.pop(i, None) or (self._copy(i), None)
        if ready is not None:
            current = torch.cuda.current_stream(self.device)
            current.wait_event(ready)
            for data, state in copies:  # freed copies must not be reused while this stream may still read them
                for t in (data, *nf4.state_tensors(state)):
                    t.record_stream(current)
        self._point(i, copies)
        self.installed = i
        following = self._next(i)
        if following not in (None, i) and following not in self.prefetched:
            self._prefetch(following)
        self.max_resident = max(self.max_resident, len(self.resident()))

    def _finish(self, i: int) -> None:
        self.blocks_left[i] -= 1
        if self.blocks_left[i] > 0:
            return
        self.blocks_left[i] = self.blocks[i]
        if phase() == "forward" and self._next(i) == i:  # the last layer's recompute comes right after
            self.prefetched[i] = ([(m.weight.data, m.weight.quant_state) for m in self.linears[i]], None)
        self._point(i, None)
        self.installed = None

    def _next(self, i: int) -> int | None:
        """The layer that runs after layer i: up in the forward pass (the last one is recomputed next), down in
        the backward's recomputes; in a plain forward (evaluation) nothing after the last."""
        if phase() == "recompute":
            return i - 1 if i > 0 else None
        if i + 1 < len(self.linears):
            return i + 1
        return i if phase() == "forward" else None

    def _prefetch(self, i: int) -> None:
        if not self.cuda:  # no second stream: the clone is made now, and the bookkeeping is the GPU's
            self.prefetched[i] = (self._copy(i), None)
            return
        with torch.cuda.stream(self.stream):
            copies = self._copy(i)
            ready = torch.cuda.Event()
            ready.record(self.stream)
        self.prefetched[i] = (copies, ready)

    def _copy(self, i: int) -> Copies:
        copies = [(nf4.copy_to(data, self.device), nf4.state_to(state, self.device)) for data, state in self.store[i]]
        self.resident()  # forget the copies already freed, so this list stays as short as what is alive
        self.copies += [(i, StorageWeakRef(t.untyped_storage())) for data, state in copies
                        for t in (data, *nf4.state_tensors(state))]
        return copies

    def _point(self, i: int, copies: Copies | None) -> None:
        """Point layer i's linears at `copies`, or at empty placeholders (None)."""
        for k, m in enumerate(self.linears[i]):
            if copies is None:
                m.weight.data = self.store[i][k][0].new_empty(0, device=self.device)
                m.weight.quant_state = None
            else:
                m.weight.data, m.weight.quant_state = copies[k]
            m.quant_state = m.weight.quant_state  # bitsandbytes restores the weight's state from here


def decoder_layers(model: nn.Module) -> nn.ModuleList:
    """The model's stack of decoder layers: the first ModuleList whose every entry holds 4-bit linears."""
    for module in model.modules():
        if isinstance(module, nn.ModuleList) and len(module) > 0 and all(
                any(nf4.is_4bit(m) for m in layer.modules()) for layer in module):
            return module
    raise ValueError("train.offload_base: found no stack of decoder layers with 4-bit linears in this model")
