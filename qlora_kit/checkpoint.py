"""Training checkpoints: everything a run needs to continue exactly where it stopped, with no pickle anywhere.

    output_dir/checkpoints/step-N/
        adapter/                 the LoRA weights in PEFT's format (as `output_dir/adapter`), loadable on its own
        optimizer.safetensors    every optimizer state tensor, keyed by its path in `optimizer.state_dict()`
        rng.safetensors          torch's CPU RNG state and one per CUDA device (uint8 tensors)
        trainer_state.json       step, data position, scheduler, optimizer scalars, python + numpy RNG states
        recipe.yaml              the resolved recipe, to refuse resuming with an incompatible one
        COMPLETE                 written last: {file: size}; a directory without it, or whose sizes differ, is unused

A checkpoint is written into a hidden temporary directory and renamed into place, so a crash or a full disk
mid-save leaves the previous checkpoint as it was. Tensors go to safetensors and everything else to JSON:
loading a checkpoint never unpickles anything, so a checkpoint from elsewhere cannot run code.
"""

from __future__ import annotations

import json
import random
import re
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from qlora_kit.errors import UserError
from qlora_kit.metrics import human_bytes

CHECKPOINTS = "checkpoints"
MARKER = "COMPLETE"
_STEP_DIR = re.compile(r"^step-(\d+)$")
_TENSOR = "__tensor__"  # a JSON placeholder {"__tensor__": key} for a tensor stored in safetensors
# Keys that change the model or the adapter's shape: resuming with another value would load wrong weights.
INCOMPATIBLE_KEYS = ("model.path", "lora.", "quant.")


@dataclass
class TrainerState:
    """Where the loop stands after `step` optimizer steps: epoch, and micro-batches consumed in that epoch."""

    step: int
    epoch: int
    consumed: int  # micro-batches of `epoch` already trained on (per process)


# ------------------------------------------------------------------------------------------ listing


def checkpoints_dir(output_dir: Path) -> Path:
    return Path(output_dir) / CHECKPOINTS


def is_complete(path: Path) -> bool:
    """True when the marker exists and every file it lists has the size written: a truncated file fails."""
    marker = path / MARKER
    if not marker.is_file():
        return False
    try:
        sizes = json.loads(marker.read_text())
        return all((path / name).is_file() and (path / name).stat().st_size == size for name, size in sizes.items())
    except (OSError, ValueError, AttributeError):
        return False


def list_checkpoints(output_dir: Path) -> list[Path]:
    """Complete checkpoints of a run, oldest first; partial or corrupted ones are left out."""
    root = checkpoints_dir(output_dir)
    if not root.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in root.iterdir() if (m := _STEP_DIR.match(p.name)) and is_complete(p)]
    return [p for _, p in sorted(found)]


def latest_checkpoint(output_dir: Path) -> Path | None:
    found = list_checkpoints(output_dir)
    return found[-1] if found else None


def resolve_resume(resume: str | bool, output_dir: Path) -> Path:
    """`--resume` (the latest checkpoint in output_dir) or `--resume PATH` (a checkpoint or a run directory)."""
    if resume is True:
        found = latest_checkpoint(output_dir)
        if found is None:
            raise UserError(f"--resume: no complete checkpoint in {checkpoints_dir(output_dir)}")
        return found
    path = Path(resume)
    if not path.exists():
        raise UserError(f"--resume: {path} does not exist")
    if is_complete(path):
        return path
    found = latest_checkpoint(path)
    if found is None:
        raise UserError(f"--resume: {path} is neither a complete checkpoint nor a run directory holding one")
    return found


def prune(output_dir: Path, keep: int) -> None:
    """Keep the newest `keep` complete checkpoints; remove older ones and leftovers of interrupted saves."""
    root = checkpoints_dir(output_dir)
    for old in list_checkpoints(output_dir)[:-keep] if keep > 0 else []:
        shutil.rmtree(old, ignore_errors=True)
    for leftover in root.glob(".step-*.tmp-*"):
        shutil.rmtree(leftover, ignore_errors=True)


