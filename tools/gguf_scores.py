"""Exact match of an adapter's exports: the float16 merge in transformers, and each GGUF type in llama.cpp.

    python tools/gguf_scores.py runs/demo/adapter --data recipes/data/dates-eval.jsonl --work /tmp/gguf-scores

Needs llama-cpp-python. Prints one JSON object: per export its exact match on the held-out data, how many
prompts llama.cpp tokenized differently from transformers, the export's size, seconds and perplexity change on
the check's sample texts.
"""

import argparse
import json
import time
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM

from qlora_kit.adapter import read_adapter
from qlora_kit.data import load_examples
from qlora_kit.evaluate import exact_match
from qlora_kit.gguf_export import TYPES, export_gguf
from qlora_kit.llama_cpp_eval import exact_match_llama_cpp
from qlora_kit.merge import merge
from qlora_kit.model import load_tokenizer
from qlora_kit.model_paths import resolve_model_path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("adapter", type=Path)
    parser.add_argument("--data", required=True)
    parser.add_argument("--work", type=Path, default=Path("/tmp/gguf-scores"))
    parser.add_argument("--types", nargs="*", default=list(TYPES))
    args = parser.parse_args()
    tokenizer = load_tokenizer(resolve_model_path(read_adapter(args.adapter).base_path()))
    examples = load_examples(args.data, tokenizer, 512, key="--data")
    merged = args.work / "merged"
    merge(args.adapter, merged, overwrite=True)
    model = AutoModelForCausalLM.from_pretrained(merged, dtype=torch.float32).eval()
    results = {"merged_float16_transformers": {"exact_match": exact_match(model, tokenizer, examples)[0]}}
    del model
    for qtype in args.types:
        path = args.work / f"model.{qtype}.gguf"
        start = time.perf_counter()
        report = export_gguf(args.adapter, path, qtype, overwrite=True)
        seconds = time.perf_counter() - start
        scored = exact_match_llama_cpp(path, tokenizer, examples)
        logits = report.checks.get("logits_transformers", {})
        results[f"gguf_{qtype}_llama_cpp"] = {
            "exact_match": scored["exact_match"], "prompt_ids_differ": scored["prompt_ids_differ"],
            "bytes": path.stat().st_size, "export_seconds": round(seconds, 1),
            "perplexity_reference": logits.get("perplexity_reference"),
            "perplexity_gguf": logits.get("perplexity_gguf")}
    print(json.dumps({"examples": len(examples.dataset), **results}, indent=2))


if __name__ == "__main__":
    main()
