"""The README's memory table: for each GPU recipe, and for published QLoRA runs of the same shapes, the estimate
and the traced step (`qlora-kit estimate --trace`), both as bytes allocated (what `torch.cuda.max_memory_allocated`
reports: no CUDA context, no allocator slack), beside the published measurement where there is one. (The GPU
column of the README's table is written by hand.)

    python tools/memory_table.py            # prints markdown rows; ~3 minutes on 2 CPU cores
"""

from __future__ import annotations

import contextlib
import io
import json
import re
from pathlib import Path

from qlora_kit.config import load_recipe
from qlora_kit.estimate import estimate, find_shape, gib
from qlora_kit.trace import per_process, trace_step

ROOT = Path(__file__).resolve().parents[1]
LLAMA2_70B = {"model_type": "llama", "vocab_size": 32000, "hidden_size": 8192, "intermediate_size": 28672,
              "num_hidden_layers": 80, "num_attention_heads": 64, "num_key_value_heads": 8,
              "max_position_embeddings": 4096}
QKVO = "lora.target_modules=[q_proj, k_proj, v_proj, o_proj]"
# Scripted runs of the standard stack (transformers + peft + bitsandbytes), torch's max allocated, GB converted
# to GiB (issue 18 of this project, which cites them).
PUBLISHED = [
    ("Mistral-7B, 4 x 4096, r 16 on q/k/v/o", "mistral-7b", None,
     ["train.micro_batch_size=4", "train.seq_len=4096", "lora.r=16", QKVO], "15.25 GiB"),
    ("Mistral-7B, 8 x 4096, r 16 on q/k/v/o", "mistral-7b", None,
     ["train.micro_batch_size=8", "train.seq_len=4096", "lora.r=16", QKVO], "26.46 GiB"),
    ("Llama-2-70B, 4 x 4096, r 16 on q/k/v/o", "llama-3.1-70b-48gb", LLAMA2_70B,
     ["train.micro_batch_size=4", "train.seq_len=4096", "lora.r=16", QKVO], "63.45 GiB"),
]


def row(label: str, recipe_name: str, config: dict | None, overrides: list[str], published: str) -> str:
    recipe = load_recipe(ROOT / "recipes" / f"{recipe_name}.yaml", overrides)
    if config is not None:
        with _config_file(config) as path:
            shape = find_shape(recipe, path)
    else:
        shape = find_shape(recipe)
    header = (ROOT / "recipes" / f"{recipe_name}.yaml").read_text() if not overrides else ""
    shards = int(m.group(1)) if (m := re.search(r"--fsdp (\d+)", header)) else 1
    est = estimate(recipe, shape, "cuda", shards, "--fsdp-offload" in header)
    allocated = est.total - est.parts.get("CUDA context", 0) - est.parts.get("allocator slack", 0)
    trace = trace_step(recipe, shape.config)
    traced = gib(trace.peak)
    if shards > 1:  # a single-process trace, what FSDP shards taken out (derived, not traced)
        traced = f"{gib(per_process(trace, est))} (derived)"
    return f"| {label} | | {published} | {gib(allocated)} | {traced} | {gib(est.total)} |"


@contextlib.contextmanager
def _config_file(config: dict):
    import tempfile

    with tempfile.TemporaryDirectory() as d:
        path = Path(d) / "config.json"
        path.write_text(json.dumps(config))
        yield path


def main() -> None:
    print("| run | GPU | published (standard stack) | estimate | trace "
          "| peak per GPU (estimate + CUDA context, slack) |")
    print("|---|---|---|---|---|---|")
    with contextlib.redirect_stderr(io.StringIO()):
        rows = [row(f"`recipes/{p.stem}.yaml`", p.stem, None, [], "")
                for p in sorted((ROOT / "recipes").glob("*.yaml")) if "Expected peak memory" in p.read_text()]
        rows += [row(*published) for published in PUBLISHED]
    print("\n".join(rows))


if __name__ == "__main__":
    main()
