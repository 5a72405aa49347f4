"""Read raw task files in any supported format into canonical chat examples, quarantining bad rows.

Canonical example: ``{"id": str, "messages": [{"role", "content"}, ...], "source": "file:line N"}``.
Every row read ends up either as an example or as a quarantine entry with a reason, so
``rows_read == rows_valid + rows_quarantined`` always holds.
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import random
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from ftpipe.core.storage import UnsafePathError, atomic_dir, atomic_file, contained

SUPPORTED_SUFFIXES = (".jsonl", ".json", ".csv", ".parquet")
ROLES = ("system", "user", "assistant")
RAW_TEXT_LIMIT = 4096
MESSAGE_TYPE = pa.list_(pa.struct([("role", pa.string()), ("content", pa.string())]))
EXAMPLE_SCHEMA = pa.schema([("id", pa.string()), ("messages", MESSAGE_TYPE), ("source", pa.string())])


class RawDataError(ValueError):
    """A raw file that cannot be read at all, or a task without any usable row."""


class BadRow(ValueError):
    """A row that cannot become an example; the message is the quarantine reason."""


@dataclass(frozen=True)
class FormatSpec:
    """How rows map to messages: `format` as in task.yaml, `columns` the user's column mapping."""

    format: str = "auto"
    columns: dict[str, str] = field(default_factory=dict)
    system_prompt: str | None = None


@dataclass
class ReadResult:
    examples: list[dict[str, Any]] = field(default_factory=list)
    quarantine: list[dict[str, Any]] = field(default_factory=list)
    files: list[str] = field(default_factory=list)
    ignored_files: list[str] = field(default_factory=list)

    @property
    def rows_read(self) -> int:
        return len(self.examples) + len(self.quarantine)


def example_id(messages: list[dict[str, str]]) -> str:
    """A stable id: the hash of the conversation's exact content."""
    canonical = json.dumps(messages, ensure_ascii=False, separators=(",", ":"))
    return hashlib.sha256(canonical.encode("utf-8", "surrogatepass")).hexdigest()[:16]


def _text(value: Any, name: str) -> str:
    if value is None:
        raise BadRow(f"field '{name}' is missing")
    if not isinstance(value, str):
        raise BadRow(f"field '{name}' must be text, got {type(value).__name__}")
    if not value.strip():
        raise BadRow(f"field '{name}' is empty")
    if "\x00" in value:
        raise BadRow(f"field '{name}' contains NUL bytes")
    if any("\udc80" <= ch <= "\udcff" for ch in value):
        raise BadRow(f"field '{name}' contains bytes that are not valid UTF-8")
    return value


def _chat(raw: Any) -> list[dict[str, str]]:
    if not isinstance(raw, list) or not raw:
        raise BadRow("field 'messages' must be a non-empty list of {role, content}")
    messages = []
    for i, message in enumerate(raw):
        if not isinstance(message, dict):
            raise BadRow(f"messages[{i}] must be an object with 'role' and 'content'")
        role = message.get("role")
        if role not in ROLES:
            raise BadRow(f"messages[{i}].role is {role!r}; expected one of {', '.join(ROLES)}")
        messages.append({"role": role, "content": _text(message.get("content"), f"messages[{i}].content")})
    if messages[-1]["role"] != "assistant":
        raise BadRow("the conversation does not end with an assistant message")
    if not any(m["role"] == "user" for m in messages):
        raise BadRow("the conversation has no user message")
    return messages


def _pair(prompt: str, completion: str, system: str | None = None) -> list[dict[str, str]]:
    messages = [{"role": "system", "content": system}] if system else []
    return messages + [{"role": "user", "content": prompt}, {"role": "assistant", "content": completion}]


def _alpaca(row: dict[str, Any]) -> list[dict[str, str]]:
    instruction = _text(row.get("instruction"), "instruction")
    extra = row.get("input")
    if extra not in (None, "") and not isinstance(extra, str):
        raise BadRow(f"field 'input' must be text, got {type(extra).__name__}")
    prompt = f"{instruction}\n\n{extra}" if extra and extra.strip() else instruction
    return _pair(prompt, _text(row.get("output"), "output"))


def _mapped(row: dict[str, Any], columns: dict[str, str]) -> list[dict[str, str]]:
    system_column = columns.get("system")
    system = row.get(system_column) if system_column else None
    return _pair(
        _text(row.get(columns["prompt"]), columns["prompt"]),
        _text(row.get(columns["completion"]), columns["completion"]),
        system if isinstance(system, str) and system.strip() else None,
    )


