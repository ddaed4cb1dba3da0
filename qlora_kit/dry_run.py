"""`qlora-kit train RECIPE --dry-run`: check a recipe and print what the run would do, loading no weights.

Everything that would stop the real run before its first step and costs no download or model load is checked
here: the recipe's keys and values, the data files (found and readable; a hub dataset needs allow_network),
the model's config (a local directory's, a built-in's or a shipped shape), the output directory.
"""

from __future__ import annotations

from pathlib import Path

from qlora_kit.checkpoint import previous_run
from qlora_kit.config import Recipe
from qlora_kit.errors import UserError
from qlora_kit.estimate import estimate, find_shape, format_estimate, local_gpu_memory
from qlora_kit.sources import data_sources


def dry_run(recipe: Recipe, recipe_path: str | None, shards: int = 1, offload: bool = False,
            device: str = "cuda") -> str:
    """The plan as text; raises `UserError` where the real run would."""
    t, d = recipe.train, recipe.data
    shape = find_shape(recipe)
    if not d.path:
        raise UserError("'data.path': must be set: a data file, a folder of them, or a datasets hub name")
    sources = data_sources(d.path, recipe.allow_network, "data.path")
    if d.eval_path:
        data_sources(d.eval_path, recipe.allow_network, "data.eval_path")
    out = Path(recipe.output_dir)
    previous = previous_run(out)
    steps = f"{t.max_steps} optimizer steps" if t.max_steps else f"{t.epochs} epoch(s)"
    budget = local_gpu_memory() if device == "cuda" else None
    lines = [f"recipe {recipe_path or '(defaults)'}: valid",
             f"model: {recipe.model.path} (shape: {shape.name})",
             f"data: {len(sources)} source(s) from {d.path} ({d.format}, packing {d.packing})"
             + (f"; eval: {d.eval_path}" if d.eval_path else ""),
             f"train: {steps}, micro_batch_size {t.micro_batch_size} x grad_accum {t.grad_accum} per process, "
             f"seq_len {t.seq_len}, lr {t.lr:g} ({t.lr_schedule}, warmup {t.warmup_steps})",
             f"output: {out}" + (f" (holds a run: {', '.join(previous)}; needs --overwrite or --resume)"
                                 if previous else ""),
             format_estimate(recipe, shape, estimate(recipe, shape, device, shards, offload), budget)]
    return "\n".join(lines)
