"""Mixture-of-experts blocks in 4-bit: every expert's weights quantized on their own, LoRA per expert.

In transformers 5 an MoE block's experts are not `nn.Linear` modules but two 3-D parameters, `gate_up_proj`
(experts, 2 x intermediate, hidden) and `down_proj` (experts, hidden, intermediate): quantizing linears alone
would leave ~95% of Qwen3-30B-A3B in 16 bits. `Experts4bit` replaces such a module:

    for each expert e that received tokens (x: those tokens' hidden states):
        gate, up = x @ dequant(G_e)^T + s * (x @ A_ge^T) @ B_ge^T            (fused.lora_4bit)
        y        = (act(gate) * up) @ dequant(D_e)^T + s * (...) @ B_de^T    (fused.lora_4bit)
        out[tokens] += routing weight * y

Each expert matrix (`gate_up_proj[e]`, `down_proj[e]`) is quantized as one tensor, exactly as bitsandbytes
quantizes a linear's weight, whichever layout the checkpoint stores it in (fused, or one tensor per expert and
projection as most hub checkpoints do: `experts.0.w1`). Experts that received no token are never dequantized;
the others once in the forward and again in the backward, as dense layers are (see fused.py).

LoRA weights are kept in PEFT's layout for a 3-D parameter (`target_parameters`, PEFT's `ParamWrapper`):
`lora_A.weight` (experts x r, d_in), rows e*r .. e*r+r-1 for expert e; `lora_B.weight` (d_out, r x experts),
columns e, e+E, e+2E, ... for expert e. The adapter file is then PEFT's own, and saving is a rename
(`peft_module_name`). The router (`mlp.gate`, a plain parameter in transformers 5, not a linear) stays in the
compute dtype and frozen, as transformers' own 4-bit load leaves it.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass

import torch
from torch import nn

from qlora_kit import nf4
from qlora_kit.config import QuantConfig
from qlora_kit.errors import UserError
from qlora_kit.fused import lora_4bit

# transformers registers them in this order, and PEFT nests its wrappers in the order of registration: the first
# targeted projection of a block is the innermost (`experts.base_layer.lora_A`), the last the outermost.
PROJECTIONS = ("gate_up_proj", "down_proj")


@dataclass(frozen=True)
class Family:
    """How a model family's hub checkpoints store experts one tensor each (transformers' conversion mapping)."""

    renames: tuple[tuple[str, str], ...]  # checkpoint name fragment -> model name fragment
    leaves: dict[str, tuple[str, int | None]]  # per-expert leaf -> (projection, half of gate_up: 0 gate, 1 up)


_QWEN = Family((), {"gate_proj": ("gate_up_proj", 0), "up_proj": ("gate_up_proj", 1), "down_proj": ("down_proj", None)})
# The families tested end to end (tests/test_moe.py); Qwen2-MoE adds a shared expert, plain linears.
FAMILIES = {
    "qwen2_moe": _QWEN,
    "qwen3_moe": _QWEN,
    "mixtral": Family(((".block_sparse_moe.", ".mlp."),),
                      {"w1": ("gate_up_proj", 0), "w3": ("gate_up_proj", 1), "w2": ("down_proj", None)}),
}
MOE_UNSUPPORTED = "mixture-of-experts models: train.offload_base and FSDP do not support their 4-bit experts yet"
_PER_EXPERT = re.compile(r"^(?P<block>.+\.experts)\.(?P<expert>\d+)\.(?P<leaf>\w+)\.weight$")


def check_supported(model: nn.Module) -> None:
    """Refuse, before any weight is read, a model with 3-D (expert) parameters qlora-kit cannot quantize: it
    would otherwise train with those experts silently in 16 bits."""
    blocks = {n: m for n, m in model.named_modules() if any(p.dim() >= 3 for p in m.parameters(recurse=False))}
    if not blocks:
        return
    model_type = model.config.model_type
    name, module = next(iter(blocks.items()))
    if model_type not in FAMILIES or not all(_standard(m) for m in blocks.values()):
        shapes = ", ".join(f"{k} {tuple(p.shape)}" for k, p in module.named_parameters(recurse=False))
        raise UserError(f"{model_type}: its mixture-of-experts layout ({type(module).__name__} at {name}: {shapes}) "
                        f"is not supported (supported: {', '.join(sorted(FAMILIES))}); qlora-kit does not train "
                        "experts left in 16 bits")


def _standard(module: nn.Module) -> bool:
    """transformers' standard experts layout: concatenated [gate; up] and down, (experts, out, in), no bias, no
    post-expert norm, act(gate) * up."""
    params = dict(module.named_parameters(recurse=False))
    if params.keys() != set(PROJECTIONS):
        return False
    (e, two_i, h), (e2, h2, i) = params["gate_up_proj"].shape, params["down_proj"].shape
    flags = (getattr(module, "has_gate", False), not getattr(module, "has_bias", True),
             not getattr(module, "is_transposed", True), getattr(module, "is_concatenated", False),
             not getattr(module, "has_post_expert_norm", True))
    default_gate = getattr(getattr(module, "_apply_gate", None), "__name__", "") == "_default_apply_gate"
    return all(flags) and default_gate and e == e2 and h == h2 and two_i == 2 * i


def expert_blocks(model: nn.Module) -> list[str]:
    """Names of the experts modules (transformers' or `Experts4bit`)."""
    return [n for n, m in model.named_modules()
            if isinstance(m, Experts4bit) or (n.endswith("experts") and _standard(m))]


def expert_shapes(model: nn.Module) -> dict[str, tuple[int, int, int]]:
    """(experts, d_in, d_out) of each expert projection, by name (`...mlp.experts.gate_up_proj`); on meta
    models too. These are quantized, and may get LoRA, like linears."""
    shapes = {}
    for block in expert_blocks(model):
        module = model.get_submodule(block)
        for proj in PROJECTIONS:
            p = getattr(module, proj)
            shapes[f"{block}.{proj}"] = ((p.num_experts, p.d_in, p.d_out) if isinstance(p, PackedExperts)
                                         else (p.shape[0], p.shape[2], p.shape[1]))
    return shapes


def is_projection(name: str) -> bool:
    """An expert projection's name, as `expert_shapes` gives it."""
    parent, _, leaf = name.rpartition(".")
    return leaf in PROJECTIONS and parent.rpartition(".")[2] == "experts"


class PackedExperts(nn.Module):
    """One projection (d_out x d_in) of every expert, each expert quantized on its own, stacked: packed codes
    (experts, numel / 2, 1) and per-expert block scales; optionally a LoRA pair per expert in PEFT's layout."""

    def __init__(self, num_experts: int, d_in: int, d_out: int, quant: QuantConfig, dtype: torch.dtype,
                 device: torch.device) -> None:
        super().__init__()
        self.num_experts, self.d_in, self.d_out, self.compute_dtype = num_experts, d_in, d_out, dtype
        self.quant = quant
        storage = getattr(torch, quant.storage_dtype)
        numel, blocks = d_in * d_out, math.ceil(d_in * d_out / quant.blocksize)
        self.register_buffer("codes", torch.empty(num_experts, (numel + 1) // 2 // storage.itemsize, 1,
                                                  dtype=storage, device=device))
        self.register_buffer("absmax", torch.empty(num_experts, blocks, device=device,
                                                   dtype=torch.uint8 if quant.double_quant else torch.float32))
        if quant.double_quant:  # bitsandbytes' nested scales: 256 blocks a group, an fp32 offset per tensor
            self.register_buffer("absmax2", torch.empty(num_experts, math.ceil(blocks / 256), device=device))
            self.register_buffer("offset", torch.empty(num_experts, device=device))
            self.register_buffer("code2", torch.empty(256, device=device))
        self.register_buffer("code", torch.empty(16, device=device))
        self.layout: tuple | None = None  # `nf4.split_state`'s layout, shared by every expert
        self.filled = [False] * num_experts
        self._states: dict[int, nf4.QuantState] = {}
        self._states_key = None
        self.r = 0

    def fill(self, expert: int, weight: torch.Tensor) -> None:
        """Quantize `weight` (d_out x d_in) into expert `expert`'s slot."""
        if tuple(weight.shape) != (self.d_out, self.d_in):
            raise UserError(f"expert weight has shape {tuple(weight.shape)}, the model expects "
                            f"{(self.d_out, self.d_in)}")
        packed, state = nf4.quantize(weight, self.quant, self.codes.device)
        (absmax, code, offset, absmax2, code2), layout = nf4.split_state(state)
        with torch.no_grad():
            self.codes[expert].copy_(packed)
            self.absmax[expert].copy_(absmax)
            self.code.copy_(code)
            if self.quant.double_quant:
                self.absmax2[expert].copy_(absmax2)
                self.offset[expert].copy_(offset)
                self.code2.copy_(code2)
        self.layout, self.filled[expert] = layout, True

    def state(self, expert: int) -> nf4.QuantState:
        """Expert `expert`'s quantization state, views of the stacked buffers (kept: `nf4.dequantize` caches the
        decoded scales on it)."""
        key = (self.codes.data_ptr(), self.absmax.data_ptr())
        if key != self._states_key:  # moved or reloaded: views of the old buffers are stale
            self._states, self._states_key = {}, key
        if expert not in self._states:
            double = self.quant.double_quant
            tensors = (self.absmax[expert], self.code, self.offset[expert] if double else None,
                       self.absmax2[expert] if double else None, self.code2 if double else None)
            self._states[expert] = nf4.join_state(tensors, self.layout)
        return self._states[expert]

    def dequantize(self, expert: int, dtype: torch.dtype) -> torch.Tensor:
        return nf4.dequantize(self.codes[expert], self.state(expert), dtype)

    def add_lora(self, r: int, scale: float, dropout: float, dtype: torch.dtype) -> None:
        """A rank-r pair per expert, PEFT's init (A Kaiming-uniform as `nn.Linear`, B zero) and layout."""
        device = self.codes.device
        self.r, self.scale, self.dropout, self.lora_dtype = r, scale, dropout, dtype
        self.lora_A = nn.Linear(self.d_in, r * self.num_experts, bias=False, device=device, dtype=dtype)
        self.lora_B = nn.Linear(r * self.num_experts, self.d_out, bias=False, device=device, dtype=dtype)
        nn.init.kaiming_uniform_(self.lora_A.weight, a=math.sqrt(5))
        nn.init.zeros_(self.lora_B.weight)

    def lora_pairs(self) -> list[tuple[torch.Tensor, torch.Tensor]] | None:
        """Each expert's (A (r x d_in), B (d_out x r)), views into the stacked weights; made once a forward, so
        the backward sums the experts' gradients into the stack once."""
        if not self.r:
            return None
        a = self.lora_A.weight.view(self.num_experts, self.r, self.d_in).unbind(0)
        b = self.lora_B.weight.view(self.d_out, self.r, self.num_experts).unbind(2)
        return list(zip(a, b, strict=True))

    def forward(self, x: torch.Tensor, expert: int, pair: tuple[torch.Tensor, torch.Tensor] | None) -> torch.Tensor:
        """x (tokens, d_in) through expert `expert` (and its LoRA pair, from `lora_pairs`)."""
        x = x.to(self.compute_dtype)
        codes, state = self.codes[expert], self.state(expert)
        if pair is None:
            return nf4.matmul(x, codes, state)
        a, b = pair
        p = self.dropout if self.training else 0.0
        if self.lora_dtype == self.compute_dtype:  # the fused path, as `LoRALinear`
            return lora_4bit(x, a, b, codes, state, None, self.scale, p)
        x_in = nn.functional.dropout(x.to(self.lora_dtype), p) if p else x.to(self.lora_dtype)
        return nf4.matmul(x, codes, state) + (self.scale * (x_in @ a.t()) @ b.t()).to(self.compute_dtype)

    def extra_repr(self) -> str:
        return f"experts={self.num_experts}, d_in={self.d_in}, d_out={self.d_out}, r={self.r}"


class Experts4bit(nn.Module):
    """Drop-in for transformers' experts module (same forward signature): loops over the experts that received
    tokens, as transformers' eager forward does, each projection through `PackedExperts`."""

    def __init__(self, original: nn.Module, quant: QuantConfig, dtype: torch.dtype, device: torch.device) -> None:
        super().__init__()
        experts, two_i, hidden = original.gate_up_proj.shape
        self.num_experts, self.act_fn = experts, original.act_fn
        self.gate_up_proj = PackedExperts(experts, hidden, two_i, quant, dtype, device)
        self.down_proj = PackedExperts(experts, two_i // 2, hidden, quant, dtype, device)

    def forward(self, hidden_states: torch.Tensor, top_k_index: torch.Tensor,
                top_k_weights: torch.Tensor) -> torch.Tensor:
        out = torch.zeros_like(hidden_states)
        gate_up, down = self.gate_up_proj.lora_pairs(), self.down_proj.lora_pairs()
        for e, token_idx, k_pos in self._routes(top_k_index):
            gate, up = self.gate_up_proj(hidden_states[token_idx], e, gate_up and gate_up[e]).chunk(2, dim=-1)
            y = self.down_proj(self.act_fn(gate) * up, e, down and down[e])
            out.index_add_(0, token_idx, (y * top_k_weights[token_idx, k_pos, None]).to(out.dtype))
        return out

    def _routes(self, top_k_index: torch.Tensor):
        """(expert, its tokens, their top-k slots) for each expert that received tokens. On the meta device (the
        memory trace) there are no values to route by: every expert gets its even share of the routes."""
        if top_k_index.is_meta:
            share = math.ceil(top_k_index.numel() / self.num_experts)
            idx = torch.zeros(share, dtype=torch.long, device="meta")
            yield from ((e, idx, idx) for e in range(self.num_experts))
            return
        with torch.no_grad():
            hit = torch.unique(top_k_index).tolist()
        for e in hit:
            yield (e, *torch.where(top_k_index == e))


def fill_meta(model: nn.Module, dtype: torch.dtype) -> None:
    """Give every expert of `model`'s `Experts4bit` modules (on the meta device) a meta quantization state: the
    memory trace runs the real code on them."""
    for stack in model.modules():
        if isinstance(stack, PackedExperts):
            stack.fill(0, torch.empty(stack.d_out, stack.d_in, dtype=dtype, device="meta"))
            stack.filled = [True] * stack.num_experts


def swap_in_4bit(model: nn.Module, quant: QuantConfig, dtype: torch.dtype, device: torch.device) -> None:
    """Replace every (meta) experts module by an empty `Experts4bit` on `device`, filled by `CheckpointExperts`."""
    for name in expert_blocks(model):
        parent, _, child = name.rpartition(".")
        owner = model.get_submodule(parent)
        setattr(owner, child, Experts4bit(getattr(owner, child), quant, dtype, device))


def rename(model_type: str, name: str) -> str:
    """The model's name for a checkpoint tensor (Mixtral's hub checkpoints: `block_sparse_moe` is `mlp`)."""
    for old, new in FAMILIES[model_type].renames if model_type in FAMILIES else ():
        name = name.replace(old, new)
    return name


def checkpoint_slot(model_type: str, blocks: set[str], name: str) -> tuple[str, int | None, int | None] | None:
    """Where checkpoint tensor `name` goes: (expert projection, expert or None for a fused (experts, out, in)
    tensor, half of gate_up (0 gate, 1 up) or None for the whole matrix); None for a tensor that is no expert's."""
    if not blocks:
        return None
    name = rename(model_type, name)
    block, _, leaf = name.rpartition(".")
    if block in blocks and leaf in PROJECTIONS:
        return name, None, None
    m = _PER_EXPERT.match(name)
    leaves = FAMILIES[model_type].leaves if model_type in FAMILIES else {}
    if not m or m["block"] not in blocks or m["leaf"] not in leaves:
        return None
    proj, half = leaves[m["leaf"]]
    return f"{m['block']}.{proj}", int(m["expert"]), half


def other_half(model_type: str, name: str) -> str:
    """The checkpoint name of the other half of a per-expert gate or up tensor (`w1` <-> `w3`)."""
    leaf = _PER_EXPERT.match(name)["leaf"]
    proj, half = FAMILIES[model_type].leaves[leaf]
    other = next(k for k, v in FAMILIES[model_type].leaves.items() if v == (proj, 1 - half))
    return name.removesuffix(f".{leaf}.weight") + f".{other}.weight"


class CheckpointExperts:
    """Routes a streamed checkpoint's expert tensors into the model's `Experts4bit` modules, in either layout:
    fused (`experts.gate_up_proj`, (experts, out, in): each expert quantized from its slice) or one tensor per
    expert (`experts.3.gate_proj.weight`: gate and up halves joined, then quantized as the fused slice would be;
    a half waits, in the quantization dtype, until its other half arrives)."""

    def __init__(self, model: nn.Module, quantize_from: torch.dtype) -> None:
        self.model, self.dtype, self.model_type = model, quantize_from, model.config.model_type
        self.blocks = set(expert_blocks(model))
        self.halves: dict[tuple[str, int], dict[int, torch.Tensor]] = {}

    def rename(self, name: str) -> str:
        return rename(self.model_type, name) if self.blocks else name

    def take(self, name: str, tensor: torch.Tensor) -> bool:
        """Quantize `tensor` into its expert slot(s) if it is an expert weight; False if it is not one."""
        slot = checkpoint_slot(self.model_type, self.blocks, name)
        if slot is None:
            return False
        stack_name, e, half = slot
        stack = self.model.get_submodule(stack_name)
        if e is None:
            if tensor.dim() != 3 or tensor.shape[0] != stack.num_experts:
                raise UserError(f"checkpoint tensor '{name}' has shape {tuple(tensor.shape)}, the model expects "
                                f"{(stack.num_experts, stack.d_out, stack.d_in)}")
            for e in range(stack.num_experts):
                stack.fill(e, tensor[e].to(self.dtype))
            return True
        if e >= stack.num_experts:
            raise UserError(f"checkpoint tensor '{name}': expert {e}, but the model has {stack.num_experts}")
        if half is None:
            stack.fill(e, tensor.to(self.dtype))
            return True
        pending = self.halves.setdefault((stack_name, e), {})
        pending[half] = tensor.to(self.dtype, copy=True)
        if len(pending) == 2:
            stack.fill(e, torch.cat([pending[0], pending[1]]))
            del self.halves[(stack_name, e)]
        return True

    def check_complete(self, path: object) -> None:
        missing = [f"{name} expert {e}" for name, e in self.halves]
        for block in sorted(self.blocks):
            for proj in PROJECTIONS:
                stack = self.model.get_submodule(f"{block}.{proj}")
                missing += [f"{block}.{proj} expert {e}" for e, done in enumerate(stack.filled) if not done]
        if missing:
            shown = ", ".join(missing[:3]) + (f" and {len(missing) - 3} more" if len(missing) > 3 else "")
            raise UserError(f"{path}: checkpoint is missing expert weights: {shown}")


def expert_pair(a: torch.Tensor, b: torch.Tensor, expert: int, experts: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Expert `expert`'s (A (r x d_in), B (d_out x r)) from the stacked pair in PEFT's layout."""
    r = a.shape[0] // experts
    return a[expert * r:(expert + 1) * r], b[:, expert::experts]


def lora_projections(model: nn.Module) -> dict[str, PackedExperts]:
    """The expert projections that carry LoRA, by name."""
    return {n: m for n, m in model.named_modules() if isinstance(m, PackedExperts) and m.r}


def peft_module_name(name: str, targeted: list[str]) -> str:
    """PEFT's module name for expert projection `name`'s LoRA pair, given the block's targeted projections:
    PEFT wraps the block once per targeted parameter, in registration order, so the first is innermost
    (`experts.base_layer`) and the last is `experts` itself."""
    block, _, proj = name.rpartition(".")
    order = [p for p in PROJECTIONS if p in targeted]
    return block + ".base_layer" * (len(order) - 1 - order.index(proj))


def peft_target_parameters(targets: list[str], candidates: list[str]) -> list[str]:
    """PEFT's `target_parameters` for the targeted expert projections: `experts.gate_up_proj` style suffixes
    when they pick exactly these, else full names."""
    suffixes = sorted({".".join(t.rsplit(".", 2)[-2:]) for t in targets})
    if {c for c in candidates if any(c.endswith("." + s) for s in suffixes)} == set(targets):
        return suffixes
    return sorted(targets)


def to_peft_names(lora: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """LoRA tensors by qlora-kit name -> by PEFT name: `...experts.gate_up_proj.lora_A.weight` becomes
    `...experts.base_layer.lora_A.weight` when the block's down_proj is targeted too (`peft_module_name`)."""
    targeted: dict[str, list[str]] = {}
    for key in lora:
        module = key.rpartition(".lora_")[0]
        if is_projection(module):
            targeted.setdefault(module.rpartition(".")[0], []).append(module.rpartition(".")[2])
    renamed = {}
    for key, tensor in lora.items():
        module, sep, rest = key.rpartition(".lora_")
        if is_projection(module):
            key = peft_module_name(module, targeted[module.rpartition(".")[0]]) + sep + rest
        renamed[key] = tensor
    return renamed


def from_peft_name(module: str, target_parameters: list[str]) -> str:
    """The inverse of `peft_module_name`, for a module of an adapter file: which expert projection PEFT's
    (possibly nested) wrapper holds, from the adapter config's `target_parameters`; other modules unchanged."""
    block, depth = module, 0
    while block.endswith(".base_layer"):
        block, depth = block.removesuffix(".base_layer"), depth + 1
    order = [p for p in PROJECTIONS
             if any(f"{block}.{p}" == t or f"{block}.{p}".endswith("." + t) for t in target_parameters)]
    if depth >= len(order):
        return module
    return f"{block}.{order[len(order) - 1 - depth]}"