# ------------------------------------------------------------------------------------------ saving


def estimate_bytes(model: torch.nn.Module) -> int:
    """Upper bound of a checkpoint's size: trainable weights + two Adam states, all counted in fp32."""
    return sum(p.numel() * 4 * 3 for p in model.parameters() if p.requires_grad) + (1 << 20)


def check_free_space(directory: Path, needed: int) -> None:
    """Refuse to start a save (or a run) that cannot fit: a full disk mid-save wastes the work since the last one."""
    directory.mkdir(parents=True, exist_ok=True)
    free = shutil.disk_usage(directory).free
    if free < needed:
        raise UserError(f"not enough free disk space in {directory}: a checkpoint needs about {human_bytes(needed)}, "
                        f"{human_bytes(free)} free; free some space or lower train.keep_checkpoints")


def previous_run(output_dir: Path) -> list[str]:
    """What of an earlier run `output_dir` holds: `train` refuses to overwrite it unless asked."""
    return [p for p in ("adapter", "metrics.jsonl", CHECKPOINTS) if (Path(output_dir) / p).exists()]


def save_checkpoint(output_dir: Path, state: TrainerState, write_adapter, optimizer: torch.optim.Optimizer,
                    scheduler, recipe_yaml: str) -> Path:
    """Write checkpoint `step-N` atomically; `write_adapter(dir)` saves the LoRA weights in PEFT format there."""
    root = checkpoints_dir(output_dir)
    root.mkdir(parents=True, exist_ok=True)
    target = root / f"step-{state.step}"
    tmp = Path(tempfile.mkdtemp(dir=root, prefix=f".{target.name}.tmp-"))
    try:
        write_adapter(tmp / "adapter")
        optim_json, optim_tensors = split_tensors(optimizer.state_dict(), "")
        save_file(optim_tensors, tmp / "optimizer.safetensors")
        save_file(rng_tensors(), tmp / "rng.safetensors")
        trainer = {"step": state.step, "epoch": state.epoch, "consumed": state.consumed, "optimizer": optim_json,
                   "scheduler": scheduler.state_dict(),  # LambdaLR stores None for a plain function
                   "python_rng": _python_rng_to_json(), "numpy_rng": _numpy_rng_to_json()}
        (tmp / "trainer_state.json").write_text(json.dumps(trainer))
        (tmp / "recipe.yaml").write_text(recipe_yaml)
        sizes = {str(f.relative_to(tmp)): f.stat().st_size for f in sorted(tmp.rglob("*")) if f.is_file()}
        (tmp / MARKER).write_text(json.dumps(sizes, indent=1))
        tmp.chmod(0o755)
        if target.exists():  # a re-save of the same step (a resumed run stopped again at once)
            shutil.rmtree(target)
        tmp.rename(target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return target


def split_tensors(obj: Any, prefix: str) -> tuple[Any, dict[str, torch.Tensor]]:
    """A JSON-able copy of a nested state dict, each tensor replaced by a placeholder, plus the tensors by key.

    bitsandbytes keeps its states (state1/state2, 8-bit qmap/absmax) in a nested dict under
    `__bnb_optimizer_quant_state__` and the step as an int; torch's AdamW keeps the step as a 0-d tensor.
    Walking the whole structure covers both without knowing either.
    """
    tensors: dict[str, torch.Tensor] = {}

    def walk(value: Any, key: str) -> Any:
        if isinstance(value, torch.Tensor):
            tensors[key] = value.detach().to("cpu").contiguous()
            return {_TENSOR: key}
        if isinstance(value, dict):
            return {"__keys__": [_json_key(k) for k in value], "values": [walk(v, f"{key}{k}.") for k, v in
                                                                            value.items()]}
        if isinstance(value, (list, tuple)):
            return {"__tuple__" if isinstance(value, tuple) else "__list__": [walk(v, f"{key}{i}.")
                                                                            for i, v in enumerate(value)]}
        return value

    return walk(obj, prefix), {k.rstrip("."): v for k, v in tensors.items()}


def join_tensors(obj: Any, tensors: dict[str, torch.Tensor]) -> Any:
    """The inverse of `split_tensors`: keys keep their types (int parameter ids), tuples stay tuples."""
    if isinstance(obj, dict):
        if _TENSOR in obj:
            return tensors[obj[_TENSOR].rstrip(".")]
        if "__keys__" in obj:
            pairs = zip(obj["__keys__"], obj["values"], strict=True)
            return {_from_json_key(k): join_tensors(v, tensors) for k, v in pairs}
        if "__tuple__" in obj:
            return tuple(join_tensors(v, tensors) for v in obj["__tuple__"])
        return [join_tensors(v, tensors) for v in obj["__list__"]]
    return obj


def _json_key(key: Any) -> Any:
    return {"int": key} if isinstance(key, int) else key


def _from_json_key(key: Any) -> Any:
    return key["int"] if isinstance(key, dict) else key


def rng_tensors() -> dict[str, torch.Tensor]:
    states = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        states |= {f"cuda.{i}": s for i, s in enumerate(torch.cuda.get_rng_state_all())}
    return states


def _python_rng_to_json() -> list:
    version, internal, gauss = random.getstate()
    return [version, list(internal), gauss]


def _numpy_rng_to_json() -> list:
    name, keys, pos, has_gauss, gauss = np.random.get_state()
    return [name, keys.tolist(), int(pos), int(has_gauss), float(gauss)]


# ------------------------------------------------------------------------------------------ loading


def checkpoint_step(path: Path) -> int:
    return json.loads((path / "trainer_state.json").read_text())["step"]


def load_checkpoint(path: Path, load_adapter, optimizer: torch.optim.Optimizer, scheduler) -> TrainerState:
    """Restore the adapter (`load_adapter(dir)`), optimizer, scheduler and every RNG; return where to continue.

    Call it after everything that draws random numbers at setup (LoRA init), right before the loop.
    """
    trainer = json.loads((path / "trainer_state.json").read_text())
    load_adapter(path / "adapter")
    optimizer.load_state_dict(join_tensors(trainer["optimizer"], load_file(path / "optimizer.safetensors")))
    scheduler.load_state_dict(trainer["scheduler"])
    rng = load_file(path / "rng.safetensors")
    torch.set_rng_state(rng["torch"])
    if torch.cuda.is_available() and "cuda.0" in rng:
        torch.cuda.set_rng_state_all([rng[f"cuda.{i}"] for i in range(torch.cuda.device_count()) if f"cuda.{i}" in rng])
    version, internal, gauss = trainer["python_rng"]
    random.setstate((version, tuple(internal), gauss))
    name, keys, pos, has_gauss, cached = trainer["numpy_rng"]
    np.random.set_state((name, np.array(keys, dtype=np.uint32), pos, has_gauss, cached))
    return TrainerState(trainer["step"], trainer["epoch"], trainer["consumed"])


def incompatible_keys(saved: dict[str, Any], ours: dict[str, Any]) -> list[str]:
    """Recipe keys (flattened, dotted) that differ and would change the model or adapter being trained."""
    flat_saved, flat_ours = flatten(saved), flatten(ours)
    keys = sorted(set(flat_saved) | set(flat_ours))
    return [k for k in keys if k.startswith(INCOMPATIBLE_KEYS) and flat_saved.get(k) != flat_ours.get(k)]


def flatten(d: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    flat = {}
    for k, v in d.items():
        if isinstance(v, dict):
            flat |= flatten(v, f"{prefix}{k}.")
        else:
            flat[f"{prefix}{k}"] = v
    return flat
