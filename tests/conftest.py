"""Tiny models built in-process (no downloads): 2 layers, 64 wide, a byte-level tokenizer."""

from __future__ import annotations

import json
import os
from pathlib import Path

import bitsandbytes as bnb
import pytest
import torch
from transformers import AutoModelForCausalLM, BitsAndBytesConfig, Gemma2Config, LlamaConfig, Phi3Config, Qwen2Config

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
