"""Where training rows come from: data files (or a hub dataset), read row by row, each with its `file:line`.

Our own small readers rather than `datasets`' JSON/CSV builders, because every row must keep its `file:line`
for error messages: pyarrow's JSON reader names a block, not a line, and refuses a wrongly typed field without
saying where. Each reader yields `(where, row, problem)`: a problem confined to one row (malformed JSON, not
UTF-8, a CSV line with the wrong number of fields) is that row's, so `data.skip_bad_rows` can skip it; a
problem with the whole file (unreadable, binary, a broken JSON array) raises `UserError`.
"""

from __future__ import annotations

import csv
import hashlib
import json
import re
import sys
from bisect import bisect_left
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from qlora_kit.errors import UserError
from qlora_kit.files import sha256_file

SUFFIXES = (".jsonl", ".json", ".csv", ".parquet")
Row = tuple[str, Any, str | None]  # (where, row, problem)


def data_sources(path: str, allow_network: bool, key: str) -> list[str]:
    """The files `path` names (a folder's, sorted), each checked to be readable; or a hub name."""
    local = Path(path).expanduser()
    if local.is_dir():
        files = sorted(str(p) for p in local.iterdir() if p.suffix in SUFFIXES and p.is_file())
        if not files:
            raise UserError(f"'{key}': folder {local} holds no {', '.join(SUFFIXES)} files")
    elif local.is_file():
        if local.suffix not in SUFFIXES:
            raise UserError(f"'{key}': {local} is not a {', '.join(SUFFIXES)} file")
        files = [str(local)]
    elif allow_network and "/" in path and not local.suffix:
        return [path]
    else:
        hint = "; a datasets hub name needs allow_network: true" if "/" in path and not local.suffix else ""
        raise UserError(f"'{key}': not found: {path}{hint}")
    for file in files:
        _check_readable(Path(file))
    return files


def _check_readable(path: Path) -> None:
    try:
        with path.open("rb") as f:
            head = f.read(8192)
    except OSError as e:
        raise UserError(f"{path}: cannot read: {e.strerror}") from None
    if path.suffix == ".parquet":
        if head[:4] != b"PAR1":
            raise UserError(f"{path}: not a Parquet file (no PAR1 header)")
    elif b"\0" in head:
        line = head.count(b"\n", 0, head.index(b"\0")) + 1
        raise UserError(f"{path}:{line}: binary data, not a {path.suffix} text file")


def fingerprint(path: str, allow_network: bool = False) -> str:
    """sha256 over the names and contents of `data.path`'s files (a hub dataset: its name), so a resumed run can
    tell whether it trains on the data its checkpoint was trained on. Content, not modification times: copying
    or touching the files changes nothing."""
    digest = hashlib.sha256()
    for source in data_sources(path, allow_network, "data.path"):
        digest.update(Path(source).name.encode() + b"\0")
        if Path(source).is_file():
            digest.update(sha256_file(Path(source)).encode())
    return digest.hexdigest()


def stamp(source: str) -> tuple[int, int]:
    """Size and modification time: part of the cache key, so an edited file is read again."""
    if not Path(source).is_file():
        return (0, 0)  # a hub dataset: `datasets` keeps its own cache
    stat = Path(source).stat()
    return (stat.st_size, stat.st_mtime_ns)


def read_rows(source: str) -> Iterator[Row]:
    """(where, row, problem) for each row of one source; file-level problems raise `UserError`."""
    suffix = Path(source).suffix
    if suffix == ".jsonl" or (suffix == ".json" and not _is_json_array(Path(source))):
        return _jsonl_rows(Path(source))
    readers = {".json": _json_array_rows, ".csv": _csv_rows, ".parquet": _parquet_rows}
    return readers[suffix](Path(source)) if suffix in readers else _hub_rows(source)


