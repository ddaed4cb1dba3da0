"""Adapters on disk, in PEFT's format: `adapter_config.json` + `adapter_model.safetensors`.

PEFT names each tensor `base_model.model.<module path>.lora_A.weight` (the adapter name `default` is dropped
on save), so `peft.PeftModel.from_pretrained`, vLLM and transformers' `load_adapter` read our files as their own.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from qlora_kit import experts
from qlora_kit.config import LoraConfig, QuantConfig, Recipe, validate
from qlora_kit.errors import UserError
from qlora_kit.files import staged_dir
from qlora_kit.lora import LoRALinear, lora_scale, lora_state_dict

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


def peft_targets(targets: list[str], candidates: list[str]) -> tuple[list[str], list[str]]:
    """PEFT's `target_modules` (linears) and `target_parameters` (expert projections) for `targets`."""
    linears = [c for c in candidates if not experts.is_projection(c)]
    projections = [c for c in candidates if experts.is_projection(c)]
    return (peft_target_modules([t for t in targets if t in linears], linears) if any(t in linears for t in targets)
            else [], experts.peft_target_parameters([t for t in targets if t not in linears], projections))


def adapter_config(lora: LoraConfig, target_modules: list[str], base_model: str,
                   target_parameters: list[str] | None = None) -> dict:
    """PEFT's `LoraConfig` fields, with the values that reproduce qlora-kit's layers. With expert projections
    (`target_parameters`), lora_dropout is written as 0: PEFT refuses dropout there (it cannot apply it to a
    weight), and dropout is training's business; the recipe saved next to the adapter keeps the real value."""
    config = {
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
    if target_parameters:
        config.update(target_parameters=target_parameters, lora_dropout=0.0)
    return config


def save_adapter(model: nn.Module, out_dir: Path, config: dict, extra_files: dict[str, str] | None = None,
                 lora_tensors: dict[str, torch.Tensor] | None = None) -> None:
    """Write the adapter to `out_dir` atomically: a crash mid-save never leaves a half-written adapter there.
    `lora_tensors`: the LoRA weights when `model` holds only a shard of them (FSDP gathers them first)."""
    lora = experts.to_peft_names(lora_state_dict(model) if lora_tensors is None else lora_tensors)
    tensors = {PEFT_PREFIX + k: v.detach().to("cpu").contiguous() for k, v in lora.items()}
    with staged_dir(Path(out_dir)) as tmp:
        save_file(tensors, tmp / WEIGHTS_NAME, metadata={"format": "pt"})
        (tmp / CONFIG_NAME).write_text(json.dumps(config, indent=2) + "\n")
        for name, text in (extra_files or {}).items():
            (tmp / name).write_text(text)


@dataclass
class Adapter:
    """An adapter directory, read and checked against its own config: what merge, eval and generate load."""

    path: Path
    config: dict  # adapter_config.json
    metadata: dict  # qlora_kit.json, or {} for adapters made elsewhere (then NF4, double quant, block 64)
    # module name -> (A (r x d_in), B (d_out x r)); expert projections (`...experts.gate_up_proj`, named as in
    # qlora-kit) -> (A (experts * r x d_in), B (d_out x r * experts)), PEFT's layout (see experts.py)
    pairs: dict[str, tuple[torch.Tensor, torch.Tensor]]

    @property
    def r(self) -> int:
        return self.config["r"]

    @property
    def scale(self) -> float:
        return lora_scale(self.r, self.config["lora_alpha"], bool(self.config.get("use_rslora")))

    def base_path(self, override: str | None = None) -> str:
        """The base model: `override`, else the directory training loaded, else PEFT's recorded name."""
        base = override or self.metadata.get("model_path") or self.config.get("base_model_name_or_path")
        if not base:
            raise UserError(f"{self.path}: the adapter does not say which base model it belongs to; pass --model")
        return base

    def quant(self, compute_dtype: str | None = None) -> QuantConfig:
        """How training quantized the base (defaults for adapters made elsewhere); `compute_dtype` overrides."""
        settings = dict(self.metadata.get("quant") or {})
        if compute_dtype:
            settings["compute_dtype"] = compute_dtype
        try:
            quant = QuantConfig(**settings)
            validate(Recipe(quant=quant))
        except (TypeError, UserError) as e:
            raise UserError(f"{self.path / METADATA_NAME}: bad 'quant' settings ({e})") from None
        return quant

    def check_fits(self, shapes: dict[str, tuple[int, int, int]], base: str) -> None:
        """Every adapted module is a linear or expert projection of the base (`shapes`: name -> (copies, d_in,
        d_out), `model.lora_shapes`) of matching size."""
        for module, (a, b) in self.pairs.items():
            if module not in shapes:
                raise UserError(f"{self.path}: adapter targets {module}, which is not a quantized linear layer of "
                                f"{base}")
            copies, d_in, d_out = shapes[module]
            if a.shape[1] != d_in or b.shape[0] != d_out:
                raise UserError(f"{self.path}: {module} is {d_out} x {d_in} in {base}, but the adapter's B @ A is "
                                f"{b.shape[0]} x {a.shape[1]}")
            if a.shape[0] != copies * self.r:
                raise UserError(f"{self.path}: {module} has {copies} experts in {base}, but the adapter has LoRA "
                                f"pairs for {a.shape[0] // self.r}")


def read_adapter(adapter_dir: Path) -> Adapter:
    """Read an adapter directory and check it before anything uses it: the config's fields, every module with
    both matrices, their shapes against the config's rank, finite values. A NaN or a wrong `r` would otherwise
    go silently into a merged model."""
    adapter_dir = Path(adapter_dir)
    config = read_adapter_config(adapter_dir)
    path = adapter_dir / WEIGHTS_NAME
    if not path.is_file():
        raise UserError(f"{adapter_dir}: no {WEIGHTS_NAME} here (qlora-kit reads safetensors adapters only)")
    try:
        tensors = load_file(path)
    except Exception as e:  # safetensors raises its own error types for a damaged file
        raise UserError(f"{path}: not a readable safetensors file ({e})") from None
    matrices: dict[str, dict[str, torch.Tensor]] = {}
    for key, tensor in tensors.items():
        name = key.removeprefix(PEFT_PREFIX).replace(".default.", ".")
        module, sep, which = name.rpartition(".lora_")
        if not sep or which not in ("A.weight", "B.weight"):
            raise UserError(f"{path}: unexpected tensor {key!r} (a LoRA adapter holds only lora_A / lora_B weights)")
        module = experts.from_peft_name(module, config.get("target_parameters") or [])
        matrices.setdefault(module, {})[which[0]] = tensor
    if not matrices:
        raise UserError(f"{path}: holds no LoRA weights")
    pairs = {}
    for module, m in sorted(matrices.items()):
        if m.keys() != {"A", "B"}:
            have, lack = ("A", "B") if "A" in m else ("B", "A")
            raise UserError(f"{path}: {module} has lora_{have} but no lora_{lack}")
        a, b = m["A"], m["B"]  # expert projections: r rows and columns per expert
        if (a.dim() != 2 or b.dim() != 2 or a.shape[0] % config["r"] or b.shape[1] != a.shape[0]
                or a.shape[0] != config["r"] and not experts.is_projection(module)):
            raise UserError(f"{path}: {module} has A {tuple(a.shape)} and B {tuple(b.shape)}, which do not have "
                            f"the rank r={config['r']} that {CONFIG_NAME} gives")
        if not (torch.isfinite(a).all() and torch.isfinite(b).all()):
            raise UserError(f"{path}: {module} holds non-finite values (NaN or inf): the adapter is damaged")
        pairs[module] = (a, b)
    return Adapter(adapter_dir, config, read_training_metadata(adapter_dir), pairs)


def read_adapter_config(adapter_dir: Path) -> dict:
    """adapter_config.json, with the fields qlora-kit relies on checked."""
    path = Path(adapter_dir) / CONFIG_NAME
    if not path.is_file():
        raise UserError(f"{adapter_dir}: no {CONFIG_NAME} here; is this an adapter directory?")
    config = _read_json(path)
    if config.get("peft_type") != "LORA":
        raise UserError(f"{path}: peft_type is {config.get('peft_type')!r}; qlora-kit loads LORA adapters only")
    r, alpha = config.get("r"), config.get("lora_alpha")
    if not (type(r) is int and r > 0):
        raise UserError(f"{path}: 'r' must be a positive integer, got {r!r}")
    if not (isinstance(alpha, (int, float)) and not isinstance(alpha, bool) and alpha > 0):
        raise UserError(f"{path}: 'lora_alpha' must be a positive number, got {alpha!r}")
    if config.get("rank_pattern") or config.get("alpha_pattern") or config.get("use_dora"):
        raise UserError(f"{path}: per-module ranks or alphas and DoRA are not supported")
    return config


def read_training_metadata(adapter_dir: Path) -> dict:
    """qlora-kit's metadata, or {} for adapters made elsewhere (then defaults: NF4, double quant, block 64)."""
    path = Path(adapter_dir) / METADATA_NAME
    return _read_json(path) if path.is_file() else {}


def _read_json(path: Path) -> dict:
    try:
        value = json.loads(path.read_text(encoding="utf-8"))
    except (ValueError, UnicodeDecodeError) as e:
        raise UserError(f"{path}: not valid JSON ({e})") from None
    if not isinstance(value, dict):
        raise UserError(f"{path}: expected a JSON object")
    return value


def load_adapter_weights(model: nn.Module, adapter_dir: Path) -> None:
    install_adapter(model, read_adapter(adapter_dir))


def install_adapter(model: nn.Module, adapter: Adapter) -> None:
    """Copy an adapter's matrices into the model's LoRA layers; every LoRA layer must be matched, both ways."""
    layers = {name: m for name, m in model.named_modules() if isinstance(m, LoRALinear)}
    layers |= experts.lora_projections(model)
    missing = sorted(layers.keys() - adapter.pairs.keys())
    if missing:
        raise UserError(f"{adapter.path}: adapter does not fit this model: no weights for {len(missing)} LoRA "
                        f"layers ({', '.join(missing[:3])})")
    adapter.check_fits({n: (getattr(m, "num_experts", 1), *_in_out(m)) for n, m in layers.items()}, "this model")
    if any(m.r != adapter.r for m in layers.values()):
        raise UserError(f"{adapter.path}: rank r={adapter.r}, but the model's LoRA layers have another rank")
    with torch.no_grad():
        for name, layer in layers.items():
            a, b = adapter.pairs[name]
            layer.lora_A.weight.copy_(a)
            layer.lora_B.weight.copy_(b)


def _in_out(layer: nn.Module) -> tuple[int, int]:
    return (layer.d_in, layer.d_out) if isinstance(layer, experts.PackedExperts) else (layer.in_features,
                                                                                         layer.out_features)
