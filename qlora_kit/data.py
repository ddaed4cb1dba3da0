"""Training data, minimal for now: a JSONL file of `{"text"}` or `{"prompt", "completion"}` rows.

Each row becomes `input_ids` and `labels`; labels are -100 (ignored by the loss) on the prompt, so the model
learns the completion only. EOS is appended to every completion and trained on, so the model learns to stop.
Batches are right-padded; padding is masked out of attention and of the loss.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from transformers import PreTrainedTokenizerBase

from qlora_kit.errors import UserError

IGNORE = -100


def load_examples(path: str | Path, tokenizer: PreTrainedTokenizerBase, seq_len: int) -> list[dict[str, list[int]]]:
    """Tokenize every row of a JSONL file; errors name the file and line."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"'data.path': file not found: {path}")
    examples = []
    with path.open() as f:
        for line_no, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise UserError(f"{path}:{line_no}: invalid JSON: {e.msg}") from None
            examples.append(_tokenize(row, tokenizer, seq_len, f"{path}:{line_no}"))
    if not examples:
        raise UserError(f"'data.path': {path} holds no examples")
    return examples


def _tokenize(row: object, tokenizer: PreTrainedTokenizerBase, seq_len: int, where: str) -> dict[str, list[int]]:
    eos = [tokenizer.eos_token_id]
    if isinstance(row, dict) and isinstance(row.get("prompt"), str) and isinstance(row.get("completion"), str):
        prompt = tokenizer(row["prompt"])["input_ids"]
        completion = tokenizer(row["completion"], add_special_tokens=False)["input_ids"] + eos
        ids, labels = prompt + completion, [IGNORE] * len(prompt) + completion
    elif isinstance(row, dict) and isinstance(row.get("text"), str):
        ids = tokenizer(row["text"])["input_ids"] + eos
        labels = list(ids)
    else:
        raise UserError(f"{where}: expected a JSON object with a 'text' string or 'prompt' and 'completion' strings")
    return {"input_ids": ids[:seq_len], "labels": labels[:seq_len]}


def collate(examples: list[dict[str, list[int]]], pad_id: int) -> dict[str, torch.Tensor]:
    """Right-pad a micro-batch to its longest example."""
    width = max(len(e["input_ids"]) for e in examples)
    batch = {
        "input_ids": torch.full((len(examples), width), pad_id, dtype=torch.long),
        "labels": torch.full((len(examples), width), IGNORE, dtype=torch.long),
        "attention_mask": torch.zeros((len(examples), width), dtype=torch.long),
    }
    for i, e in enumerate(examples):
        n = len(e["input_ids"])
        batch["input_ids"][i, :n] = torch.tensor(e["input_ids"])
        batch["labels"][i, :n] = torch.tensor(e["labels"])
        batch["attention_mask"][i, :n] = 1
    return batch
