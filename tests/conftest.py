"""Tiny models built in-process (no downloads): 2 layers, 64 wide, a byte-level tokenizer."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch
from transformers import LlamaConfig, Phi3Config, Qwen2Config

from qlora_kit.zoo import save_tiny_random

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # tests never download; fail fast instead of retrying a hub

CONFIGS = {"llama": LlamaConfig, "qwen2": Qwen2Config, "phi3": Phi3Config}


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
