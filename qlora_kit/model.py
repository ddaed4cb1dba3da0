"""Load a Hugging Face causal LM with every linear layer (but the output head) quantized to 4 bits and frozen.

The model is built on the meta device (no memory), then the checkpoint is streamed one tensor at a time from
its safetensors shards (memory-mapped): each linear weight is cast to the compute dtype and quantized on the
target device as it arrives, so host memory never holds the 16-bit model; peak host memory is about one
tensor plus whatever the device keeps. This is the same quantization transformers applies with
`BitsAndBytesConfig` (cast to the load dtype, then `Params4bit(...).to(device)`), so a model loaded by
`transformers` + `peft` sees bit-identical 4-bit weights.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path

import torch
from accelerate import init_empty_weights
from safetensors import safe_open
from torch import nn
from transformers import (
    AutoConfig,
    AutoModelForCausalLM,
    AutoTokenizer,
    PretrainedConfig,
    PreTrainedModel,
    PreTrainedTokenizerBase,
)

from qlora_kit import experts, nf4
from qlora_kit.attention import use_segment_attention
from qlora_kit.config import QuantConfig
from qlora_kit.cpu import streaming_allocations
from qlora_kit.errors import UserError
from qlora_kit.offload import OffloadedLayers

# Checkpoint entries that are derived at init time and may be absent from, or stale in, a checkpoint.
_IGNORED_KEYS = re.compile(r".*rotary_emb\.inv_freq$")


@dataclass
class LoadedModel:
    model: PreTrainedModel
    tokenizer: PreTrainedTokenizerBase
    path: Path
    compute_dtype: torch.dtype
    offload: OffloadedLayers | None = None  # set by `train.build_model` with `train.offload_base`
    linears: list[str] = field(default_factory=list)  # quantized linears and expert projections (`lora_shapes`)
    targets: list[str] = field(default_factory=list)  # those with LoRA (PEFT's `target_modules` needs both)


def default_device() -> torch.device:
    """Where inference and checks run: the GPU when there is one (training's device comes from Accelerate)."""
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def compute_dtype_for(name: str, device: torch.device, gpu_has_bf16: bool | None = None) -> torch.dtype:
    """Resolve `quant.compute_dtype`; `auto` is bf16 on GPUs that have it natively, fp16 on older GPUs (emulated
    bf16, as on T4 or V100, runs far slower than fp16 there), fp32 on CPU. `gpu_has_bf16`: None asks this
    machine's GPU; the estimator, planning for another machine, assumes a current one."""
    if name != "auto":
        return getattr(torch, name)
    if device.type == "cuda":
        native = torch.cuda.is_bf16_supported(including_emulation=False) if gpu_has_bf16 is None else gpu_has_bf16
        return torch.bfloat16 if native else torch.float16
    return torch.float32


def load_tokenizer(path: Path, trust_remote_code: bool = False) -> PreTrainedTokenizerBase:
    tokenizer = AutoTokenizer.from_pretrained(path, trust_remote_code=trust_remote_code)
    if tokenizer.pad_token_id is None:
        # Padding positions carry label -100, so reusing EOS as pad never stops the model learning EOS.
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def load_quantized(path: Path, quant: QuantConfig, device: torch.device, trust_remote_code: bool = False,
                   tokenizer: PreTrainedTokenizerBase | None = None, keep_4bit_on_host: bool = False,
                   quantize_from: torch.dtype | None = None, read_weights: bool = True) -> LoadedModel:
    """Build `path`'s model on the meta device, then stream, quantize and freeze its weights onto `device`.
    `keep_4bit_on_host`: move each 4-bit weight to CPU memory as soon as it is quantized (for `train.offload_base`
    and FSDP's main process: the 4-bit model is never whole on the GPU).
    `quantize_from`: the dtype weights are cast to before quantizing, when not the compute dtype (the merge
    check computes a bf16-trained model in fp32 from the very 4-bit weights training had).
    `read_weights=False`: read nothing; every parameter stays on the meta device, the 4-bit ones in their
    packed shape (FSDP's other processes, which receive the weights from the main one)."""
    dtype = compute_dtype_for(quant.compute_dtype, device)
    model = meta_model(path, dtype, trust_remote_code)
    experts.check_supported(model)
    if experts.expert_blocks(model) and (keep_4bit_on_host or not read_weights and device.type != "meta"):
        raise UserError(experts.MOE_UNSUPPORTED)
    experts.swap_in_4bit(model, quant, dtype, device if read_weights else torch.device("meta"))
    if not read_weights:  # on the meta device (the memory trace) the shells get meta quantization states too
        experts.fill_meta(model, quantize_from or dtype)
        for name in quantizable_linears(model):
            linear = model.get_submodule(name)
            weight = (torch.empty(linear.out_features, linear.in_features, dtype=quantize_from or dtype,
                                  device="meta") if device.type == "meta" else None)
            _swap_in_4bit(model, name, weight, quant, dtype, torch.device("meta"))
    else:
        with streaming_allocations():
            _fill_weights(model, path, quant, dtype, device, keep_4bit_on_host, quantize_from or dtype)
        _check_complete(model, path)
    use_segment_attention(model)
    model.requires_grad_(False)
    model.eval()
    return LoadedModel(model, tokenizer if tokenizer is not None else load_tokenizer(path, trust_remote_code), path,
                       dtype)


def _fill_weights(model: PreTrainedModel, path: Path, quant: QuantConfig, dtype: torch.dtype,
                  device: torch.device, keep_4bit_on_host: bool, quantize_from: torch.dtype) -> None:
    """Stream `path`'s tensors into the meta model: linears quantized to 4-bit, the rest cast to `dtype`."""
    config = model.config
    quantized = set(quantizable_linears(model))
    keep_fp32 = getattr(model, "_keep_in_fp32_modules", None) or []
    expert_weights = experts.CheckpointExperts(model, quantize_from)
    for name, tensor in _stream_checkpoint(path):
        name = expert_weights.rename(name)
        if _IGNORED_KEYS.match(name) or expert_weights.take(name, tensor):
            continue
        module_name, _, param = name.rpartition(".")
        if module_name in quantized and param == "weight":
            _swap_in_4bit(model, module_name, tensor.to(quantize_from), quant, dtype, device)
            if keep_4bit_on_host and device.type != "cpu":
                nf4.move_to_host(model.get_submodule(module_name))
        else:
            target = torch.float32 if any(k in name for k in keep_fp32) else dtype
            target = target if tensor.is_floating_point() else tensor.dtype
            # copy=True: own the memory rather than keep a view into the shard's memory map
            _assign(model, name, tensor.to(device=device, dtype=target, copy=True))
    expert_weights.check_complete(path)
    if getattr(config, "tie_word_embeddings", False) or getattr(config.get_text_config(), "tie_word_embeddings", False):
        model.tie_weights()
    for buffer_owner in model.modules():  # buffers were built on the CPU
        for key, buf in buffer_owner._buffers.items():
            if buf is not None and buf.device != device:
                buffer_owner._buffers[key] = buf.to(device)


def load_config(path: Path, trust_remote_code: bool = False) -> PretrainedConfig:
    """`path`'s config.json; one a transformers release does not know is the user's to fix, not a crash."""
    try:
        return AutoConfig.from_pretrained(path, trust_remote_code=trust_remote_code)
    except (ValueError, KeyError, OSError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise UserError(f"{path}/config.json: transformers cannot build this model ({first[:200]})") from None


def meta_model(path: Path, dtype: torch.dtype = torch.float32, trust_remote_code: bool = False) -> PreTrainedModel:
    """The model of `path`'s config.json with parameters on the meta device (no memory, no weights read)."""
    config = load_config(path, trust_remote_code)
    config.use_cache = False  # the KV cache is useless in training and conflicts with checkpointing
    # attn_implementation None: transformers' choice, SDPA where the model supports it, else eager (Gemma 2: SDPA
    # has no logit soft-capping); `use_segment_attention` then adapts either to rows of concatenated examples.
    with init_empty_weights(include_buffers=False):  # params on meta; buffers (rotary freqs) computed for real
        return AutoModelForCausalLM.from_config(config, dtype=dtype, attn_implementation=None,
                                                trust_remote_code=trust_remote_code)


def quantizable_linears(model: nn.Module) -> list[str]:
    """Names of the linear layers that get quantized: all of them but the output head (kept in 16 bits)."""
    head = model.get_output_embeddings()
    return [n for n, m in model.named_modules() if isinstance(m, nn.Linear) and m is not head]


def linear_shapes(model: nn.Module) -> dict[str, tuple[int, int]]:
    """(d_in, d_out) of each linear that gets quantized (and may get LoRA), by name; works on meta models too."""
    names = set(quantizable_linears(model))
    return {n: (m.in_features, m.out_features) for n, m in model.named_modules() if n in names}


def lora_shapes(model: nn.Module) -> dict[str, tuple[int, int, int]]:
    """(copies, d_in, d_out) of everything LoRA may target, by name: each quantized linear (one copy) and each
    expert projection (one LoRA pair per expert)."""
    shapes = {n: (1, d_in, d_out) for n, (d_in, d_out) in linear_shapes(model).items()}
    return shapes | experts.expert_shapes(model)


def checkpoint_files(path: Path) -> list[str]:
    """The safetensors shard names of a model directory, in order."""
    index = path / "model.safetensors.index.json"
    if index.is_file():
        return sorted(set(json.loads(index.read_text())["weight_map"].values()))
    if (path / "model.safetensors").is_file():
        return ["model.safetensors"]
    raise UserError(f"{path}: no model.safetensors or model.safetensors.index.json (qlora-kit loads "
                    "safetensors only; convert .bin checkpoints first)")


def _stream_checkpoint(path: Path):
    """Yield (name, tensor) for every tensor of the checkpoint, memory-mapped.

    The shard is reopened for each tensor: pages read through a mapping count as resident until it is
    closed, so one mapping per shard would hold a whole shard (the whole model, for single-file models) in
    RSS. Reopening costs a header parse (~1 ms); peak memory is then the quantized model plus one tensor.
    """
    for file in checkpoint_files(path):
        with safe_open(path / file, framework="pt", device="cpu") as f:
            names = list(f.keys())
        for name in names:
            with safe_open(path / file, framework="pt", device="cpu") as f:
                tensor = f.get_tensor(name)
            yield name, tensor


def _swap_in_4bit(model: nn.Module, name: str, weight: torch.Tensor | None, quant: QuantConfig,
                  dtype: torch.dtype, device: torch.device) -> None:
    """Replace the meta `nn.Linear` called `name` by a frozen 4-bit layer holding `weight` quantized (None: an
    empty shell, see `nf4.quantized_linear`)."""
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name)
    linear = getattr(parent, child)
    q = nf4.quantized_linear(linear, weight, quant, dtype, device)
    if linear.bias is not None:
        q.bias = linear.bias  # still meta if the bias comes later in the checkpoint; `_assign` fills it
    setattr(parent, child, q)


def _assign(model: nn.Module, name: str, tensor: torch.Tensor) -> None:
    module_name, _, attr = name.rpartition(".")
    try:
        module = model.get_submodule(module_name)
    except AttributeError:
        raise UserError(f"checkpoint tensor '{name}' has no place in the model built from config.json "
                        "(architecture and weights disagree)") from None
    if attr in module._parameters:
        old = module._parameters[attr]
        if old is not None and not old.is_meta and old.shape != tensor.shape:
            raise UserError(f"checkpoint tensor '{name}' has shape {tuple(tensor.shape)}, "
                            f"model expects {tuple(old.shape)}")
        module._parameters[attr] = nn.Parameter(tensor, requires_grad=False)
    elif attr in module._buffers:
        module._buffers[attr] = tensor
    else:
        raise UserError(f"checkpoint tensor '{name}' has no place in the model built from config.json")


def _check_complete(model: nn.Module, path: Path) -> None:
    missing = [n for n, p in model.named_parameters() if p.is_meta]
    missing += [n for n, b in model.named_buffers() if b.is_meta]
    if missing:
        shown = ", ".join(missing[:5]) + (f" and {len(missing) - 5} more" if len(missing) > 5 else "")
        raise UserError(f"{path}: checkpoint is missing {len(missing)} tensors: {shown}")