def detect_format(row: dict[str, Any], spec: FormatSpec) -> str:
    """The format of one row: the configured one, or recognised from its keys."""
    if spec.format != "auto":
        return spec.format
    if "messages" in row:
        return "messages"
    if "instruction" in row and "output" in row:
        return "alpaca"
    if "prompt" in row and "completion" in row:
        return "prompt_completion"
    if {"prompt", "completion"} <= spec.columns.keys() and spec.columns["prompt"] in row:
        return "columns"
    keys = ", ".join(sorted(map(str, row))[:10]) or "none"
    raise BadRow(
        "unrecognised row format: expected 'messages', 'instruction'+'output', 'prompt'+'completion' "
        f"or the columns mapped in task.yaml; the row has keys: {keys}"
    )


def to_messages(row: Any, spec: FormatSpec) -> list[dict[str, str]]:
    """Normalise one raw row to a canonical conversation, or raise BadRow with the reason."""
    if not isinstance(row, dict):
        raise BadRow(f"expected an object/record, got {type(row).__name__}")
    fmt = detect_format(row, spec)
    if fmt == "messages":
        messages = _chat(row.get("messages"))
    elif fmt == "alpaca":
        messages = _alpaca(row)
    elif fmt == "prompt_completion":
        messages = _pair(_text(row.get("prompt"), "prompt"), _text(row.get("completion"), "completion"))
    else:
        if not {"prompt", "completion"} <= spec.columns.keys():
            raise BadRow("format 'columns' needs data.columns.prompt and data.columns.completion in task.yaml")
        messages = _mapped(row, spec.columns)
    if spec.system_prompt and messages[0]["role"] != "system":
        messages.insert(0, {"role": "system", "content": spec.system_prompt})
    return messages


def _decode(data: bytes) -> str:
    """Text of a file: UTF-8 (BOM optional) or UTF-16 with a BOM; bad bytes kept as surrogates."""
    if data.startswith((b"\xff\xfe", b"\xfe\xff")):
        return data.decode("utf-16")
    return data.decode("utf-8-sig", errors="surrogateescape")


def _jsonl_rows(text: str) -> Iterator[tuple[str, Any, str | None]]:
    for number, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            yield f"line {number}", json.loads(line), None
        except json.JSONDecodeError as exc:
            yield f"line {number}", line, f"not valid JSON ({exc.msg} at column {exc.colno})"


def _json_rows(text: str, name: str) -> Iterator[tuple[str, Any, str | None]]:
    try:
        data = json.loads(text)
    except json.JSONDecodeError as exc:
        raise RawDataError(f"{name}: not valid JSON ({exc.msg} at line {exc.lineno}, column {exc.colno})") from None
    if isinstance(data, dict):
        lists = [value for value in data.values() if isinstance(value, list)]
        if len(lists) != 1:
            raise RawDataError(f"{name}: expected a JSON array of rows (or an object holding one array)")
        data = lists[0]
    if not isinstance(data, list):
        raise RawDataError(f"{name}: expected a JSON array of rows, got {type(data).__name__}")
    for index, row in enumerate(data, start=1):
        yield f"row {index}", row, None


def _csv_rows(text: str) -> Iterator[tuple[str, Any, str | None]]:
    reader = csv.DictReader(io.StringIO(text, newline=""), restkey="__extra__", restval=None)
    if reader.fieldnames is None:
        return
    start = reader.line_num + 1
    for row in reader:
        problem = None
        if "__extra__" in row:
            problem = f"has {len(row['__extra__'])} more field(s) than the header"
        elif any(value is None for value in row.values()):
            problem = "has fewer fields than the header"
        yield f"line {start}", row, problem
        start = reader.line_num + 1


def _parquet_rows(path: Path, name: str) -> Iterator[tuple[str, Any, str | None]]:
    try:
        table = pq.read_table(path)
    except Exception as exc:  # pyarrow raises several types for broken files
        raise RawDataError(f"{name}: not a readable Parquet file ({exc})") from None
    for index, row in enumerate(table.to_pylist(), start=1):
        yield f"row {index}", row, None


def iter_file_rows(path: Path, name: str) -> Iterator[tuple[str, Any, str | None]]:
    """(location, raw row, problem or None) for every row of one file."""
    if path.suffix == ".parquet":
        yield from _parquet_rows(path, name)
        return
    try:
        text = _decode(path.read_bytes())
    except UnicodeDecodeError as exc:
        raise RawDataError(f"{name}: cannot decode text ({exc})") from None
    if path.suffix == ".jsonl":
        yield from _jsonl_rows(text)
    elif path.suffix == ".json":
        yield from _json_rows(text, name)
    else:
        yield from _csv_rows(text)


def _raw_text(row: Any) -> str:
    text = row if isinstance(row, str) else json.dumps(row, ensure_ascii=False, default=str)
    return text if len(text) <= RAW_TEXT_LIMIT else text[:RAW_TEXT_LIMIT] + f"… [{len(text)} characters]"


