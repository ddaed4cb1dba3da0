"""Peak training memory, predicted from the model's shape and the recipe, without loading a weight.

    total = 4-bit weights + unquantized embeddings/head/norms + LoRA weights + their gradients + optimizer states
          + activations (checkpointed layer inputs, and the larger of one layer's backward and the loss's buffers)
          + runtime (CUDA context and allocator slack on a GPU; the Python process itself on the CPU)

Sizes follow what `train` builds: 4-bit codes plus their scales (4.127 bits per weight with double quantization,
4.5 without), embeddings and head in the compute dtype (bf16 on GPUs, fp32 on CPUs), LoRA weights and gradients
in bf16 on bf16 GPUs and fp32 elsewhere, Adam's two states in fp32 (8-bit: one byte each). The activation and
logit terms count the tensors our layers save (the LoRA function, SDPA, the model's norms and MLP) per token;
the logits assume every position is a label (text data), the worst case, up to the loss's chunk size.
Checked against measured peaks with `tools/estimate_check.py` (figures in docs/performance.md).

With FSDP over N processes, weights, LoRA, gradients and optimizer states are divided by N (one layer at a time
is gathered whole); activations are not.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path

import torch

from qlora_kit.config import Recipe
from qlora_kit.errors import UserError
from qlora_kit.experts import MOE_UNSUPPORTED
from qlora_kit.lora import lora_dtype_for, select_targets
from qlora_kit.memory import human_bytes
from qlora_kit.model import compute_dtype_for

SHAPES = Path(__file__).parent / "shapes"
CUDA_CONTEXT = 600 * 2**20  # CUDA context + cuBLAS workspace: not in max_memory_allocated, but on the card
ALLOCATOR_SLACK = 0.05  # the caching allocator's fragmentation, as a share of everything allocated
CPU_PROCESS = 420 * 2**20  # python + torch + transformers + bitsandbytes + datasets, resident (docs/performance.md)


@dataclass
class Shape:
    """What memory depends on in a decoder-only model: the config's sizes, and the linears training quantizes
    (and may put LoRA on), found by building the model from its config on the meta device and asking the same
    functions training asks (`model.quantizable_linears`, `model.linear_shapes`)."""

    name: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    max_position_embeddings: int
    linears: dict[str, tuple[int, int]]  # full name -> (d_in, d_out) of each quantized linear
    dense_params: int  # embeddings, head (unless tied), norms, biases, MoE routers: kept in the compute dtype
    config: dict = field(default_factory=dict, repr=False)  # the config.json fields it came from
    # mixture of experts: expert projection -> (experts, d_in, d_out), each expert quantized (experts.py)
    experts: dict[str, tuple[int, int, int]] = field(default_factory=dict)
    experts_per_token: int = 0

    @property
    def quantized_params(self) -> int:
        return (sum(d_in * d_out for d_in, d_out in self.linears.values())
                + sum(n * d_in * d_out for n, d_in, d_out in self.experts.values()))

    @property
    def active_params(self) -> int:
        """Parameters one token computes with: all but the experts it is not routed to."""
        idle = sum((n - self.experts_per_token) * d_in * d_out for n, d_in, d_out in self.experts.values())
        return self.quantized_params + self.dense_params - idle

    @property
    def num_experts(self) -> int:
        return max((n for n, _, _ in self.experts.values()), default=0)

    @property
    def expert_intermediate(self) -> int:
        """Each expert's intermediate width (the down projection's d_in); 0 for dense models."""
        return max((d_in for name, (_, d_in, _) in self.experts.items() if name.endswith("down_proj")), default=0)

    def lora_shapes(self) -> dict[str, tuple[int, int, int]]:
        """(copies, d_in, d_out) of everything LoRA may target, as `model.lora_shapes` gives them."""
        return {n: (1, d_in, d_out) for n, (d_in, d_out) in self.linears.items()} | self.experts


def shape_from_config(config: dict, name: str) -> Shape:
    """A `Shape` from a config.json's fields (multimodal configs: their text part)."""
    import torch
    from accelerate import init_empty_weights
    from transformers import AutoConfig, AutoModelForCausalLM

    from qlora_kit.experts import check_supported, expert_shapes
    from qlora_kit.model import linear_shapes

    c = config.get("text_config", config)
    try:
        heads = c["num_attention_heads"]
        with init_empty_weights(include_buffers=True):
            model = AutoModelForCausalLM.from_config(AutoConfig.for_model(**{**config, **c}), dtype=torch.bfloat16)
        check_supported(model)  # an MoE layout training would refuse is refused here too
        linears, experts = linear_shapes(model), expert_shapes(model)
        model.tie_weights()  # as loading does: a tied head is counted once
        dense = sum(p.numel() for n, p in model.named_parameters()
                    if n.removesuffix(".weight") not in linears and n not in experts)
        return Shape(name=name, vocab_size=c["vocab_size"], hidden_size=c["hidden_size"],
                     intermediate_size=c["intermediate_size"], num_layers=c["num_hidden_layers"], num_heads=heads,
                     num_kv_heads=c.get("num_key_value_heads") or heads,
                     head_dim=c.get("head_dim") or c["hidden_size"] // heads,
                     max_position_embeddings=c.get("max_position_embeddings", 4096), linears=linears,
                     dense_params=dense, config=config, experts=experts,
                     experts_per_token=c.get("num_experts_per_tok", 0) if experts else 0)
    except (KeyError, ValueError) as e:
        raise UserError(f"{name}: config.json cannot be built as a decoder-only LLM ({e}); the estimate needs one"
                        ) from None


