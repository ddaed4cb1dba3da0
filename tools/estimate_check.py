"""Check `qlora-kit estimate` against measured peaks: train a few steps at several sizes, compare.

On the CPU (the default) the real SmolLM2-135M-Instruct trains on text rows that fill every position (the
estimate's worst case: every position a label), each size in its own process; the measured peak is the run's
VmHWM, the estimate `estimate(recipe, shape, "cpu")`. On a GPU, pass `--model` and sizes to compare with
`max_memory_allocated` plus the CUDA context.

    python tools/estimate_check.py                       # CPU: 3 sizes, ~3 minutes on 2 cores
    python tools/estimate_check.py --sizes 1x256 2x512   # micro_batch x seq_len
"""

from __future__ import annotations

import argparse
import json
import random
import subprocess
import sys
import tempfile
from pathlib import Path

WORDS = ("time year people way day man thing woman life child world school state family student group country "
         "problem hand part place case week company system program question work government number night point "
         "home water room mother area money story fact month lot right study book eye job word business issue").split()


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--sizes", nargs="+", default=["1x512", "4x256", "4x512"], help="micro_batch x seq_len")
    p.add_argument("--steps", type=int, default=2)
    p.add_argument("--out", default="estimate_check.json")
    args = p.parse_args(argv)

    import torch

    from qlora_kit.config import load_recipe
    from qlora_kit.estimate import estimate, find_shape

    device = "cuda" if torch.cuda.is_available() else "cpu"
    work = Path(tempfile.mkdtemp(prefix="qlora-kit-estimate-"))
    rng = random.Random(0)
    data = work / "text.jsonl"
    data.write_text("".join(json.dumps({"text": " ".join(rng.choice(WORDS) for _ in range(3000))}) + "\n"
                            for _ in range(64)))
    recipe_file = work / "recipe.yaml"
    recipe_file.write_text("{}\n")  # everything is in the overrides
    results = []
    for size in args.sizes:
        mb, seq = (int(v) for v in size.split("x"))
        overrides = [f"model.path={args.model}", f"data.path={data}", "data.format=text", "data.packing=none",
                     f"train.micro_batch_size={mb}", f"train.seq_len={seq}", f"train.max_steps={args.steps}",
                     f"output_dir={work / size}", "train.gradient_checkpointing=true"]
        recipe = load_recipe(None, overrides)
        predicted = estimate(recipe, find_shape(recipe), device)
        run = subprocess.run([sys.executable, "-m", "qlora_kit", "train", "--overwrite", str(recipe_file), *overrides],
                             capture_output=True, text=True)
        if run.returncode != 0:
            raise SystemExit(f"estimate_check: {size} failed:\n{run.stderr[-2000:]}")
        records = [json.loads(line) for line in (work / size / "metrics.jsonl").read_text().splitlines()]
        measured = max(r["peak_mem_bytes"] for r in records)
        if device == "cuda":
            from qlora_kit.estimate import CUDA_CONTEXT

            measured += CUDA_CONTEXT  # max_memory_allocated leaves the context out; the estimate counts it
        error = predicted.total / measured - 1
        results.append({"size": size, "predicted_bytes": predicted.total, "measured_bytes": measured,
                        "error": error, "parts": predicted.parts})
        print(f"{size:>8}: estimated {predicted.total / 2**20:7.0f} MiB, measured {measured / 2**20:7.0f} MiB, "
              f"error {error:+.1%}", flush=True)
    Path(args.out).write_text(json.dumps({"device": device, "model": args.model, "results": results}, indent=2))


if __name__ == "__main__":
    main()