def read_file(path: Path, name: str, spec: FormatSpec, result: ReadResult) -> None:
    """Append one file's examples and quarantined rows to `result`."""
    for location, row, problem in iter_file_rows(path, name):
        source = f"{name}:{location}"
        try:
            if problem:
                raise BadRow(problem)
            messages = to_messages(row, spec)
        except BadRow as bad:
            result.quarantine.append({"source": source, "reason": str(bad), "raw": _raw_text(row)})
        else:
            result.examples.append({"id": example_id(messages), "messages": messages, "source": source})


def list_raw_files(raw_dir: Path) -> tuple[list[Path], list[Path]]:
    """(supported files, ignored files) under raw/, sorted by name so the result never depends on listing order."""
    if not raw_dir.is_dir():
        raise RawDataError(f"{raw_dir}: the task has no raw/ folder")
    files = sorted((p for p in raw_dir.rglob("*") if not p.is_dir()), key=lambda p: p.relative_to(raw_dir).as_posix())
    supported = [p for p in files if p.suffix in SUPPORTED_SUFFIXES and not p.name.startswith(".")]
    return supported, [p for p in files if p not in supported]


def read_raw_dir(raw_dir: Path, spec: FormatSpec) -> ReadResult:
    """Read every supported file under `raw_dir`; a file outside the folder (via a link) is quarantined whole."""
    result = ReadResult()
    supported, ignored = list_raw_files(raw_dir)
    result.ignored_files = [p.relative_to(raw_dir).as_posix() for p in ignored]
    for path in supported:
        name = path.relative_to(raw_dir).as_posix()
        try:
            contained(raw_dir.parent, path.relative_to(raw_dir.parent).as_posix())
        except UnsafePathError:
            result.quarantine.append({"source": name, "reason": "link to a file outside the task folder; not read", "raw": ""})
            continue
        result.files.append(name)
        read_file(path, name, spec, result)
    return result


def write_examples(rows: list[dict[str, Any]], path: Path) -> None:
    """Write canonical examples as Parquet (deterministic bytes for the same rows)."""
    pq.write_table(pa.Table.from_pylist(rows, schema=EXAMPLE_SCHEMA), path)


def read_examples(path: Path) -> list[dict[str, Any]]:
    return pq.read_table(path).to_pylist()


def write_jsonl(rows: list[dict[str, Any]], path: Path) -> None:
    with path.open("w", encoding="utf-8", errors="backslashreplace") as handle:
        for row in rows:
            handle.write(json.dumps(row, ensure_ascii=False) + "\n")


def build_raw_examples(task_folder: Path, out_dir: Path, spec: FormatSpec) -> dict[str, Any]:
    """Read a task's raw/ into `out_dir/examples.parquet` and `out_dir/quarantine.jsonl`; return the counts."""
    result = read_raw_dir(task_folder / "raw", spec)
    if not result.examples:
        reasons = Counter(row["reason"] for row in result.quarantine).most_common(3)
        raise RawDataError(
            f"{task_folder / 'raw'}: no usable rows in {len(result.files)} file(s) "
            f"({result.rows_read} rows read; most common problems: {reasons or 'no rows at all'})"
        )
    with atomic_dir(out_dir) as tmp:
        write_examples(result.examples, tmp / "examples.parquet")
        write_jsonl(result.quarantine, tmp / "quarantine.jsonl")
    return {
        "rows_read": result.rows_read,
        "rows_valid": len(result.examples),
        "rows_quarantined": len(result.quarantine),
        "files": result.files,
        "ignored_files": result.ignored_files,
        "quarantine_reasons": dict(Counter(row["reason"] for row in result.quarantine).most_common()),
        "quarantine": result.quarantine,
    }


def review_sample(rows: list[dict[str, Any]], size: int = 100, seed: int = 0) -> list[dict[str, Any]]:
    """`size` rows drawn with a fixed seed (all rows if fewer), flattened to prompt/answer columns."""
    ordered = sorted(rows, key=lambda r: r["id"])
    picked = random.Random(seed).sample(ordered, min(size, len(ordered)))
    return [
        {
            "id": row["id"],
            "system": next((m["content"] for m in row["messages"] if m["role"] == "system"), ""),
            "prompt": "\n".join(m["content"] for m in row["messages"][:-1] if m["role"] == "user"),
            "answer": row["messages"][-1]["content"],
            "source": row["source"],
        }
        for row in sorted(picked, key=lambda r: r["id"])
    ]


def write_csv(rows: list[dict[str, Any]], path: Path) -> None:
    with atomic_file(path) as tmp, tmp.open("w", encoding="utf-8", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(rows[0]) if rows else ["id"])
        writer.writeheader()
        writer.writerows(rows)