def find_shape(recipe: Recipe, model_config: Path | None = None) -> Shape:
    """The model's shape from `model_config`, a local model directory, a built-in model, or a shipped config."""
    from qlora_kit.model_paths import SMOLLM2, TINY_RANDOM, resolve_model_path

    if model_config is not None:
        path = model_config / "config.json" if model_config.is_dir() else model_config
        if not path.is_file():
            raise UserError(f"--model-config: {path} not found")
        return shape_from_config(json.loads(path.read_text()), str(path))
    name = recipe.model.path
    local = Path(name).expanduser()
    if (local / "config.json").is_file():
        return shape_from_config(json.loads((local / "config.json").read_text()), name)
    if name == TINY_RANDOM:  # built offline in a second
        return shape_from_config(json.loads((resolve_model_path(name) / "config.json").read_text()), name)
    wanted = "smollm2-135m" if name == SMOLLM2 or local.suffix == ".gguf" and "smollm2" in name.lower() else name
    for file in sorted(SHAPES.glob("*.json")):
        known = json.loads(file.read_text())
        if wanted.lower() in [h.lower() for h in known["hub_ids"]] + [file.stem]:
            return shape_from_config(known["config"], f"{name} (shipped shape {file.stem})")
    raise UserError(f"'model.path': no config.json for {name} here and no shipped shape for it; pass "
                    "--model-config PATH (a config.json or the model's directory)")


@dataclass
class Estimate:
    parts: dict[str, int]  # name -> bytes, in the order printed
    device: str  # "cuda" or "cpu"
    shards: int = 1
    notes: list[str] = field(default_factory=list)
    offload: bool = False

    @property
    def total(self) -> int:
        return sum(self.parts.values())


