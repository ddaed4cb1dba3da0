"""`qlora-kit estimate RECIPE --trace`: one real training step at the recipe's full shape, on the meta device, with
every byte it allocates counted.

Meta tensors carry shapes and dtypes but no data. So the model qlora-kit would train (4-bit codes and quantization
states as `nf4` lays them out, LoRA as `train.build_model` adds it, the GPU's compute dtype, the GPU code path:
`cpu.speedups` is off off the CPU) runs its forward, the checkpointed recompute, the backward, gradient clipping
and the optimizer's step in seconds and no memory, whatever the model's size. `MemoryTrace` (a
`TorchDispatchMode`) sees every tensor each op returns: a storage counts from its first appearance until Python
frees it, rounded up to the CUDA caching allocator's 512-byte blocks, so the live total after every op is what
`torch.cuda.memory_allocated` would say. Its peak, where it happened, and what was live then are the report.

What a GPU would do differently from the meta device is put back: attention is counted as the flash kernel
(output and an fp32 log-sum-exp saved; no T x T tensor unless the model's own code builds one), and the causal
mask transformers would build and then skip (rows that attend per example) is not built. The optimizer's states
exist before the traced step, as in every step after the first. `train.offload_base`: the stored 4-bit layers are
host memory, counted apart, and the trace reports how many layers were ever on the device at once.
"""

from __future__ import annotations

import dataclasses
import json
import tempfile
import weakref
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, sdpa_mask

from qlora_kit import attention, fused, nf4
from qlora_kit.batching import collate, collate_padding_free, collate_rows
from qlora_kit.config import Recipe
from qlora_kit.experts import PackedExperts
from qlora_kit.loss import token_loss_sum
from qlora_kit.model import compute_dtype_for
from qlora_kit.optim import build_optimizer

BLOCK = 512  # the CUDA caching allocator rounds every allocation up to this
CATEGORIES = ("4-bit weights", "embeddings, head, norms", "LoRA weights", "LoRA gradients", "optimizer states",
              "saved for backward", "temporaries")


@dataclass
class Trace:
    peak: int  # device bytes
    where: str  # phase and module at the peak
    parts: dict[str, int]  # CATEGORIES -> bytes live at the peak
    host: int = 0  # bytes in host memory (offloaded 4-bit layers)
    resident_layers: int | None = None  # train.offload_base: most decoder layers on the device at once
    notes: list[str] = field(default_factory=list)
    largest: list[tuple[int, str]] = field(default_factory=list)  # (bytes, what made it) of the largest temporaries


