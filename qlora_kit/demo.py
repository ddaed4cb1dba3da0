"""`qlora-kit demo`: QLoRA on a real model, offline, end to end, in minutes on a CPU.

Finetunes SmolLM2-135M-Instruct on the date task of `recipes/smollm2-135m-demo.yaml`, then shows the whole
path a user takes: exact match on held-out data before and after, merge to float16, the merged model
reloaded with plain transformers and scored again, the q8_0 GGUF export scored by llama.cpp (when
llama-cpp-python is installed), a few generations, and `demo_report.json`.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

from transformers import AutoModelForCausalLM

from qlora_kit.config import load_recipe
from qlora_kit.data import load_examples
from qlora_kit.errors import UserError
from qlora_kit.evaluate import exact_match
from qlora_kit.gguf_export import export_gguf
from qlora_kit.llama_cpp_eval import INSTALL_HINT, exact_match_llama_cpp, llama_cpp_available
from qlora_kit.memory import peak_memory_bytes
from qlora_kit.merge import merge
from qlora_kit.model import compute_dtype_for, default_device
from qlora_kit.train import build_model, train

ROOT = Path(__file__).resolve().parent.parent
RECIPE = ROOT / "recipes" / "smollm2-135m-demo.yaml"


def run_demo(out: Path, overrides: list[str] = ()) -> dict:
    """Run the demo into `out` and return its report (also written to `out/demo_report.json`)."""
    if not RECIPE.is_file():
        raise UserError(f"{RECIPE} not found: the demo runs from a source checkout (pip install -e .)")
    recipe = load_recipe(RECIPE, [f"output_dir={out}", f"data.path={ROOT / 'recipes/data/dates-train.jsonl'}",
                                  f"data.eval_path={ROOT / 'recipes/data/dates-eval.jsonl'}", *overrides])
    device = default_device()
    start = time.perf_counter()

    base = build_model(recipe, device)  # LoRA B = 0: exactly the 4-bit base training starts from
    tokenizer = base.tokenizer
    held_out = load_examples(recipe.data.eval_path, tokenizer, recipe.train.seq_len, recipe.data, key="data.eval_path")
    before, before_samples = exact_match(base.model.eval(), tokenizer, held_out)
    _say(f"before: exact match {before:.0%} on {len(held_out.dataset)} held-out examples")
    del base

    result = train(recipe, overwrite=True)
    after, after_samples = exact_match(result.model.eval(), tokenizer, held_out)
    _say(f"after {result.steps} steps ({result.seconds:.0f} s): exact match {after:.0%}")
    del result.model

    merged_dir = out / "merged"
    merge(result.adapter_dir, merged_dir, dtype="float16", overwrite=True)
    merged = AutoModelForCausalLM.from_pretrained(merged_dir, dtype=compute_dtype_for("auto", device)).to(device)
    merged_em, _ = exact_match(merged.eval(), tokenizer, held_out)
    _say(f"merged (float16 export, plain transformers): exact match {merged_em:.0%}")
    gguf_report = _gguf_step(result.adapter_dir, out / "model.q8_0.gguf", tokenizer, held_out)
    for b, a in list(zip(before_samples, after_samples, strict=True))[:3]:
        _say(f"\n  {_question(a['prompt'])}\n    expected {a['answer']!r}\n    before   {b['output'][:60]!r}"
             f"\n    after    {a['output']!r}")

    report = {"before": {"exact_match": before}, "after": {"exact_match": after},
              "merged": {"exact_match": merged_em}, "gguf": gguf_report, "train_seconds": result.seconds,
              "total_seconds": time.perf_counter() - start, "peak_mem_bytes": peak_memory_bytes(device),
              "eval_examples": len(held_out.dataset),
              "paths": {"adapter": str(result.adapter_dir), "merged": str(merged_dir), "run": str(out),
                        "metrics": str(out / "metrics.jsonl"), "gguf": str(out / "model.q8_0.gguf")}}
    (out / "demo_report.json").write_text(json.dumps(report, indent=2) + "\n")
    _say(f"\nreport: {out / 'demo_report.json'}")
    return report


def _gguf_step(adapter_dir: Path, path: Path, tokenizer, held_out) -> dict:
    """Export to q8_0 GGUF (the usual choice for local inference) and, where llama-cpp-python is installed,
    score it with llama.cpp itself."""
    export = export_gguf(adapter_dir, path, "q8_0", overwrite=True)
    logits = export.checks.get("logits_transformers", {})
    _say(f"GGUF export (q8_0, {export.bytes / 2**20:.0f} MiB, {export.seconds:.0f} s): {path}")
    report = {"type": "q8_0", "bytes": export.bytes, "seconds": export.seconds,
              "perplexity_reference": logits.get("perplexity_reference"),
              "perplexity_gguf": logits.get("perplexity_gguf")}
    if not llama_cpp_available():
        _say(f"  llama.cpp scoring skipped: llama-cpp-python is not installed; {INSTALL_HINT}")
        report["llama_cpp"] = "not installed"
        return report
    scored = exact_match_llama_cpp(path, tokenizer, held_out)
    _say(f"  llama.cpp (llama-cpp-python) on the GGUF: exact match {scored['exact_match']:.0%}")
    report["llama_cpp"] = {k: v for k, v in scored.items() if k != "samples"}
    return report


def _question(prompt: str) -> str:
    """The user's line of a decoded chat prompt (the template's role names are on lines of their own)."""
    lines = [line for line in prompt.strip().splitlines() if line.strip() not in ("", "assistant", "user")]
    return lines[-1] if lines else prompt


def _say(text: str) -> None:
    print(text, file=sys.stderr, flush=True)
