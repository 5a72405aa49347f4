"""Rows out of raw task files: each supported format (JSON Lines, JSON, CSV, Parquet) in any common encoding,
one `(source, row, problem)` at a time, where a row that cannot be read carries its problem instead."""

from __future__ import annotations

import csv
import io
import itertools
import json
import re
from collections.abc import Generator, Iterator
from pathlib import Path
from typing import Any

import pyarrow.parquet as pq

ROW_KEYS = {"messages", "instruction", "output", "prompt", "completion"}
MAX_ROW_CHARS = 1_000_000
CSV_DELIMITERS = ",;\t|"
SURROGATE = re.compile("[\ud800-\udfff]")
csv.field_size_limit(max(csv.field_size_limit(), MAX_ROW_CHARS))
Rows = Iterator[tuple[str, Any, str | None]]


class RawDataError(ValueError):
    """A raw file that cannot be read at all, or a task without any usable row."""


def too_long(size: int) -> str:
    return f"row has {size:,} characters, more than the {MAX_ROW_CHARS:,} limit"


def _utf16_codec(data: bytes) -> str | None:
    """The UTF-16 codec of `data`: by its BOM, or by NUL bytes in every other position (mostly-ASCII text)."""
    if data.startswith((b"\xff\xfe", b"\xfe\xff")):
        return "utf-16"
    sample = data[:4096]
    even, odd = sample[0::2].count(0), sample[1::2].count(0)
    if odd > len(sample) * 0.15 and even * 10 < odd:
        return "utf-16-le"
    if even > len(sample) * 0.15 and odd * 10 < even:
        return "utf-16-be"
    return None


