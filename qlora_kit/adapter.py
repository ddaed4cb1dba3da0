"""Adapters on disk, in PEFT's format: `adapter_config.json` + `adapter_model.safetensors`.

PEFT names each tensor `base_model.model.<module path>.lora_A.weight` (the adapter name `default` is dropped
on save), so `peft.PeftModel.from_pretrained`, vLLM and transformers' `load_adapter` read our files as their own.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from qlora_kit.config import LoraConfig
from qlora_kit.errors import UserError
from qlora_kit.lora import lora_state_dict

CONFIG_NAME = "adapter_config.json"
# qlora-kit's own facts about the run that PEFT's config has no field for: how the base was quantized (merge
# reproduces it bit for bit) and which directory the base was loaded from.
METADATA_NAME = "qlora_kit.json"
WEIGHTS_NAME = "adapter_model.safetensors"
PEFT_PREFIX = "base_model.model."


def peft_target_modules(targets: list[str], candidates: list[str]) -> list[str]:
    """The shortest `target_modules` that PEFT resolves to exactly `targets`: leaf names when they suffice."""
    leaves = sorted({t.rsplit(".", 1)[-1] for t in targets})
    if {c for c in candidates if c.rsplit(".", 1)[-1] in leaves} == set(targets):
        return leaves
    return sorted(targets)


def adapter_config(lora: LoraConfig, target_modules: list[str], base_model: str) -> dict:
    """PEFT's `LoraConfig` fields, with the values that reproduce qlora-kit's layers."""
    return {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "base_model_name_or_path": base_model,
        "r": lora.r,
        "lora_alpha": lora.alpha,
        "lora_dropout": lora.dropout,
        "target_modules": target_modules,
        "use_rslora": lora.use_rslora,
        "bias": "none",
        "fan_in_fan_out": False,
        "init_lora_weights": True,
        "inference_mode": True,
        "modules_to_save": None,
        "layers_to_transform": None,
        "layers_pattern": None,
        "rank_pattern": {},
        "alpha_pattern": {},
        "use_dora": False,
        "revision": None,
    }


def save_adapter(model: nn.Module, out_dir: Path, config: dict, extra_files: dict[str, str] | None = None,
                 lora_tensors: dict[str, torch.Tensor] | None = None) -> None:
    """Write the adapter to `out_dir` atomically: a crash mid-save never leaves a half-written adapter there.
    `lora_tensors`: the LoRA weights when `model` holds only a shard of them (FSDP gathers them first)."""
    out_dir = Path(out_dir)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    lora = lora_state_dict(model) if lora_tensors is None else lora_tensors
    tensors = {PEFT_PREFIX + k: v.detach().to("cpu").contiguous() for k, v in lora.items()}
    tmp = Path(tempfile.mkdtemp(dir=out_dir.parent, prefix=f".{out_dir.name}.tmp-"))
    try:
        save_file(tensors, tmp / WEIGHTS_NAME, metadata={"format": "pt"})
        (tmp / CONFIG_NAME).write_text(json.dumps(config, indent=2) + "\n")
        for name, text in (extra_files or {}).items():
            (tmp / name).write_text(text)
        _default_permissions(tmp)
        publish_dir(tmp, out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _default_permissions(directory: Path) -> None:
    """mkdtemp makes a private (0700) directory; give the adapter the permissions a plain mkdir would."""
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(directory, 0o777 & ~umask)
    for file in directory.iterdir():
        os.chmod(file, 0o666 & ~umask)


def publish_dir(new: Path, target: Path) -> None:
    """Put `new` at `target`; an existing `target` is moved aside first and removed only once `new` is in place."""
    old = None
    if target.exists():
        old = target.with_name(f".{target.name}.old-{new.name.rsplit('-', 1)[-1]}")
        target.rename(old)
    new.rename(target)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def read_adapter_config(adapter_dir: Path) -> dict:
    path = Path(adapter_dir) / CONFIG_NAME
    if not path.is_file():
        raise UserError(f"{adapter_dir}: no {CONFIG_NAME} here; is this an adapter directory?")
    config = json.loads(path.read_text())
    if config.get("peft_type") != "LORA":
        raise UserError(f"{path}: peft_type is {config.get('peft_type')!r}; qlora-kit loads LORA adapters only")
    return config


def read_training_metadata(adapter_dir: Path) -> dict:
    """qlora-kit's metadata, or {} for adapters made elsewhere (then defaults: NF4, double quant, block 64)."""
    path = Path(adapter_dir) / METADATA_NAME
    return json.loads(path.read_text()) if path.is_file() else {}


def load_adapter_weights(model: nn.Module, adapter_dir: Path) -> None:
    """Copy an adapter's tensors into the model's LoRA layers; every LoRA tensor must be matched, both ways."""
    path = Path(adapter_dir) / WEIGHTS_NAME
    if not path.is_file():
        raise UserError(f"{adapter_dir}: no {WEIGHTS_NAME} here (qlora-kit reads safetensors adapters only)")
    saved = {k.removeprefix(PEFT_PREFIX).replace(".default.", "."): v for k, v in load_file(path).items()}
    ours = lora_state_dict(model)
    missing, unexpected = sorted(ours.keys() - saved.keys()), sorted(saved.keys() - ours.keys())
    if missing or unexpected:
        raise UserError(f"{adapter_dir}: adapter does not fit this model: {len(missing)} missing tensors "
                        f"({', '.join(missing[:3])}), {len(unexpected)} unexpected ({', '.join(unexpected[:3])})")
    with torch.no_grad():
        for key, tensor in ours.items():
            if tensor.shape != saved[key].shape:
                raise UserError(f"{adapter_dir}: '{key}' has shape {tuple(saved[key].shape)}, "
                                f"model expects {tuple(tensor.shape)} (different rank?)")
            tensor.copy_(saved[key])