class MemoryTrace(TorchDispatchMode):
    """Live storage bytes after every op; at each new peak (by 0.1% or more) what they are."""

    def __init__(self, model: torch.nn.Module, optimizer: torch.optim.Optimizer, host: list[torch.Tensor],
                 offload=None) -> None:
        super().__init__()
        self.model, self.optimizer, self.offload = model, optimizer, offload
        self.live: dict[int, tuple[int, str]] = {}  # storage key -> (bytes, kind: "device"/"host")
        self.origin: dict[int, str] = {}  # storage key -> the op and place that made it
        self.op = "setup"
        self.largest: list[tuple[int, str]] = []  # at the peak: the largest temporaries
        self.device_bytes = self.peak = self.snapshot_at = 0
        self.phase, self.where, self.parts = "setup", "", {}
        self.saved: set[int] = set()
        self.modules: list[str] = []
        names = {id(m): n for n, m in model.named_modules()}
        for t in host:
            self.track(t, "host")
        optimizer_states = [t for state in optimizer.state.values() for t in state.values()
                            if isinstance(t, torch.Tensor)]
        grads = [p.grad for p in model.parameters() if p.grad is not None]
        for t in [*model.parameters(), *model.buffers(), *self.state_tensors(), *optimizer_states, *grads]:
            self.track(t)
        self.hooks = [torch.nn.modules.module.register_module_forward_pre_hook(
                          lambda m, *_: self.modules.append(names.get(id(m), type(m).__name__))),
                      torch.nn.modules.module.register_module_forward_hook(self._left, always_call=True)]

    def _left(self, module, args, output) -> None:  # a forward hook: returns None, or it would replace the output
        if self.modules:
            self.modules.pop()

    def state_tensors(self) -> list[torch.Tensor]:
        return [t for layer in self.model.modules() if nf4.is_4bit(layer) and layer.weight.quant_state is not None
                for t in nf4.state_tensors(layer.weight.quant_state)]

    def track(self, t: torch.Tensor, kind: str = "device") -> None:
        storage = t.untyped_storage()
        key = storage._cdata  # the storage itself, whichever Python object stands for it
        if key in self.live:
            return
        size = -(-storage.nbytes() // BLOCK) * BLOCK if storage.nbytes() else 0
        self.live[key] = (size, kind)
        self.origin[key] = f"{self.op} {tuple(t.shape)} {t.dtype} ({self.location()})"
        weakref.finalize(storage, self.free, key)
        if kind == "device":
            self.device_bytes += size
            if self.device_bytes > self.peak:
                self.peak = self.device_bytes
                self.where = self.location()
                if self.peak > self.snapshot_at * 1.001:
                    self.snapshot()

    def free(self, key: int) -> None:
        self.origin.pop(key, None)
        size, kind = self.live.pop(key, (0, "host"))
        if kind == "device":
            self.device_bytes -= size

    def location(self) -> str:
        phase = "recompute" if self.phase == "backward" and fused.phase() == "recompute" else self.phase
        if self.modules:
            return f"{phase}, in {self.modules[-1]}"
        node = torch._C._current_autograd_node() if self.phase == "backward" else None
        return f"{phase}, in {node.name()}" if node is not None else phase

    def snapshot(self) -> None:
        """What the live bytes are, by category (see CATEGORIES)."""
        self.snapshot_at = self.peak
        kinds: dict[int, str] = {}
        for name, p in self.model.named_parameters():
            kind = "LoRA weights" if "lora_" in name else (
                "4-bit weights" if nf4.is_4bit(self.model.get_submodule(name.rpartition(".")[0]))
                and name.endswith(".weight") else "embeddings, head, norms")
            kinds[p.untyped_storage()._cdata] = kind
            if p.grad is not None:
                kinds[p.grad.untyped_storage()._cdata] = "LoRA gradients"
        for m in self.model.modules():  # MoE experts (experts.py): 4-bit codes and scales held as buffers
            for b in m.buffers(recurse=False) if isinstance(m, PackedExperts) else ():
                kinds[b.untyped_storage()._cdata] = "4-bit weights"
        for b in self.model.buffers():
            kinds.setdefault(b.untyped_storage()._cdata, "embeddings, head, norms")
        for t in self.state_tensors():
            kinds.setdefault(t.untyped_storage()._cdata, "4-bit weights")
        for _, ref in self.offload.copies if self.offload else []:  # offloaded layers' device copies
            kinds[ref.cdata] = "4-bit weights"
        for state in self.optimizer.state.values():
            for t in state.values():
                if isinstance(t, torch.Tensor):
                    kinds[t.untyped_storage()._cdata] = "optimizer states"
        parts = Counter()
        for key, (size, kind) in self.live.items():
            if kind == "device":
                parts[kinds.get(key, "saved for backward" if key in self.saved else "temporaries")] += size
        self.parts = {c: parts.get(c, 0) for c in CATEGORIES}
        self.largest = sorted(((size, self.origin.get(key, "?")) for key, (size, kind) in self.live.items()
                               if kind == "device" and key not in kinds), reverse=True)[:5]

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        self.op = func.__name__
        for t in out if isinstance(out, (tuple, list)) else (out,):
            if isinstance(t, torch.Tensor):
                self.track(t)
        return out

    def mark_saved(self, t: torch.Tensor) -> torch.Tensor:
        """`saved_tensors_hooks` pack hook: what autograd keeps for backward."""
        self.saved.add(t.untyped_storage()._cdata)
        return t

    def close(self) -> None:
        for hook in self.hooks:
            hook.remove()


class _FlashLike(torch.autograd.Function):
    """The memory of flash attention's variable-length kernel: the output and an fp32 log-sum-exp per query and
    head are saved; backward makes the gradients of q, k and v. (The meta device has no flash kernel; its
    attention would be the math one, with a T x T tensor per example a GPU never allocates.)"""

    @staticmethod
    def forward(ctx, q, k, v):
        out = q.new_empty(q.shape[0], q.shape[1], v.shape[-1])
        lse = q.new_empty(q.shape[1], q.shape[0], dtype=torch.float32)
        ctx.save_for_backward(q, k, v, out, lse)
        return out

    @staticmethod
    def backward(ctx, grad):
        q, k, v, _, _ = ctx.saved_tensors
        return torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)


def _flash_like(q, k, v, *args, **kwargs):
    return _FlashLike.apply(q, k, v)


