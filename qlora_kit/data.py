"""Training data: files -> checked rows -> tokenised examples, cached; every bad row is found before training.

`data.path` is a `.jsonl`, `.json`, `.csv` or `.parquet` file, a folder of them, or (with `allow_network`) a
`datasets` hub name, read row by row with its `file:line` by `sources.py`. The checked rows go to `datasets`
(`Dataset.from_generator`), which stores them as Arrow under the qlora-kit cache and tokenises them with `map`
in `num_proc` processes. Both steps are cached by fingerprint: the file's size and modification time, the
format and column names, the tokenizer and the `EncodingRules`; change any of them and the data is read or
tokenised again, leave them and a second run loads in well under a second.

Each row is checked (valid JSON, fields present, of the right type, not empty) and then encoded (chat
template, length); the first problem is raised as one line, `file:line: problem`, or, with
`data.skip_bad_rows`, bad rows are counted and left out.
"""

from __future__ import annotations

import hashlib
import math
import os
import sys
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, replace
from functools import partial
from pathlib import Path
from typing import Any

import datasets
from datasets import Dataset, Features, List, Value
from datasets.exceptions import DatasetGenerationError
from datasets.fingerprint import Hasher
from transformers import PreTrainedTokenizerBase

from qlora_kit.config import DataConfig
from qlora_kit.errors import UserError
from qlora_kit.formats import FIELDS, EncodingRules, encode_batch
from qlora_kit.model_paths import cache_root
from qlora_kit.sources import data_sources, read_rows, stamp

_TEXT = Value("string")
FEATURES = {"prompt_completion": {"prompt": _TEXT, "completion": _TEXT},
            "alpaca": {"instruction": _TEXT, "input": _TEXT, "output": _TEXT},
            "chat": {"messages": List({"role": _TEXT, "content": _TEXT})}, "text": {"text": _TEXT}}
# Tried in this order, so a row with `messages` and `text` (common in chat dumps) is read as chat.
_DETECTION_ORDER = ("chat", "alpaca", "prompt_completion", "text")
_OPTIONAL = {"input"}  # alpaca's input may be missing, null or empty
# The code that reads, checks and encodes rows is part of every cache key: `datasets` hashes a function by its
# name, not its code, so without this a new qlora-kit release would reuse tokenisations made by an older one.
_CODE_VERSION = hashlib.sha256(b"".join(Path(__file__).with_name(name).read_bytes()
                                        for name in ("data.py", "formats.py", "sources.py"))).hexdigest()
_ROWS_PER_PROCESS = 10_000  # starting a tokenising process costs ~1 s: small files are tokenised in-process


@dataclass
class Examples:
    dataset: Dataset  # columns input_ids, labels, length
    format: str
    source: str
    truncated: int = 0  # cut to train.seq_len
    dropped: int = 0  # longer than train.seq_len, with data.too_long: drop
    skipped: int = 0  # bad rows left out, with data.skip_bad_rows

    def summary(self) -> str:
        counts = [f"{n} {what}" for n, what in ((self.truncated, "truncated to train.seq_len"),
                                                (self.dropped, "dropped as longer than train.seq_len"),
                                                (self.skipped, "bad rows skipped")) if n]
        return f"{len(self.dataset)} examples ({self.format}) from {self.source}" + "".join(f"; {c}" for c in counts)


def load_data(cfg: DataConfig, tokenizer: PreTrainedTokenizerBase, seq_len: int, seed: int,
              allow_network: bool = False, cache_dir: Path | None = None) -> tuple[Examples, Examples | None]:
    """Training examples and, from `data.eval_path` or `data.eval_fraction`, evaluation examples."""
    if not cfg.path:
        raise UserError("'data.path' is not set: point it to a .jsonl, .json, .csv or .parquet file or a folder")
    train = load_examples(cfg.path, tokenizer, seq_len, cfg, allow_network, cache_dir)
    if cfg.eval_path:
        same_format = replace(cfg, format=train.format)
        return train, load_examples(cfg.eval_path, tokenizer, seq_len, same_format, allow_network, cache_dir,
                                    key="data.eval_path")
    if not cfg.eval_fraction:
        return train, None
    n = len(train.dataset)
    if n - math.ceil(n * cfg.eval_fraction) < 1:
        raise UserError(f"'data.eval_fraction': {cfg.eval_fraction} of {n} examples leaves none to train on")
    split = train.dataset.train_test_split(test_size=cfg.eval_fraction, seed=seed)
    held_out = Examples(split["test"], train.format, f"{train.source} (data.eval_fraction)")
    return replace(train, dataset=split["train"]), held_out