def estimate(recipe: Recipe, shape: Shape, device: str = "cuda", shards: int = 1, offload: bool = False) -> Estimate:
    """Predicted peak memory per process of `recipe` on `shape`; `shards`: FSDP processes sharding the model;
    `offload`: FSDP keeps the shards (weights, LoRA, gradients, optimizer states) in CPU memory."""
    t, lora, q = recipe.train, recipe.lora, recipe.quant
    if shape.experts and (shards > 1 or t.offload_base):
        raise UserError(MOE_UNSUPPORTED)
    # 4 bits a weight, an 8-bit absmax a block of 64 and (double quantization) an fp32 scale per 256 blocks:
    # 4 + 8/64 + 32/(64*256) = 4.127 bits; without double quantization an fp32 absmax a block: 4.5 bits.
    quant_bits = 4 + 8 / q.blocksize + 32 / (q.blocksize * 256) if q.double_quant else 4 + 32 / q.blocksize
    compute = compute_dtype_for(q.compute_dtype, torch.device(device), gpu_has_bf16=True)
    cb, lora_bytes = compute.itemsize, lora_dtype_for(compute).itemsize  # as training chooses them
    lora_params = lora_parameter_count(shape, lora.r, lora.target_modules)
    state_bytes = {"paged_adamw_32bit": 8, "paged_adamw_8bit": 2, "adamw": 2 * lora_bytes}[recipe.optim.name]
    tokens = t.micro_batch_size * t.seq_len
    # The layer being backpropagated: what its recompute saved, the gradients flowing through it, and (GPU code
    # path) its largest weight dequantized for the input gradient.
    layer = tokens * per_token_layer_bytes(shape, cb, lora.dropout > 0)
    layer += max(d_in * d_out for _, d_in, d_out in shape.lora_shapes().values()) * cb if device == "cuda" else 0
    h = shape.hidden_size
    # head output and gradient in the compute dtype, + 12 bytes an entry in fp32 (the loss's copy and its
    # temporaries): alive while the loss is backpropagated, before any layer is.
    logits = logit_tokens(tokens, shape.vocab_size) * shape.vocab_size * (2 * cb + 12)
    expert_params = shape.quantized_params - sum(d_in * d_out for d_in, d_out in shape.linears.values())
    parts = {
        "4-bit weights": int((shape.quantized_params - expert_params) * quant_bits / 8) // shards,
        **({"4-bit expert weights": int(expert_params * quant_bits / 8)} if expert_params else {}),
        "embeddings, head, norms": shape.dense_params * cb // shards,
        "LoRA weights": lora_params * lora_bytes // shards,
        "LoRA gradients": lora_params * lora_bytes // shards,
        "optimizer states": lora_params * state_bytes // shards,
        # checkpointed: every layer's input, and the one layer in its backward, or the loss's buffers before it
        "activations": (shape.num_layers * tokens * h * cb + max(layer, logits)) if t.gradient_checkpointing
        else shape.num_layers * (tokens * h * cb + layer) + logits,
    }
    if device == "cpu" and t.gradient_checkpointing:  # fused.py: the recompute keeps its layer dequantized
        parts["dequantized layer"] = shape.quantized_params // shape.num_layers * cb
    if t.offload_base:  # train.offload_base: the layer being computed and the one being copied
        host_weights = parts["4-bit weights"]
        parts["4-bit weights"] = 2 * int(shape.quantized_params / shape.num_layers * quant_bits / 8)
    if shards > 1:  # FSDP gathers one layer's 4-bit weights at a time, and prefetches the next
        parts["gathered layers"] = 2 * int(shape.quantized_params / shape.num_layers * quant_bits / 8)
    if offload:  # the shards live in CPU memory; the GPU holds what is gathered, the head the largest of it
        host = sum(parts.pop(k) for k in ("4-bit weights", "embeddings, head, norms", "LoRA weights",
                                          "LoRA gradients", "optimizer states"))
        parts = {"gathered embeddings or head": shape.vocab_size * shape.hidden_size * cb, **parts}
    if device == "cuda":
        parts["allocator slack"] = int(ALLOCATOR_SLACK * sum(parts.values()))
        parts["CUDA context"] = CUDA_CONTEXT
    else:
        parts["Python process"] = CPU_PROCESS
    notes = ["logits: every position a label (text data), at most one loss chunk at a time"]
    if expert_params:
        notes.append(f"mixture of experts: each expert quantized on its own ({gib(expert_params * 2)} in 16 bits); "
                     f"activations count each token once per routed expert ({shape.experts_per_token})")
    if offload:
        notes.append(f"CPU memory for the offloaded shards: {gib(host)} per process")
    if t.offload_base:
        notes.append(f"train.offload_base: {gib(host_weights)} of 4-bit weights in (pinned) CPU memory; the GPU "
                     "holds 2 layers")
    return Estimate(parts, device, shards, notes, offload)


