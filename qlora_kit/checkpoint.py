"""Training checkpoints: everything a run needs to continue exactly where it stopped, with no pickle anywhere.

    output_dir/checkpoints/step-N/
        adapter/                 the LoRA weights in PEFT's format (as `output_dir/adapter`), loadable on its own
        optimizer.safetensors    every optimizer state tensor, keyed by its path in `optimizer.state_dict()`
        rng.safetensors          each process's torch RNG states, CPU and per CUDA device (uint8 tensors)
        trainer_state.json       step, data position, scheduler, optimizer scalars, each process's python + numpy
                                 RNG states, the data's fingerprint
        recipe.yaml              the resolved recipe, to refuse resuming with an incompatible one
        COMPLETE                 written last: {file: [size, sha256]}; a directory without it is unused

A checkpoint is written into a hidden temporary directory, flushed to disk and renamed into place, so a crash
or a full disk mid-save leaves the previous checkpoint as it was. Resuming checks every file against its
checksum and falls back to the newest checkpoint that passes (a crash can leave a file of the right size
filled with zeros). Tensors go to safetensors and everything else to JSON:
loading a checkpoint never unpickles anything, so a checkpoint from elsewhere cannot run code.
"""

from __future__ import annotations

import json
import os
import random
import re
import shutil
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import yaml
from safetensors.torch import load_file, save_file

from qlora_kit.config import Recipe, to_dict
from qlora_kit.errors import UserError
from qlora_kit.files import fsync_tree, sha256_file, staged_dir

CHECKPOINTS = "checkpoints"
MARKER = "COMPLETE"
_STEP_DIR = re.compile(r"^step-(\d+)$")
_TENSOR = "__tensor__"  # a JSON placeholder {"__tensor__": key} for a tensor stored in safetensors
# Recipe keys that may change when a run resumes, because the resumed run honours the new value exactly as a
# fresh run would: how long to train, what to log, evaluate and keep, memory savers that compute the same
# numbers. Any other change is refused: the model, adapter or quantization (the weights would not fit), the
# batches (the count of micro-batches already used would skip other examples), the optimizer and the schedule
# (their state comes from the checkpoint, so the recipe would claim values the run never used).
RESUMABLE = {"train.max_steps", "train.epochs", "train.log_every", "train.eval_every", "train.save_every",
             "train.keep_checkpoints", "train.max_bad_steps", "train.spike_factor", "train.max_grad_norm",
             "train.merge_after", "train.merge_dtype", "train.gradient_checkpointing", "train.offload_base",
             "output_dir", "allow_network", "model.trust_remote_code", "data.eval_path", "data.num_proc"}


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
    return _damage(path, checksums=False) is None


def _damage(path: Path, checksums: bool) -> str | None:
    """What is wrong with checkpoint `path` (None: nothing); `checksums` also reads every file to compare."""
    try:
        listed = json.loads((path / MARKER).read_text())
        for name, record in listed.items():
            size, digest = record if isinstance(record, list) else (record, None)  # older markers: size only
            file = path / name
            if not file.is_file() or file.stat().st_size != size:
                return f"{name} is missing or has another size than written"
            if checksums and digest is not None and sha256_file(file) != digest:
                return f"{name} does not match its checksum"
    except FileNotFoundError:
        return f"no {MARKER} marker (an interrupted save)"
    except (OSError, ValueError, TypeError, AttributeError):
        return f"its {MARKER} marker is unreadable"
    return None


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


def latest_sound_checkpoint(output_dir: Path) -> Path | None:
    """The newest checkpoint whose files all match their checksums; damaged newer ones are reported, skipped."""
    for path in reversed(list_checkpoints(output_dir)):
        damage = _damage(path, checksums=True)
        if damage is None:
            return path
        print(f"qlora-kit: skipping damaged checkpoint {path}: {damage}", file=sys.stderr)
    return None