def trace_step(recipe: Recipe, config: dict, gpu_has_bf16: bool = True) -> Trace:
    """Trace one optimizer step of `recipe` (one micro-batch) on a model of `config` (a config.json's fields)."""
    from qlora_kit.train import build_model, enable_checkpointing

    quant = dataclasses.replace(recipe.quant, compute_dtype=str(compute_dtype_for(
        recipe.quant.compute_dtype, torch.device("cuda"), gpu_has_bf16)).removeprefix("torch."))
    recipe = dataclasses.replace(recipe, quant=quant)
    with tempfile.TemporaryDirectory() as model_dir:
        (Path(model_dir) / "config.json").write_text(json.dumps(config))
        loaded = build_model(recipe, torch.device("meta"), Path(model_dir), tokenizer=object(), read_weights=False)
    model, t = loaded.model, recipe.train
    if t.gradient_checkpointing:
        enable_checkpointing(model)
    model.train()
    optimizer = build_optimizer(model, recipe.optim, t.lr, paged=False)
    trainable = [p for p in model.parameters() if p.requires_grad]
    for p in trainable:  # the states every step after the first finds allocated
        p.grad = torch.empty_like(p)
    optimizer.step()
    # The traced micro-batch is the step's last: with accumulation its gradients exist before it starts.
    optimizer.zero_grad(set_to_none=t.grad_accum == 1)
    batch = _text_batch(recipe, config.get("vocab_size", 32000))
    host = [d for layer in loaded.offload.store for d, _ in layer] if loaded.offload else []
    host += [x for layer in loaded.offload.store for _, s in layer for x in nf4.state_tensors(s)] \
        if loaded.offload else []
    handle = model.register_forward_pre_hook(_to_meta, with_kwargs=True)
    tracker = MemoryTrace(model, optimizer, host, loaded.offload)
    restore = _gpu_attention()
    try:
        with tracker, torch.autograd.graph.saved_tensors_hooks(tracker.mark_saved, lambda x: x):
            tracker.phase = "forward"
            loss, n = token_loss_sum(model, batch)
            tracker.phase = "backward"
            (loss / max(n, 1)).backward()
            tracker.phase = "clip"
            torch.nn.utils.clip_grad_norm_(trainable, t.max_grad_norm or float("inf"))
            tracker.phase = "optimizer"
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
    finally:
        restore()
        handle.remove()
        tracker.close()
    notes = ["one micro-batch of text rows (every position a label, as the estimate assumes)",
             "optimizer states are counted on the device; paged optimizers keep them in CUDA unified memory, "
             "which torch.cuda.max_memory_allocated does not count"]
    return Trace(tracker.peak, tracker.where, tracker.parts, sum(size for size, kind in tracker.live.values()
                                                                 if kind == "host"),
                 loaded.offload.max_resident if loaded.offload else None, notes, tracker.largest)


def _text_batch(recipe: Recipe, vocab: int) -> dict[str, torch.Tensor]:
    """One micro-batch of the recipe's shape: micro_batch_size examples of seq_len tokens, every one a label."""
    t = recipe.train
    ids = torch.randint(3, max(vocab, 4), (t.micro_batch_size, t.seq_len), generator=torch.Generator().manual_seed(0))
    examples = [{"input_ids": row.tolist(), "labels": row.tolist(), "length": t.seq_len} for row in ids]
    if recipe.data.packing == "padding_free":
        return collate_padding_free(examples)
    if recipe.data.packing == "pack":
        return collate_rows([[e] for e in examples], pad_id=0)
    return collate(examples, pad_id=0)


def _to_meta(module, args, kwargs):
    """The batch goes to the meta device with the model (its values are read on the CPU first: example spans,
    label positions); the 2-D padding mask stays, so that transformers can read it."""
    return args, {k: v.to("meta") if isinstance(v, torch.Tensor) and (k != "attention_mask" or v.dim() == 4) else v
                  for k, v in kwargs.items()}


def _gpu_attention():
    """Attention as on a GPU (see the module docstring); returns the function that undoes it."""
    saved = attention.varlen_attn, attention._varlen_ok
    attention.varlen_attn, attention._varlen_ok = _flash_like, lambda *a: True
    ALL_MASK_ATTENTION_FUNCTIONS.register(attention.NAME, lambda *a, **k: None)

    def restore():
        attention.varlen_attn, attention._varlen_ok = saved
        ALL_MASK_ATTENTION_FUNCTIONS.register(attention.NAME, sdpa_mask)

    return restore


def format_trace(trace: Trace, estimate, shards: int = 1) -> str:
    """The trace beside the estimate (which also counts the CUDA context and allocator slack the trace cannot)."""
    from qlora_kit.estimate import gib

    runtime = sum(v for k, v in estimate.parts.items() if k in ("allocator slack", "CUDA context"))
    lines = [f"traced peak (one micro-batch on the meta device, GPU code path): {gib(trace.peak)} allocated, at "
             f"{trace.where}; with the estimate's CUDA context and allocator slack: {gib(trace.peak + runtime)}"]
    lines += [f"  {name:<26}{gib(size):>12}" for name, size in trace.parts.items()]
    if trace.resident_layers is not None:
        lines.append(f"  train.offload_base: at most {trace.resident_layers} decoder layers' 4-bit weights on the "
                     f"device at once; {gib(trace.host)} of 4-bit layers in host memory")
    lines += [f"  largest at the peak: {gib(size).strip()} {what}" for size, what in trace.largest]
    if shards > 1:
        lines.append(f"  per process under FSDP over {shards}: {gib(per_process(trace, estimate))} (derived, not "
                     "traced: the trace with what FSDP shards divided, or moved to the host with its offload, plus "
                     "what it gathers at a time, as the estimate counts it)")
    lines += [f"  note: {n}" for n in trace.notes]
    return "\n".join(lines)


def per_process(trace: Trace, estimate) -> int:
    """A process's device bytes under FSDP, from the single-process trace: the weights, LoRA, gradients and
    optimizer states sharded (or, with FSDP's offload, on the host), plus what FSDP gathers at a time."""
    sharded = sum(trace.parts[k] for k in CATEGORIES[:5])
    kept = 0 if estimate.offload else sharded // estimate.shards
    gathered = sum(v for k, v in estimate.parts.items() if k.startswith("gathered"))
    return trace.peak - sharded + kept + gathered