def logit_tokens(label_tokens: int, vocab_size: int) -> int:
    """Label positions whose logits exist at once: all of them, or one chunk of `loss.CHUNK_BYTES`."""
    from qlora_kit.loss import CHUNK_BYTES

    chunk = max(1, CHUNK_BYTES // (4 * vocab_size))
    return label_tokens if label_tokens <= chunk else chunk


def per_token_layer_bytes(shape: Shape, cb: int, dropout: bool) -> int:
    """Bytes one token keeps alive in the decoder layer being recomputed and backpropagated (as the memory trace,
    `qlora-kit estimate --trace`, finds them).

    Saved by the recompute: the two norms' fp32 copies of their input; the rotary q and k, v, the attention
    output; the MLP's gate, up and SiLU outputs; with dropout, each LoRA input's dropped-out copy and its mask
    (one byte an entry; the CPU's dropped indices take less), without it the norms' outputs and the MLP product
    the LoRA functions keep. Plus the gradients flowing through the layer (its input's and the widest input's).

    A mixture-of-experts layer computes its MLP once per routed expert (experts_per_token of them, each
    expert_intermediate wide), on its own copy of the token's hidden state, whose output is kept for the
    routing weight's product; the router's probabilities are fp32.
    """
    h, k = shape.hidden_size, shape.experts_per_token
    i = k * shape.expert_intermediate if k else shape.intermediate_size
    q, kv = shape.num_heads * shape.head_dim, shape.num_kv_heads * shape.head_dim
    norms = 2 * 4 * h
    saved = cb * (2 * q + 2 * kv + 3 * i)
    mlp_in = k * h if k else 2 * h  # the MLP's LoRA inputs: each route's copy of the token, or gate's and up's
    inputs = (cb + 1) * (3 * h + q + mlp_in + i) if dropout else cb * (h + (mlp_in if k else h) + i)
    routed = cb * k * h + 4 * shape.num_experts if k else 0
    grads = cb * (h + i)
    return norms + saved + inputs + routed + grads


def lora_parameter_count(shape: Shape, r: int, target_modules: str | list[str]) -> int:
    """LoRA parameters on the linears and expert projections training would target (`lora.select_targets`)."""
    shapes = shape.lora_shapes()
    return sum(r * copies * (d_in + d_out) for copies, d_in, d_out in (shapes[n] for n in
                                                                       select_targets(list(shapes), target_modules)))


def largest_fitting(recipe: Recipe, shape: Shape, budget: int, device: str = "cuda", shards: int = 1,
                    offload: bool = False) -> tuple[int, int]:
    """(largest micro_batch_size at the recipe's seq_len, largest seq_len at its micro_batch_size) within
    `budget`; 0 where even 1 does not fit. seq_len steps by 256 up to the model's context."""
    def fits(mb: int, seq: int) -> bool:
        trial = _with_batch(recipe, mb, seq)
        return estimate(trial, shape, device, shards, offload).total <= budget

    mb = 0
    while mb < 4096 and fits(mb + 1, recipe.train.seq_len):
        mb += 1
    seq = 0
    step = 256 if shape.max_position_embeddings >= 512 else 1
    while seq + step <= shape.max_position_embeddings and fits(recipe.train.micro_batch_size, seq + step):
        seq += step
    return mb, seq


def _with_batch(recipe: Recipe, micro_batch_size: int, seq_len: int) -> Recipe:
    from dataclasses import replace

    return replace(recipe, train=replace(recipe.train, micro_batch_size=micro_batch_size, seq_len=seq_len))


UNITS = {"": 1, "b": 1, "k": 10**3, "kb": 10**3, "kib": 2**10, "m": 10**6, "mb": 10**6, "mib": 2**20,
         "g": 10**9, "gb": 10**9, "gib": 2**30, "t": 10**12, "tb": 10**12, "tib": 2**40}


def parse_bytes(text: str) -> int:
    """'24GiB', '24 GB', '80g' -> bytes. GB is 10^9 (what GPU boxes print), GiB 2^30."""
    m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([a-zA-Z]*)\s*", text)
    if not m or m.group(2).lower() not in UNITS:
        raise UserError(f"--gpu-memory: {text!r} is not a size such as 24GiB or 80GB")
    return int(float(m.group(1)) * UNITS[m.group(2).lower()])


def local_gpu_memory() -> int | None:
    """This machine's first GPU's memory, if it has one (the default budget)."""
    import torch

    return torch.cuda.get_device_properties(0).total_memory if torch.cuda.is_available() else None


def gib(n: int) -> str:
    return human_bytes(n, "GiB", 2)


def format_estimate(recipe: Recipe, shape: Shape, est: Estimate, budget: int | None) -> str:
    t = recipe.train
    where = f"per GPU, FSDP over {est.shards}" if est.shards > 1 else ("GPU" if est.device == "cuda" else "CPU")
    where += ", shards offloaded to CPU" if est.offload else ""
    lines = [f"model {shape.name}: {shape.num_layers} layers, hidden {shape.hidden_size}, "
             f"{(shape.quantized_params + shape.dense_params) / 1e9:.2f} B parameters "
             f"({shape.quantized_params / 1e9:.2f} B in 4-bit)"
             + (f"; mixture of experts: {shape.num_experts} experts, {shape.experts_per_token} a token, "
                f"{shape.active_params / 1e9:.2f} B parameters active a token" if shape.experts else ""),
             f"run: micro_batch_size {t.micro_batch_size} x seq_len {t.seq_len}, LoRA r {recipe.lora.r} "
             f"({lora_parameter_count(shape, recipe.lora.r, recipe.lora.target_modules) / 1e6:.1f} M parameters), "
             f"{recipe.optim.name}, checkpointing {'on' if t.gradient_checkpointing else 'off'}",
             f"estimated peak memory ({where}):"]
    lines += [f"  {name:<26}{gib(size):>12}" for name, size in est.parts.items()]
    lines.append(f"  {'total':<26}{gib(est.total):>12}")
    lines += [f"  note: {n}" for n in est.notes]
    if budget is not None:
        verdict = "fits" if est.total <= budget else "does NOT fit"
        mb, seq = largest_fitting(recipe, shape, budget, est.device, est.shards, est.offload)
        lines.append(f"{verdict} in {gib(budget)} ({est.total / budget:.0%} of it); largest that fit: "
                     f"train.micro_batch_size={mb} (at seq_len {t.seq_len}), train.seq_len={seq} "
                     f"(at micro_batch_size {t.micro_batch_size})")
    return "\n".join(lines)