def resolve_resume(resume: str | bool, output_dir: Path) -> Path | None:
    """`--resume` (the newest sound checkpoint in output_dir) or `--resume PATH` (a checkpoint or a run directory).

    None: `--resume` in an output_dir where no step was ever completed (nothing to resume: start afresh)."""
    if resume is True:
        found = latest_sound_checkpoint(output_dir)
        if found is None and not previous_run(output_dir):
            return None
        if found is None:
            raise UserError(f"--resume: no complete, undamaged checkpoint in {checkpoints_dir(output_dir)}")
        return found
    path = Path(resume)
    if not path.exists():
        raise UserError(f"--resume: {path} does not exist")
    if (path / MARKER).exists():
        damage = _damage(path, checksums=True)
        if damage:
            raise UserError(f"--resume: checkpoint {path} is damaged: {damage}")
        return path
    found = latest_sound_checkpoint(path)
    if found is None:
        raise UserError(f"--resume: {path} is neither a complete checkpoint nor a run directory holding one")
    return found


def prune(output_dir: Path, keep: int) -> None:
    """Keep the newest `keep` complete checkpoints; remove older ones and leftovers of interrupted saves.

    A checkpoint is renamed to a hidden name before it is deleted, so a deletion cut short (a second signal)
    leaves a leftover that the next prune removes, not a half-deleted `step-N`."""
    for old in list_checkpoints(output_dir)[:-keep] if keep > 0 else []:
        doomed = old.with_name(f".{old.name}.deleting")
        old.rename(doomed)
        shutil.rmtree(doomed, ignore_errors=True)
    remove_checkpoint_leftovers(output_dir)


def remove_checkpoint_leftovers(output_dir: Path) -> None:
    """Interrupted saves and deletions: hidden `.step-*` directories and `step-N` without a marker. Only the
    holder of the run's lock calls this, so no live process is writing them."""
    root = checkpoints_dir(output_dir)
    if not root.is_dir():
        return
    for path in root.iterdir():
        if path.name.startswith(".step-") or (_STEP_DIR.match(path.name) and not (path / MARKER).exists()):
            shutil.rmtree(path, ignore_errors=True)


# ------------------------------------------------------------------------------------------ saving


def estimate_bytes(model: torch.nn.Module) -> int:
    """Upper bound of a checkpoint's size: trainable weights + two Adam states, all counted in fp32."""
    return sum(p.numel() * 4 * 3 for p in model.parameters() if p.requires_grad) + (1 << 20)


def previous_run(output_dir: Path) -> list[str]:
    """What of an earlier run `output_dir` holds: `train` refuses to overwrite it unless asked. An empty
    metrics.jsonl (a run stopped before its first step) and an empty checkpoints/ hold nothing to lose."""
    out = Path(output_dir)
    found = []
    if (out / "adapter").exists():
        found.append("adapter")
    if (out / "metrics.jsonl").is_file() and (out / "metrics.jsonl").stat().st_size:
        found.append("metrics.jsonl")
    if checkpoints_dir(out).is_dir() and any(checkpoints_dir(out).iterdir()):
        found.append(CHECKPOINTS)
    return found


def save_checkpoint(output_dir: Path, state: TrainerState, write_adapter, optimizer: torch.optim.Optimizer,
                    scheduler, scaler, recipe_yaml: str, data_fingerprint: str = "",
                    rng: list[dict] | None = None) -> Path:
    """Write checkpoint `step-N` atomically; `write_adapter(dir)` saves the LoRA weights in PEFT format there.
    `rng`: every process's `process_rng()`, in rank order (default: this process's alone)."""
    rng = rng or [process_rng()]
    target = checkpoints_dir(output_dir) / f"step-{state.step}"
    with staged_dir(target) as tmp:
        write_adapter(tmp / "adapter")
        optim_json, optim_tensors = split_tensors(optimizer.state_dict(), "")
        save_file(optim_tensors, tmp / "optimizer.safetensors")
        save_file({f"{name}.{rank}": t for rank, r in enumerate(rng) for name, t in r["tensors"].items()},
                  tmp / "rng.safetensors")
        trainer = {"step": state.step, "epoch": state.epoch, "consumed": state.consumed, "optimizer": optim_json,
                   "scheduler": scheduler.state_dict(),  # LambdaLR stores None for a plain function
                   "processes": len(rng), "python_rng": [r["python"] for r in rng],
                   "numpy_rng": [r["numpy"] for r in rng],
                   "loss_scaler": scaler.state_dict() if scaler is not None else {},
                   "data_fingerprint": data_fingerprint}
        (tmp / "trainer_state.json").write_text(json.dumps(trainer))
        (tmp / "recipe.yaml").write_text(recipe_yaml)
        fsync_tree(tmp)  # the marker must never reach the disk before the files it vouches for
        files = {str(f.relative_to(tmp)): [f.stat().st_size, sha256_file(f)] for f in sorted(tmp.rglob("*"))
                 if f.is_file()}
        (tmp / MARKER).write_text(json.dumps(files, indent=1))
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


