"""One data row -> token ids and labels, per format, with loss only where the model should learn to write.

Formats (fields under their standard names; `data.py` maps the user's column names onto these):
- `prompt_completion`: `prompt`, `completion`.
- `alpaca`: `instruction`, optional `input`, `output`, rendered with the Stanford Alpaca prompt.
- `chat`: `messages`, a list of `{role, content}`, rendered with the tokenizer's chat template (or
  `data.chat_template`); loss on the assistant turns.
- `text`: `text`, continued pretraining; every token is trained on.

Labels are IGNORE (-100) where no loss is taken; `train_on_prompt` trains on every token instead. EOS is
appended to every completion and carries a label. Labels are built here from the row's structure, never by
comparing token ids with the pad id, so a pad token equal to EOS cannot mask EOS out of the loss (the common
bug that gives models which never stop).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any, NamedTuple

from jinja2 import TemplateError
from transformers import PreTrainedTokenizerBase

IGNORE = -100
FIELDS = {"prompt_completion": ("prompt", "completion"), "alpaca": ("instruction", "input", "output"),
          "chat": ("messages",), "text": ("text",)}

# Stanford Alpaca's two prompts (github.com/tatsu-lab/stanford_alpaca), so Alpaca-trained adapters meet the
# prompt they will be served with.
ALPACA_PROMPT = ("Below is an instruction that describes a task. Write a response that appropriately completes "
                 "the request.\n\n### Instruction:\n{instruction}\n\n### Response:\n")
ALPACA_PROMPT_WITH_INPUT = ("Below is an instruction that describes a task, paired with an input that provides "
                            "further context. Write a response that appropriately completes the request.\n\n"
                            "### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:\n")
_GENERATION_TAG = re.compile(r"{%-?\s*generation\s*-?%}")


@dataclass(frozen=True)
class EncodingRules:
    """How rows become tokens. It is part of the tokenisation cache key: change a field and data is re-tokenised."""

    format: str
    seq_len: int
    too_long: str = "truncate"  # truncate | drop | error
    train_on_prompt: bool = False
    chat_template: str | None = None  # the template itself, for `chat` data


class Encoded(NamedTuple):
    ids: list[int]
    labels: list[int]
    prompt_len: int  # tokens before the first trained token: what truncation cuts first


class RowProblem(Exception):
    """A row that cannot be encoded; becomes a `file:line: problem` message, or a skipped row."""


def encode_batch(batch: dict[str, list], tokenizer: PreTrainedTokenizerBase,
                 encoding: EncodingRules) -> dict[str, list]:
    """`datasets.map(batched=True)` function: input_ids, labels, length, and each row's fate and problem.

    A row arrives with `_problem` set when reading or checking it failed; it stays bad. Problems are returned
    as data, not raised, so that with `num_proc` workers each one reaches the parent process intact and
    `skip_bad_rows` can count them. Fates: kept, truncated, dropped (too long), bad.
    """
    out: dict[str, list] = {"input_ids": [], "labels": [], "length": [], "fate": [], "problem": []}
    for i, problem in enumerate(batch["_problem"]):
        ids, labels, fate = [], [], "bad"
        if not problem:
            row = {name: batch[name][i] for name in FIELDS[encoding.format]}
            try:
                row, cut = bound_row(row, encoding)
                if cut and encoding.too_long == "drop":
                    fate = "dropped"
                else:
                    ids, labels, fate = fit_to_length(encode_row(row, tokenizer, encoding), encoding,
                                                      tokenizer.bos_token_id)
            except RowProblem as e:
                problem = str(e)
        for key, value in zip(out, (ids, labels, len(ids), fate, problem), strict=True):
            out[key].append(value)
    return out


# No tokenizer averages this many characters per token over a long text, so a field cut to seq_len times this many
# characters still yields more tokens than an example keeps: cutting before tokenising bounds the work and memory
# a row costs (a 20 MB line would otherwise be tokenised whole) without changing what truncation keeps.
MAX_CHARS_PER_TOKEN = 32


def bound_row(row: dict[str, Any], encoding: EncodingRules) -> tuple[dict[str, Any], bool]:
    """Cut each text field of `row` to `seq_len * MAX_CHARS_PER_TOKEN` characters, on the side truncation would
    cut (prompts lose their start, completions and texts their end); and whether anything was cut (the example is
    then certainly longer than seq_len). `data.too_long: error` refuses such a row here, before tokenising it."""
    limit = encoding.seq_len * MAX_CHARS_PER_TOKEN
    keep_end = {"prompt", "instruction", "input"}
    cut = False

    def bounded(text: str, name: str) -> str:
        nonlocal cut
        if text is None or len(text) <= limit:
            return text
        cut = True
        return text[-limit:] if name in keep_end else text[:limit]

    if encoding.format == "chat":
        first_answer = next((i for i, m in enumerate(row["messages"]) if m["role"] == "assistant"), 0)
        messages = [{**m, "content": bounded(m["content"], "prompt" if i < first_answer else "completion")}
                    for i, m in enumerate(row["messages"])]
        row = {"messages": messages}
    else:
        row = {name: bounded(value, name) for name, value in row.items()}
    if cut and encoding.too_long == "error":
        raise RowProblem(f"example is far longer than train.seq_len ({encoding.seq_len} tokens); set data.too_long "
                         "to truncate or drop")
    return row, cut


def encode_row(row: dict[str, Any], tokenizer: PreTrainedTokenizerBase, encoding: EncodingRules) -> Encoded:
    fmt = encoding.format
    if fmt == "text":
        ids = tokenizer(row["text"])["input_ids"] + [tokenizer.eos_token_id]
        return Encoded(ids, list(ids), 0)
    if fmt == "chat":
        return encode_chat(row["messages"], tokenizer, encoding.chat_template, encoding.train_on_prompt)
    if fmt == "alpaca":
        template = ALPACA_PROMPT_WITH_INPUT if row.get("input") else ALPACA_PROMPT
        row = {"prompt": template.format(**row), "completion": row["output"]}
    return encode_prompt_completion(row["prompt"], row["completion"], tokenizer, encoding.train_on_prompt)


def encode_prompt_completion(prompt: str, completion: str, tokenizer: PreTrainedTokenizerBase,
                             train_on_prompt: bool = False) -> Encoded:
    """Prompt and completion tokenised apart, so the boundary between them is exact."""
    prompt_ids = tokenizer(prompt)["input_ids"]
    completion_ids = tokenizer(completion, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
    masked = list(prompt_ids) if train_on_prompt else [IGNORE] * len(prompt_ids)
    return Encoded(prompt_ids + completion_ids, masked + completion_ids, len(prompt_ids))


def encode_chat(messages: list[dict[str, str]], tokenizer: PreTrainedTokenizerBase, template: str,
                train_on_prompt: bool = False) -> Encoded:
    """A conversation through the chat template; loss on each assistant turn up to and including its EOS.

    Finding the assistant turns works with any template:
    - if it marks them with `{% generation %}`, transformers' `return_assistant_tokens_mask` gives them;
    - otherwise the conversation is rendered incrementally: assistant turn i spans, in characters, from the end
      of `render(messages[:i], add_generation_prompt=True)` to the end of `render(messages[:i + 1])`. The whole
      conversation is tokenised once and each token is labelled by its character offsets, so tokens are exactly
      those of the full rendering. This needs a template whose renderings of earlier turns are prefixes of
      later ones; one that is not (e.g. it drops earlier reasoning) is a clear error asking for generation tags.
    """
    if messages and messages[0]["role"] == "assistant":
        raise RowProblem("the first message is from the assistant: a conversation starts with a user or system "
                         "message")
    try:
        if _GENERATION_TAG.search(template):
            ids, ranges = _generation_ranges(messages, tokenizer, template)
        else:
            ids, ranges = _incremental_ranges(messages, tokenizer, template)
    except (TemplateError, ValueError) as e:  # transformers raises ValueError for conversations it refuses
        raise RowProblem(f"the chat template failed on this conversation: {e}") from None
    if not ranges:
        raise RowProblem("no assistant message to train on")
    ids, ranges = _end_turns_at_eos(ids, ranges, tokenizer.eos_token_id)
    labels = list(ids) if train_on_prompt else [IGNORE] * len(ids)
    for a, b in ranges:
        labels[a:b] = ids[a:b]
    return Encoded(ids, labels, ranges[0][0])


def _end_turns_at_eos(ids: list[int], ranges: list[tuple[int, int]],
                      eos: int) -> tuple[list[int], list[tuple[int, int]]]:
    """Each assistant turn's token range ends at its first EOS, and the last turn has one.

    What a template puts after EOS inside a turn (a newline before the next turn) is not trained on: the model
    stops at EOS and never writes it. A template without EOS in its turns gets EOS appended to the last one,
    so the model still learns to stop.
    """
    ranges = [(a, a + ids[a:b].index(eos) + 1) if eos in ids[a:b] else (a, b) for a, b in ranges]
    last_start, last_end = ranges[-1]
    if eos not in ids[last_start:last_end]:
        ids = ids[:last_end] + [eos] + ids[last_end:]
        ranges[-1] = (last_start, last_end + 1)
    return ids, ranges


def _generation_ranges(messages, tokenizer, template) -> tuple[list[int], list[tuple[int, int]]]:
    out = tokenizer.apply_chat_template(messages, chat_template=template, tokenize=True, return_dict=True,
                                        return_assistant_tokens_mask=True)
    mask = list(out["assistant_masks"])
    starts = [i for i, m in enumerate(mask) if m and (i == 0 or not mask[i - 1])]
    ends = [i + 1 for i, m in enumerate(mask) if m and (i + 1 == len(mask) or not mask[i + 1])]
    return list(out["input_ids"]), list(zip(starts, ends, strict=True))


def _incremental_ranges(messages, tokenizer, template) -> tuple[list[int], list[tuple[int, int]]]:
    def render(upto: int, generation_prompt: bool) -> str:
        return tokenizer.apply_chat_template(messages[:upto], chat_template=template, tokenize=False,
                                             add_generation_prompt=generation_prompt)

    full = render(len(messages), False)
    spans = []
    for i, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        start, end = render(i, True), render(i + 1, False)
        if not (full.startswith(start) and full.startswith(end) and len(start) <= len(end)):
            raise RowProblem("the chat template renders earlier turns differently once later turns follow, so "
                             "assistant turns cannot be located; give data.chat_template with {% generation %} tags")
        spans.append((len(start), len(end)))
    encoded = tokenizer(full, add_special_tokens=False, return_offsets_mapping=True)
    offsets = encoded["offset_mapping"]
    ranges = []
    for s, e in spans:
        inside = [k for k, (a, b) in enumerate(offsets) if s <= a and b <= e and b > a]
        if inside:
            ranges.append((inside[0], inside[-1] + 1))
    return list(encoded["input_ids"]), ranges


def fit_to_length(encoded: Encoded, encoding: EncodingRules, bos_id: int | None) -> tuple[list[int], list[int], str]:
    """Apply `data.too_long` to an example longer than `seq_len`: (ids, labels, fate).

    `truncate` cuts the prompt first, from its start (keeping a leading BOS), because the words right before
    the answer matter most and the completion is what the model learns; if the completion alone is too long,
    its end is cut.
    """
    ids, labels, prompt_len = encoded
    seq_len = encoding.seq_len
    if len(ids) <= seq_len:
        return ids, labels, "kept"
    if encoding.too_long == "drop":
        return [], [], "dropped"
    if encoding.too_long == "error":
        raise RowProblem(f"example is {len(ids)} tokens, longer than train.seq_len ({seq_len}); set "
                         "data.too_long to truncate or drop")
    keep_head = 1 if ids[0] == bos_id and prompt_len > 1 else 0
    cut = min(len(ids) - seq_len, prompt_len - keep_head)
    ids = ids[:keep_head] + ids[keep_head + cut:]
    labels = labels[:keep_head] + labels[keep_head + cut:]
    return ids[:seq_len], labels[:seq_len], "truncated"