def _decode(data: bytes) -> str:
    """Text of a file: UTF-8 (BOM optional) or UTF-16; bad bytes and lone surrogates kept, for the row checks."""
    codec = _utf16_codec(data)
    if codec:
        return data[: len(data) // 2 * 2].decode(codec, errors="surrogatepass")
    return data.decode("utf-8-sig", errors="surrogateescape")


def _json_problem(exc: Exception, text: str) -> str:
    """Why `text` is not JSON, in words."""
    if isinstance(exc, RecursionError):
        return "not valid JSON: nested too deeply to read"
    if not isinstance(exc, json.JSONDecodeError):
        return f"not valid JSON ({exc})"
    where = f"line {exc.lineno}, column {exc.colno}" if "\n" in text.rstrip() else f"column {exc.colno}"
    reason = f"not valid JSON ({exc.msg.removesuffix(' at')} at {where})"
    if exc.msg.startswith("Unterminated string") or exc.pos >= len(text.rstrip()):
        reason += "; the text ends before the JSON is complete (cut off?)"
    if "\x00" in text:
        reason += "; it contains NUL bytes"
    elif SURROGATE.search(text):
        reason += "; it contains bytes that are not valid UTF-8"
    return reason


def _jsonl_rows(text: str) -> Rows:
    # Only "\n" ends a line: str.splitlines would also split on U+2028 and others, which JSON strings may hold.
    for number, line in enumerate(text.split("\n"), start=1):
        line = line.lstrip("\ufeff")
        if not line.strip():
            continue
        if len(line) > MAX_ROW_CHARS:
            yield f"line {number}", line, too_long(len(line))
            continue
        try:
            row, problem = json.loads(line), None
        except (ValueError, RecursionError) as exc:
            row, problem = line, _json_problem(exc, line)
        yield f"line {number}", row, problem


def _json_lines_in_json(text: str) -> bool:
    """Whether a `.json` file that is not one JSON value is JSON Lines: its first two lines each start an object on
    a line of its own (a pretty-printed array or object starts with a bare `[` or `{` line)."""
    filled = (stripped for line in io.StringIO(text.lstrip("\ufeff")) if (stripped := line.strip()))
    first, second = [*itertools.islice(filled, 2), "", ""][:2]
    return first.startswith("{") and first != "{" and second.startswith("{")


def _json_rows(text: str) -> Rows:
    """Rows of a JSON array, of an object holding one array, or of JSON Lines in a `.json` file (whose broken lines
    are quarantined one by one, the first one too)."""
    try:
        data = json.loads(text)
    except json.JSONDecodeError as exc:
        if exc.msg != "Extra data" and not _json_lines_in_json(text):
            raise RawDataError(f"file is {_json_problem(exc, text)}") from None
        yield from _jsonl_rows(text)
        return
    except (ValueError, RecursionError) as exc:
        raise RawDataError(f"file is {_json_problem(exc, text)}") from None
    if isinstance(data, dict):
        lists = [value for value in data.values() if isinstance(value, list)]
        data = lists[0] if len(lists) == 1 and not ROW_KEYS & data.keys() else [data]
    for index, row in enumerate(data if isinstance(data, list) else [data], start=1):
        yield f"row {index}", row, None


def _strict_error(record: str, delimiter: str) -> str:
    """What a strict CSV reader says is wrong with `record` ('' when nothing is)."""
    if '"' not in record:
        return ""
    try:
        list(csv.reader(io.StringIO(record, newline=""), delimiter=delimiter, strict=True))
    except csv.Error as exc:
        return str(exc)
    return ""


def _csv_records(lines: list[str], first: int, header: list[str], delimiter: str) -> Generator[Any, None, int]:
    """Rows of lines[first:]. An unclosed quote that swallows the rest of the file quarantines only its
    own line; returns the index of the line to go on from (len(lines) when done)."""
    reader = csv.reader(iter(lines[first:]), delimiter=delimiter)
    while True:
        begin = first + reader.line_num
        try:
            fields = next(reader)
        except StopIteration:
            return len(lines)
        except csv.Error as exc:
            raw = "".join(lines[begin : first + reader.line_num])
            yield f"line {begin + 1}", raw, too_long(len(raw)) if len(raw) > MAX_ROW_CHARS else f"not valid CSV ({exc})"
            continue
        if not fields:
            continue
        end = first + reader.line_num
        raw = "".join(lines[begin:end])
        strict = _strict_error(raw, delimiter)  # once per record, for each of the quote problems below
        if end == len(lines) and end - begin > 1 and "unexpected end of data" in strict:
            problem = (f"an unclosed quote starting on line {begin + 1} swallows the rest of the file "
                       f"({end - begin} lines); only this line is quarantined, the later lines are read as rows")
            yield f"line {begin + 1}", lines[begin], problem
            return begin + 1
        if end - begin == 1 and "expected after" in strict:  # a quoted field going on after its closing quote
            yield f"line {begin + 1}", raw, (f"not valid CSV ({strict}): a quoted field ends at its closing quote; a "
                                             'quote inside a field is written twice ("")')
        elif len(fields) == len(header):
            yield f"line {begin + 1}", dict(zip(header, fields)), None
        else:
            yield f"line {begin + 1}", raw, _field_count_problem(len(fields), len(header), begin, end,
                                                                "unexpected end of data" in strict)


def _field_count_problem(count: int, expected: int, begin: int, end: int, unclosed: bool) -> str:
    """Why a record (lines[begin:end]) has `count` fields, not the header's `expected`, with the quote to blame."""
    found = (f"has {count - expected} more field(s) than the header" if count > expected
             else f"has fewer fields than the header ({count} of {expected})")
    if unclosed:
        return f"{found}: a quote on it is never closed"
    if end - begin > 1:
        return (f"{found}: a quote opened on line {begin + 1} closes only on line {end}, so lines {begin + 1}-{end} "
                "were read as one row")
    return found


def _csv_rows(text: str) -> Rows:
    """Rows of a CSV file; the delimiter is the most frequent of , ; tab | in the header line."""
    lines = io.StringIO(text, newline="").readlines()
    if not lines:
        return
    delimiter = max(CSV_DELIMITERS, key=lines[0].count)
    try:
        header = [name.strip() for name in next(csv.reader(lines[:1], delimiter=delimiter))]
    except csv.Error as exc:
        raise RawDataError(f"the CSV header line cannot be read ({exc})") from None
    start = 1
    while start < len(lines):
        start = yield from _csv_records(lines, start, header, delimiter)


def _parquet_rows(path: Path) -> Rows:
    try:
        rows = pq.read_table(path).to_pylist()
    except Exception as exc:  # pyarrow raises several types for broken files
        raise RawDataError(f"file not readable as Parquet ({str(exc).replace(str(path), path.name)})") from None
    for index, row in enumerate(rows, start=1):
        yield f"row {index}", row, None


def iter_file_rows(path: Path) -> Rows:
    """(location, raw row, problem or None) for every row of one file; RawDataError if it cannot be read."""
    if path.suffix == ".parquet":
        yield from _parquet_rows(path)
        return
    text = _decode(path.read_bytes())
    if not text.strip():
        return
    readers = {".jsonl": _jsonl_rows, ".json": _json_rows}
    yield from readers.get(path.suffix, _csv_rows)(text)
