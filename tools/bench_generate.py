"""Generation speed on the CPU: qlora-kit's default 4-bit path (compute dtype, fp32) against the opt-in bf16 kernel
(`qlora-kit generate --cpu-bf16-kernel`, CPUs with AVX512-BF16 only), on the same model and prompts, greedy.

    python tools/bench_generate.py --out bench_generate.json            # SmolLM2-135M-Instruct in 4-bit

Each path generates every prompt once to warm up, then `--rounds` times timed; tokens/s counts new tokens. The
report says whether the two paths wrote the same texts (greedy decoding: bf16 rounding can change a token).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import bitsandbytes as bnb
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench import hardware  # noqa: E402

from qlora_kit.config import QuantConfig  # noqa: E402
from qlora_kit.inference import generate  # noqa: E402
from qlora_kit.model import load_quantized  # noqa: E402
from qlora_kit.model_paths import resolve_model_path  # noqa: E402
from qlora_kit.nf4 import use_cpu_bf16_kernel  # noqa: E402

PROMPTS = ("Write this date in compact form: July 4, 1976", "Explain what a linked list is, in two sentences.",
           "List three rivers of Europe.")


def timed(model, tokenizer, prompts, max_new_tokens: int, rounds: int) -> tuple[float, list[str]]:
    """New tokens per second over `rounds` passes of all prompts, after one untimed pass; and the texts."""
    texts = [generate(model, tokenizer, p, max_new_tokens, stream=False) for p in prompts]
    tokens, start = 0, time.perf_counter()
    for _ in range(rounds):
        for p in prompts:
            out = generate(model, tokenizer, p, max_new_tokens, stream=False)
            tokens += len(tokenizer(out, add_special_tokens=False)["input_ids"])
    return tokens / (time.perf_counter() - start), texts


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="smollm2-135m", help="any qlora-kit model.path")
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--out", default="bench_generate.json")
    args = p.parse_args(argv)
    loaded = load_quantized(resolve_model_path(args.model), QuantConfig(), torch.device("cpu"))
    report = {"hardware": hardware("cpu"), "model": args.model, "max_new_tokens": args.max_new_tokens}
    report["default_tokens_per_s"], default_texts = timed(loaded.model, loaded.tokenizer, PROMPTS,
                                                          args.max_new_tokens, args.rounds)
    if bnb.functional.has_avx512bf16():
        use_cpu_bf16_kernel(loaded.model)
        report["bf16_kernel_tokens_per_s"], bf16_texts = timed(loaded.model, loaded.tokenizer, PROMPTS,
                                                               args.max_new_tokens, args.rounds)
        report["speedup"] = report["bf16_kernel_tokens_per_s"] / report["default_tokens_per_s"]
        report["same_texts"] = sum(a == b for a, b in zip(default_texts, bf16_texts, strict=True))
        report["prompts"] = len(PROMPTS)
    Path(args.out).write_text(json.dumps(report, indent=2) + "\n")
    print(json.dumps({k: v for k, v in report.items() if k != "hardware"}, indent=2))


if __name__ == "__main__":
    main()