def _jsonl_rows(path: Path) -> Iterator[Row]:
    with path.open("rb") as f:
        for n, raw in enumerate(f, 1):
            try:
                line = raw.decode("utf-8-sig").rstrip("\r\n")  # -sig: a leading byte-order mark is no error
            except UnicodeDecodeError:
                yield f"{path}:{n}", None, "not UTF-8 text"
                continue
            if not line.strip():
                continue
            try:
                row, problem = json.loads(line), None
            except json.JSONDecodeError as e:
                row, problem = None, f"malformed JSON: {e.msg} (column {e.colno})"
            except RecursionError:
                row, problem = None, "JSON nested too deeply to read"
            yield f"{path}:{n}", row, problem


def _is_json_array(path: Path) -> bool:
    """`.json` files are often JSON Lines in disguise; an array starts with `[`."""
    with path.open("rb") as f:
        return f.read(4096).removeprefix(b"\xef\xbb\xbf").lstrip()[:1] == b"["


def _json_array_rows(path: Path) -> Iterator[Row]:
    """Items of a top-level JSON array, decoded one at a time so each keeps the line it starts on."""
    text = _read_text(path)
    newlines = [m.start() for m in re.finditer("\n", text)]
    decoder, space = json.JSONDecoder(), re.compile(r"\s*")
    pos = space.match(text, text.index("[") + 1).end()
    while not text.startswith("]", pos):
        try:
            row, end = decoder.raw_decode(text, pos)
        except json.JSONDecodeError as e:
            raise UserError(f"{path}:{e.lineno}: malformed JSON: {e.msg} (column {e.colno})") from None
        except RecursionError:
            raise UserError(f"{path}:{bisect_left(newlines, pos) + 1}: JSON nested too deeply to read") from None
        yield f"{path}:{bisect_left(newlines, pos) + 1}", row, None
        pos = space.match(text, end).end()
        if text.startswith(",", pos):
            pos = space.match(text, pos + 1).end()
        elif not text.startswith("]", pos):
            raise UserError(f"{path}:{bisect_left(newlines, pos) + 1}: malformed JSON: expected ',' or ']'")


def _read_text(path: Path) -> str:
    data = path.read_bytes()
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        line = data.count(b"\n", 0, e.start) + 1
        raise UserError(f"{path}:{line}: not UTF-8 text") from None


def _csv_rows(path: Path) -> Iterator[Row]:
    """Rows of a CSV file with a header line; `line_num` stays right when quoted fields hold newlines."""
    csv.field_size_limit(sys.maxsize)  # training texts often pass csv's 128 KiB default
    with path.open(newline="", encoding="utf-8-sig") as f:  # -sig: spreadsheets often write a byte-order mark
        reader = csv.DictReader(f)
        try:
            for row in reader:
                where = f"{path}:{reader.line_num}"
                if None in row:
                    yield where, None, f"more fields than the header's {len(reader.fieldnames)}"
                elif None in row.values():
                    yield where, None, f"fewer fields than the header's {len(reader.fieldnames)}"
                else:
                    yield where, row, None
        except (csv.Error, UnicodeDecodeError) as e:
            problem = "not UTF-8 text" if isinstance(e, UnicodeDecodeError) else f"unreadable CSV: {e}"
            raise UserError(f"{path}:{reader.line_num + 1}: {problem}") from None


def _parquet_rows(path: Path) -> Iterator[Row]:
    import pyarrow as pa
    import pyarrow.parquet as pq

    n = 0
    try:
        for batch in pq.ParquetFile(path).iter_batches():
            for row in batch.to_pylist():
                n += 1
                yield f"{path}: row {n}", row, None
    except (pa.ArrowException, OSError) as e:
        raise UserError(f"{path}: row {n + 1}: unreadable Parquet data: {e}") from None


def _hub_rows(name: str) -> Iterator[Row]:
    from datasets import load_dataset

    for n, row in enumerate(load_dataset(name, split="train"), 1):
        yield f"{name}: row {n}", row, None