def process_rng() -> dict:
    """This process's random number generators: torch's (CPU and each CUDA device's), Python's and numpy's. Each
    process of a distributed run has its own (dropout masks differ in size from rank to rank), so a checkpoint
    keeps them all and a resumed process takes back its own."""
    tensors = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        tensors |= {f"cuda{i}": s for i, s in enumerate(torch.cuda.get_rng_state_all())}
    return {"tensors": tensors, "python": _python_rng_to_json(), "numpy": _numpy_rng_to_json()}


def _restore_rng(path: Path, trainer: dict, rank: int) -> None:
    rng = load_file(path / "rng.safetensors")
    python, numpy = trainer["python_rng"], trainer["numpy_rng"]
    if "torch" in rng:  # written before checkpoints kept every process's state: rank 0's for all
        rng = {f"{k.replace('cuda.', 'cuda')}.{rank}": v for k, v in rng.items()}
        python, numpy = [python] * (rank + 1), [numpy] * (rank + 1)
    torch.set_rng_state(rng[f"torch.{rank}"])
    if torch.cuda.is_available():
        states = [rng.get(f"cuda{i}.{rank}") for i in range(torch.cuda.device_count())]
        if all(s is not None for s in states):
            torch.cuda.set_rng_state_all(states)
    version, internal, gauss = python[rank]
    random.setstate((version, tuple(internal), gauss))
    name, keys, pos, has_gauss, cached = numpy[rank]
    np.random.set_state((name, np.array(keys, dtype=np.uint32), pos, has_gauss, cached))


def checkpoint_processes(path: Path) -> int:
    """How many processes trained checkpoint `path` (older checkpoints did not say: 1)."""
    return json.loads((path / "trainer_state.json").read_text()).get("processes", 1)


def _python_rng_to_json() -> list:
    version, internal, gauss = random.getstate()
    return [version, list(internal), gauss]


def _numpy_rng_to_json() -> list:
    name, keys, pos, has_gauss, gauss = np.random.get_state()
    return [name, keys.tolist(), int(pos), int(has_gauss), float(gauss)]


# ------------------------------------------------------------------------------------------ loading


def checkpoint_step(path: Path) -> int:
    return json.loads((path / "trainer_state.json").read_text())["step"]


def load_checkpoint(path: Path, load_adapter, optimizer: torch.optim.Optimizer, scheduler,
                    scaler=None, rank: int = 0) -> TrainerState:
    """Restore the adapter (`load_adapter(dir)`), optimizer, scheduler and process `rank`'s RNGs; return where
    to continue.

    Call it after everything that draws random numbers at setup (LoRA init), right before the loop.
    """
    trainer = json.loads((path / "trainer_state.json").read_text())
    load_adapter(path / "adapter")
    optimizer.load_state_dict(join_tensors(trainer["optimizer"], load_file(path / "optimizer.safetensors")))
    scheduler.load_state_dict(trainer["scheduler"])
    if scaler is not None and trainer.get("loss_scaler"):
        scaler.load_state_dict(trainer["loss_scaler"])
    _restore_rng(path, trainer, rank)
    return TrainerState(trainer["step"], trainer["epoch"], trainer["consumed"])


