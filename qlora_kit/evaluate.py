"""Evaluate a model or adapter on a dataset: token loss, perplexity, and exact match of generated answers.

The data goes through the training pipeline (same formats, templates and masking), so "the answer" is exactly
what training scored: the last run of label tokens of each example, and "the prompt" everything before it.
Exact match compares the greedy completion, cut at EOS, with that answer (both decoded, outer spaces
stripped). Raw-text data has no answer, so no exact match.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from qlora_kit.batching import build_loader
from qlora_kit.config import DataConfig
from qlora_kit.data import Examples, load_examples
from qlora_kit.formats import IGNORE
from qlora_kit.inference import generate_batch
from qlora_kit.loss import token_loss_sum


@dataclass
class EvalResult:
    loss: float
    perplexity: float
    exact_match: float | None
    examples: int
    samples: list[dict[str, str]] = field(default_factory=list)  # a few (prompt, answer, output) triples


def split_prompt_answer(input_ids: list[int], labels: list[int], eos_id: int) -> tuple[list[int], list[int]]:
    """The tokens before the last labelled run, and that run without its trailing EOS."""
    end = max(i for i, label in enumerate(labels) if label != IGNORE) + 1
    start = end
    while start > 0 and labels[start - 1] != IGNORE:
        start -= 1
    answer = input_ids[start:end]
    return input_ids[:start], answer[:-1] if answer and answer[-1] == eos_id else answer


def prompts_and_answers(examples: Examples, eos_id: int) -> tuple[list[tuple[list[int], list[int]]], int]:
    """Each example's (prompt, answer) token ids, and how many tokens to generate to judge every answer."""
    pairs = [split_prompt_answer(row["input_ids"], row["labels"], eos_id) for row in examples.dataset]
    # +2: an output that has not stopped by then is longer than every answer, so it cannot match by truncation
    return pairs, max(len(answer) for _, answer in pairs) + 2


def token_loss(model: PreTrainedModel, examples: Examples, pad_id: int, micro_batch_size: int = 8) -> float:
    """Mean loss per label token over all examples."""
    loader = build_loader(examples.dataset, "none", micro_batch_size, 0, pad_id, seed=0, shuffle=False)
    total, count = 0.0, 0
    with torch.no_grad():
        for batch in loader:
            loss_sum, n = token_loss_sum(model, {k: v.to(model.device) for k, v in batch.items()})
            total, count = total + loss_sum.item(), count + n
    return total / max(count, 1)


def exact_match(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, examples: Examples,
                max_new_tokens: int | None = None) -> tuple[float, list[dict[str, str]]]:
    """Share of examples whose greedy completion equals the answer; and every (prompt, answer, output)."""
    pairs, budget = prompts_and_answers(examples, tokenizer.eos_token_id)
    budget = max_new_tokens or budget
    outputs = generate_batch(model, tokenizer, [prompt for prompt, _ in pairs], budget)
    samples = [{"prompt": tokenizer.decode(prompt, skip_special_tokens=True),
                "answer": tokenizer.decode(answer, skip_special_tokens=True).strip(),
                "output": tokenizer.decode(output, skip_special_tokens=True).strip()}
               for (prompt, answer), output in zip(pairs, outputs, strict=True)]
    return sum(s["answer"] == s["output"] for s in samples) / len(samples), samples


def evaluate(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, data_path: str, seq_len: int = 2048,
             data: DataConfig | None = None, generate: bool = True) -> EvalResult:
    """Loss and perplexity on `data_path`; exact match too when its rows have answers and `generate` is on."""
    examples = load_examples(data_path, tokenizer, seq_len, data, key="--data")
    model.eval()
    loss = token_loss(model, examples, tokenizer.pad_token_id)
    match, samples = None, []
    if generate and examples.format != "text" and math.isfinite(loss):  # a broken model's outputs mean nothing
        match, samples = exact_match(model, tokenizer, examples)
    return EvalResult(loss, math.exp(min(loss, 700)), match, len(examples.dataset), samples[:3])
