"""Tiny models built in-process (no downloads): 2 layers, 64 wide, a byte-level tokenizer."""

from __future__ import annotations

import json
import os
from pathlib import Path

import bitsandbytes as bnb
import pytest
import torch
from safetensors.torch import save_file
from transformers import (
    AutoModelForCausalLM,
    BitsAndBytesConfig,
    Gemma2Config,
    LlamaConfig,
    MixtralConfig,
    Phi3Config,
    Qwen2Config,
    Qwen2MoeConfig,
    Qwen3MoeConfig,
)

from qlora_kit.model_paths import save_tiny_random

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # tests never download; fail fast instead of retrying a hub

# Gemma 2 refuses SDPA (its attention soft-caps logits), so it runs eager attention
CONFIGS = {"llama": LlamaConfig, "qwen2": Qwen2Config, "phi3": Phi3Config, "gemma2": Gemma2Config}


def pytest_collection_modifyitems(config, items):
    """Tests marked `cuda` skip themselves on machines without a CUDA GPU."""
    if not torch.cuda.is_available():
        for item in items:
            if item.get_closest_marker("cuda"):
                item.add_marker(pytest.mark.skip(reason="needs a CUDA GPU"))


def make_tiny_model(out: Path, arch: str = "llama", tie: bool = False, dtype: torch.dtype = torch.float32) -> Path:
    return save_tiny_random(out, CONFIGS[arch], tie=tie, dtype=dtype)


@pytest.fixture(scope="session")
def tiny_models(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("models")
    return {arch: make_tiny_model(root / arch, arch) for arch in CONFIGS}


# 8 (4) experts, 2 a token: small enough to run in seconds, enough that some experts get no token in a batch
MOE_CONFIGS = {
    "qwen3_moe": (Qwen3MoeConfig, dict(num_experts=8, num_experts_per_tok=2, moe_intermediate_size=32, head_dim=16,
                                       norm_topk_prob=True)),
    "mixtral": (MixtralConfig, dict(num_local_experts=4, num_experts_per_tok=2, intermediate_size=32)),
    # a shared expert (plain linears) beside the routed ones, and a dense layer (mlp_only_layers)
    "qwen2_moe": (Qwen2MoeConfig, dict(num_experts=4, num_experts_per_tok=2, moe_intermediate_size=32,
                                       shared_expert_intermediate_size=48, mlp_only_layers=[1])),
}


def make_tiny_moe(out: Path, arch: str, layout: str) -> Path:
    """A tiny random MoE model; `layout` "per_expert" as transformers saves it (`experts.0.w1.weight`: what most
    hub checkpoints hold), "fused" as transformers 5 holds it (`experts.gate_up_proj`, one 3-D tensor)."""
    config_class, shape = MOE_CONFIGS[arch]
    save_tiny_random(out, config_class, **shape)
    if layout == "fused":
        state = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).state_dict()
        save_file({k: v.contiguous() for k, v in state.items()}, out / "model.safetensors", metadata={"format": "pt"})
    return out


@pytest.fixture(scope="session")
def tiny_moe(tmp_path_factory) -> dict[tuple[str, str], Path]:
    root = tmp_path_factory.mktemp("moe")
    return {(arch, layout): make_tiny_moe(root / f"{arch}-{layout}", arch, layout)
            for arch in MOE_CONFIGS for layout in ("per_expert", "fused")}


@pytest.fixture(scope="session")
def tiny_llama(tiny_models) -> Path:
    return tiny_models["llama"]


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


@pytest.fixture
def memorise_data(tmp_path) -> Path:
    rows = [{"prompt": f"Reverse: {w}\n", "completion": w[::-1]} for w in ("alpha", "bravo", "delta", "tango")]
    return write_jsonl(tmp_path / "data.jsonl", rows)


def transformers_4bit(path: Path, quant_type: str = "nf4", double_quant: bool = True):
    """transformers' own 4-bit load (`BitsAndBytesConfig`, fp32 compute): the independent reference for ours.

    Like every model qlora-kit builds, its 4-bit layers are kept from repacking themselves to bf16 at the first
    no-grad forward, which bitsandbytes does on CPUs with AVX512-BF16: without this, on such CPUs the reference
    would compute in bf16 and ours in fp32, and "bit-identical" would compare two different computations.
    Set here on bitsandbytes' own attribute, not through qlora-kit, so the reference does not lean on the code
    under test."""
    config = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type=quant_type,
                                bnb_4bit_use_double_quant=double_quant, bnb_4bit_compute_dtype=torch.float32)
    model = AutoModelForCausalLM.from_pretrained(path, quantization_config=config, dtype=torch.float32).eval()
    for module in model.modules():
        if isinstance(module, bnb.nn.Linear4bit):
            module.support_avx512bf16_for_cpu = False
    return model


def own_lines(stderr: str) -> list[str]:
    """qlora-kit's own lines of a command's stderr: libraries print warnings of their own, which vary by machine."""
    return [line for line in stderr.strip().splitlines() if line.startswith("qlora-kit")]