def unresumable_changes(saved: dict[str, Any], ours: dict[str, Any]) -> list[str]:
    """Flattened recipe keys whose value differs between a checkpoint and now and that resuming cannot honour."""
    keys = sorted(set(saved) | set(ours))
    return [k for k in keys if k not in RESUMABLE and saved.get(k) != ours.get(k)]


def flatten(d: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    flat = {}
    for k, v in d.items():
        if isinstance(v, dict):
            flat |= flatten(v, f"{prefix}{k}.")
        else:
            flat[f"{prefix}{k}"] = v
    return flat


# ------------------------------------------------------------------------------------------ the run directory


def check_output_dir(out: Path) -> None:
    """`output_dir` must be a directory this process can write in, or a path where one can be made."""
    if out.exists() and not out.is_dir():
        raise UserError(f"'output_dir': {out} exists and is not a directory")
    existing = next(p for p in [out, *out.parents] if p.exists())
    if not os.access(existing, os.W_OK | os.X_OK):
        raise UserError(f"'output_dir': {existing} is not writable")


def prepare_output_dir(out: Path, overwrite: bool, resume_step: int | None = None) -> None:
    """Refuse to train over a finished run unless asked: a user's adapter is never lost by accident.

    Resuming continues the run in place: metrics.jsonl is cut back to the checkpoint's step, then appended to.
    """
    if resume_step is not None:
        truncate_metrics(out / "metrics.jsonl", resume_step)
        return
    previous = previous_run(out)
    if previous and not overwrite:
        raise UserError(f"'output_dir': {out} already holds a run ({', '.join(previous)}); choose another "
                        "output_dir, pass --resume to continue it, or --overwrite to replace it")
    out.mkdir(parents=True, exist_ok=True)
    (out / "metrics.jsonl").unlink(missing_ok=True)  # empty, or replaced with --overwrite: a fresh log
    if overwrite:  # the old adapter stays until the new one replaces it atomically at the end
        shutil.rmtree(checkpoints_dir(out), ignore_errors=True)  # another run's checkpoints must not resume


def truncate_metrics(path: Path, step: int) -> None:
    """Drop the lines logged after `step` (the steps the resumed run repeats); a torn last line goes too."""
    if not path.is_file():
        return
    kept = []
    for line in path.read_text().splitlines(keepends=True):
        try:
            if json.loads(line)["step"] <= step and line.endswith("\n"):
                kept.append(line)
        except (ValueError, KeyError):
            pass
    path.write_text("".join(kept))


def check_resumable(recipe: Recipe, checkpoint: Path, data_fingerprint: str, processes: int) -> None:
    """Refuse to resume with settings the checkpoint cannot honour (see `checkpoint.RESUMABLE`), other data or
    another number of processes (each process's share of the batches would change)."""
    trained_by = checkpoint_processes(checkpoint)
    if trained_by != processes:
        raise UserError(f"--resume: {checkpoint} was trained by {trained_by} process(es), this run has {processes}: "
                        "each process's share of the batches would change; resume with the same number")
    saved = yaml.safe_load((checkpoint / "recipe.yaml").read_text())
    flat_saved, flat_ours = flatten(saved), flatten(to_dict(recipe))
    differ = unresumable_changes(flat_saved, flat_ours)
    if differ:
        details = "; ".join(f"{k} (checkpoint {flat_saved.get(k)!r}, now {flat_ours.get(k)!r})" for k in differ)
        raise UserError(f"--resume: {checkpoint} was trained with other settings, which resuming cannot honour: "
                        f"{details}. Set them back, or start a new run from its adapter "
                        f"(model.adapter={checkpoint / 'adapter'})")
    saved_fingerprint = json.loads((checkpoint / "trainer_state.json").read_text()).get("data_fingerprint")
    if saved_fingerprint and saved_fingerprint != data_fingerprint:
        raise UserError(f"--resume: the training data ({recipe.data.path}) changed since {checkpoint} was saved, so "
                        "the batches already trained on cannot be skipped; restore the data, or start a new run from "
                        f"its adapter (model.adapter={checkpoint / 'adapter'})")