def load_examples(path: str | Path, tokenizer: PreTrainedTokenizerBase, seq_len: int, cfg: DataConfig | None = None,
                  allow_network: bool = False, cache_dir: Path | None = None, key: str = "data.path") -> Examples:
    """Read, check and tokenise one `data.path`; any bad row raises `UserError` unless `skip_bad_rows`."""
    with _progress_bars(sys.stderr.isatty()):
        return _load_examples(str(path), tokenizer, seq_len, cfg or DataConfig(), allow_network, cache_dir, key)


@contextmanager
def _progress_bars(on: bool) -> Iterator[None]:
    """`datasets`' progress bars only on a terminal, like the training bar: logs and error output stay clean."""
    was_on = not datasets.are_progress_bars_disabled()
    (datasets.enable_progress_bars if on else datasets.disable_progress_bars)()
    try:
        yield
    finally:
        (datasets.enable_progress_bars if was_on else datasets.disable_progress_bars)()


def _load_examples(path: str, tokenizer: PreTrainedTokenizerBase, seq_len: int, cfg: DataConfig,
                   allow_network: bool, cache_dir: Path | None, key: str) -> Examples:
    sources = data_sources(path, allow_network, key)
    where, first = _first_row(sources, cfg.skip_bad_rows, f"'{key}': {path}")
    fmt = detect_format(first, cfg, where)
    if tokenizer.eos_token_id is None:
        raise UserError("the model's tokenizer has no EOS token, so completions could not teach the model to stop")
    encoding = EncodingRules(fmt, seq_len, cfg.too_long, cfg.train_on_prompt, chat_template(fmt, cfg, tokenizer))
    rows = _rows_dataset(sources, fmt, column_names(cfg), str(cache_dir or cache_root() / "datasets"))
    num_proc = cfg.num_proc or min(os.cpu_count() or 1, len(rows) // _ROWS_PER_PROCESS)
    encoded = rows.map(partial(encode_batch, tokenizer=tokenizer, encoding=encoding), batched=True,
                       num_proc=num_proc if num_proc > 1 else None, remove_columns=list(FEATURES[fmt]),
                       desc=f"tokenising {path}",
                       new_fingerprint=Hasher.hash([rows._fingerprint, tokenizer, encoding, _CODE_VERSION]))
    fates = Counter(encoded["fate"])
    if fates["bad"] and not cfg.skip_bad_rows:
        _raise_first_problem(encoded, fates["bad"])
    kept = encoded.filter(_usable, input_columns="fate").select_columns(["input_ids", "labels", "length"])
    if len(kept) == 0:
        raise UserError(f"'{key}': no examples left in {path} ({fates['dropped']} longer than train.seq_len, "
                        f"{fates['bad']} bad rows)")
    return Examples(kept, fmt, path, fates["truncated"], fates["dropped"], fates["bad"])


def _rows_dataset(sources: list[str], fmt: str, columns: dict[str, str], cache_dir: str) -> Dataset:
    """The checked rows as an Arrow dataset in `cache_dir`, re-read only when a file or setting changed."""
    features = Features({**FEATURES[fmt], "_where": _TEXT, "_problem": _TEXT})
    kwargs = {"sources": sources, "stamps": [stamp(s) for s in sources], "fmt": fmt, "columns": columns,
              "code": _CODE_VERSION}
    try:
        return Dataset.from_generator(checked_rows, features=features, gen_kwargs=kwargs, cache_dir=cache_dir)
    except DatasetGenerationError as e:  # a reader's UserError, raised inside the datasets builder
        if isinstance(e.__cause__, UserError):
            raise e.__cause__ from None
        raise


def _usable(fate: str) -> bool:
    return fate in ("kept", "truncated")


def _raise_first_problem(encoded: Dataset, bad: int) -> None:
    index = next(i for i, fate in enumerate(encoded["fate"]) if fate == "bad")
    row = encoded[index]
    more = f"{bad} bad rows in all" if bad > 1 else "the only bad row"
    raise UserError(f"{row['_where']}: {row['problem']} ({more}; data.skip_bad_rows: true skips them)")


# ------------------------------------------------------------------------------------------ checking


def column_names(cfg: DataConfig) -> dict[str, str]:
    """Standard field name -> the column that holds it in the user's data."""
    return {"prompt": cfg.prompt_column, "completion": cfg.completion_column, "instruction": cfg.instruction_column,
            "input": cfg.input_column, "output": cfg.output_column, "messages": cfg.messages_column,
            "text": cfg.text_column}


def _first_row(sources: list[str], skip_bad_rows: bool, what: str) -> tuple[str, Any]:
    for source in sources:
        for where, row, problem in read_rows(source):
            if problem is None:
                return where, row
            if not skip_bad_rows:
                raise UserError(f"{where}: {problem}")
    raise UserError(f"{what} holds no examples")


def detect_format(row: Any, cfg: DataConfig, where: str) -> str:
    """`data.format`, or the first format whose required columns the first row has."""
    if cfg.format != "auto":
        return cfg.format
    columns, keys = column_names(cfg), set(row) if isinstance(row, dict) else set()
    for fmt in _DETECTION_ORDER:
        if all(columns[name] in keys for name in FIELDS[fmt] if name not in _OPTIONAL):
            return fmt
    raise UserError(f"{where}: cannot tell the data format from the fields {sorted(keys)}; expected messages "
                    "(chat), instruction + output (alpaca), prompt + completion, or text; or set data.format "
                    "and the data.*_column keys")


def checked_rows(sources: list[str], stamps: list[tuple[int, int]], fmt: str, columns: dict[str, str],
                 code: str = "") -> Iterator[dict[str, Any]]:
    """Every row under the standard field names, with `_where` and `_problem` (None when fine).

    `datasets.Dataset.from_generator` runs this; `stamps` and `code` are unused here but are part of its cache key.
    """
    for source in sources:
        for where, row, problem in read_rows(source):
            fields = None
            if problem is None:
                fields, problem = check_fields(row, fmt, columns)
            yield {**(fields or dict.fromkeys(FEATURES[fmt])), "_where": where, "_problem": problem}


def check_fields(row: Any, fmt: str, columns: dict[str, str]) -> tuple[dict[str, Any] | None, str | None]:
    """(fields under standard names, None) for a good row, (None, problem) for a bad one."""
    if not isinstance(row, dict):
        return None, f"expected an object with named fields, got {_kind(row)}"
    fields = {}
    for name in FIELDS[fmt]:
        column, value = columns[name], row.get(columns[name])
        if name in _OPTIONAL and value in (None, ""):
            fields[name] = ""
            continue
        problem = _check_messages(value, column) if name == "messages" else _check_text(value, column)
        if problem:
            return None, problem
        fields[name] = [{"role": m["role"], "content": m["content"]} for m in value] if name == "messages" else value
    return fields, None


def _check_text(value: Any, column: str) -> str | None:
    if value is None:
        return f"missing field '{column}'"
    if not isinstance(value, str):
        return f"field '{column}' must be a string, got {_kind(value)}"
    return None if value.strip() else f"empty '{column}'"


def _check_messages(value: Any, column: str) -> str | None:
    if value is None:
        return f"missing field '{column}'"
    if not isinstance(value, list) or not value:
        return f"field '{column}' must be a non-empty list of messages, got {_kind(value)}"
    for k, message in enumerate(value):
        if not isinstance(message, dict):
            return f"'{column}' message {k} must be an object with 'role' and 'content', got {_kind(message)}"
        for key in ("role", "content"):
            if not isinstance(message.get(key), str):
                return f"'{column}' message {k}: '{key}' must be a string, got {_kind(message.get(key))}"
        if message["role"] == "assistant" and not message["content"].strip():
            return f"'{column}' message {k}: empty assistant 'content'"
    if not any(m["role"] == "assistant" for m in value):
        return f"'{column}' has no assistant message to train on"
    return None


def _kind(value: Any) -> str:
    kinds = {dict: "an object", list: "a list", str: "a string", bool: "true/false", int: "a number",
             float: "a number", type(None): "null"}
    return kinds.get(type(value), type(value).__name__)


def chat_template(fmt: str, cfg: DataConfig, tokenizer: PreTrainedTokenizerBase) -> str | None:
    """The Jinja template `chat` data is rendered with: `data.chat_template` (a template, or a file holding one)
    or else the tokenizer's own, which is what the model will be served with."""
    if fmt != "chat":
        return None
    if not cfg.chat_template:
        if not tokenizer.chat_template:
            raise UserError("'data.chat_template': the model's tokenizer has no chat template; set "
                            "data.chat_template to a Jinja template or a file holding one")
        return tokenizer.get_chat_template()
    if "{" in cfg.chat_template:
        return cfg.chat_template
    path = Path(cfg.chat_template).expanduser()
    if not path.is_file():
        raise UserError(f"'data.chat_template': neither a Jinja template nor a file: {cfg.chat_template}")
    return path.read_text()
