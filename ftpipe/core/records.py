"""Read raw task files in any supported format into canonical chat examples and preference rows (`preferences`),
quarantining bad rows.

Canonical example: ``{"id": str, "messages": [{"role", "content"}, ...], "source": "file:line N"}``.
Every row read ends up as an example, a preference row or a quarantine entry with a reason, so
``rows_read == rows_valid + rows_quarantined`` always holds. A file that yields no row at all
(unreadable, empty, a link out of the task folder) counts as one quarantine entry whose source is
the file name, and the other files are still read. Rows over MAX_ROW_CHARS characters are quarantined.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from collections import Counter
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field, replace
from difflib import get_close_matches
from fnmatch import fnmatchcase
from functools import lru_cache
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from ftpipe.core.raw_files import MAX_ROW_CHARS, SURROGATE, RawDataError, iter_file_rows, too_long
from ftpipe.core.layout import EXAMPLES, PREFERENCES, QUARANTINE
from ftpipe.core.readable import plural
from ftpipe.core.results import Result, reuse_key
from ftpipe.core.storage import UnsafePathError, atomic_dir, contained, sha256_of_files
from ftpipe.core.text import cell, loose, text_parts

SUPPORTED_SUFFIXES = (".jsonl", ".json", ".csv", ".parquet")
ROLES = ("system", "user", "assistant")
ROLE_ALIASES = {"developer": "system"}  # OpenAI's newer name for the system's instructions
# Column names datasets commonly give a prompt and its answer, most telling first (for a data.columns hint)
LIKELY_PROMPT_COLUMNS = ("question", "query", "input", "text", "sentence", "utterance", "message", "source", "request",
                         "prompt")
LIKELY_ANSWER_COLUMNS = ("answer", "response", "output", "label", "target", "reply", "intent", "category", "summary",
                         "completion")
CLOSE_COLUMN = 0.75  # difflib's ratio from which a column is named as a misspelling of a mapped one
SHAREGPT = "conversations"  # ShareGPT's field: turns of {from, value}
SHAREGPT_ROLES = {"system": "system", "human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant"}
RAW_TEXT_LIMIT = 4096
MESSAGE_TYPE = pa.list_(pa.struct([("role", pa.string()), ("content", pa.string())]))
EXAMPLE_SCHEMA = pa.schema([("id", pa.string()), ("messages", MESSAGE_TYPE), ("source", pa.string())])
# A longer CSV field raises csv.Error, and its row is quarantined as too long.



class BadRow(ValueError):
    """A row that cannot become an example; the message is the quarantine reason."""


@dataclass(frozen=True)
class FormatSpec:
    """How rows map to messages: `format`, `columns` (the user's column mapping), `system_prompt` and `label_names` as
    in task.yaml's data section, and why an answer cannot be used (`answer_problem`, the task type's check, which
    `answer_rule` names in the spec's repr, the reuse key; None: any answer can) or departs from the others' form
    (`shape_problems`, over all the answers)."""

    format: str = "auto"
    columns: dict[str, str] = field(default_factory=dict)
    system_prompt: str | None = None
    label_names: tuple[str, ...] = ()
    answer_rule: str = ""
    answer_problem: Callable[[str], str | None] | None = field(default=None, repr=False, compare=False)
    shape_problems: Callable[[list[str]], list[str | None]] | None = field(default=None, repr=False, compare=False)
    files: tuple[tuple[str, str | None, dict[str, str]], ...] = ()  # data.files: (pattern, format, columns)
    columns_setting: str = field(default="data.columns", repr=False, compare=False)  # where `columns` is set
    file: str = field(default="", repr=False, compare=False)  # the file read with this spec (its path under raw/)
    numbers_are_names: bool = field(default=False, repr=False, compare=False)  # the file's answers 1-5 are labels

    def for_file(self, name: str) -> FormatSpec:
        """The spec of the raw file `name` (its path under raw/), as the entry of `files` that applies to it gives its
        format (None: this one's) and columns."""
        entry = self.entry_of(name)
        if entry is None:
            return replace(self, file=name)
        fmt, columns = next((fmt, columns) for pattern, fmt, columns in self.files if pattern == entry)
        return replace(self, format=fmt or self.format, columns=columns, files=(), file=name,
                       columns_setting=f"data.files[{entry!r}].columns")

    def entry_of(self, name: str) -> str | None:
        """The pattern of `files` that applies to the raw file `name`: the name itself, else the first it matches."""
        patterns = [pattern for pattern, _, _ in self.files]
        return name if name in patterns else next((p for p in patterns if fnmatchcase(name, p)), None)

    def unused_entries(self, names: list[str]) -> list[str]:
        """Why each pattern of `files` applies to none of the raw files `names`, one line each."""
        applied = {self.entry_of(name) for name in names}
        lines = []
        for pattern in (pattern for pattern, _, _ in self.files if pattern not in applied):
            matched = [name for name in names if fnmatchcase(name, pattern)]
            if not matched:
                lines.append(f"data.files names {pattern!r}, which no raw file matches (the files read: "
                             f"{', '.join(names)})")
            else:
                lines.append(f"data.files {pattern!r} applies to no file: {matched[0]} is read by "
                             f"{self.entry_of(matched[0])!r}, listed before it (the first pattern a file matches "
                             "applies, after its own path)")
        return lines


FEEDBACK_FILE = "feedback.jsonl"  # in raw/: the corrections of served answers, which ftpipe writes as chat rows


def own_rows(spec: FormatSpec) -> FormatSpec:
    """`spec` for rows ftpipe writes itself (corrections, a teacher's answers): chat rows, whatever `data.format`
    says the user's files hold."""
    return replace(spec, format="auto")


@dataclass
class ReadResult:
    examples: list[dict[str, Any]] = field(default_factory=list)
    preferences: list[dict[str, Any]] = field(default_factory=list)
    quarantine: list[dict[str, Any]] = field(default_factory=list)
    files: list[str] = field(default_factory=list)
    ignored_files: list[str] = field(default_factory=list)
    unused_entries: list[str] = field(default_factory=list)  # why a data.files pattern applies to no file
    paths: dict[str, Path] = field(default_factory=dict)  # each file read, by its name in the rows' sources

    @property
    def rows_valid(self) -> int:
        return len(self.examples) + len(self.preferences)

    @property
    def unusable_files(self) -> list[str]:
        """The files read of which every row went to the quarantine."""
        used = {source_file(row["source"]) for row in (*self.examples, *self.preferences)}
        return [name for name in self.files if name not in used]

    @property
    def rows_read(self) -> int:
        return self.rows_valid + len(self.quarantine)


def example_id(content: Any) -> str:
    """A stable id: the hash of the exact content (a conversation, or a preference row's fields)."""
    canonical = json.dumps(content, ensure_ascii=False, separators=(",", ":"))
    return hashlib.sha256(canonical.encode("utf-8", "surrogatepass")).hexdigest()[:16]


def _invalid_char(ch: str) -> str:
    if "\udc80" <= ch <= "\udcff":  # an undecodable byte, kept by the surrogateescape decoding
        return f"contains bytes that are not valid UTF-8 (0x{ord(ch) - 0xDC00:02X})"
    return f"contains a lone surrogate (U+{ord(ch):04X}), which is not valid Unicode"


def type_name(value: Any) -> str:
    if isinstance(value, float) and value != value:
        return "NaN"
    return "null" if value is None else type(value).__name__


def text_field(value: Any, name: str) -> str:
    if value is None:
        raise BadRow(f"field '{name}' is missing or null")
    if not isinstance(value, str):
        raise BadRow(f"field '{name}' must be text, got {type_name(value)}")
    if not value.strip():
        raise BadRow(f"field '{name}' is empty or only whitespace")
    if "\x00" in value:
        raise BadRow(f"field '{name}' contains NUL bytes")
    if bad := SURROGATE.search(value):
        raise BadRow(f"field '{name}' {_invalid_char(bad.group())}")
    return value


def optional_text(value: Any, name: str) -> str | None:
    """An optional field's text; None when it is absent or blank."""
    if value is None or (isinstance(value, str) and not value.strip()):
        return None
    return text_field(value, name)


def _role(value: Any, name: str) -> str:
    role = value.strip().lower() if isinstance(value, str) else value
    role = ROLE_ALIASES.get(role, role)
    if role not in ROLES:
        raise BadRow(f"{name}.role is {value!r:.60}; expected one of {', '.join(ROLES)}")
    return role


def message_list(raw: Any, name: str) -> list[dict[str, str]]:
    """The `{role, content}` messages of field `name`, each role and text checked; a list written as JSON text (a
    CSV cell, a string column) is read as the list."""
    raw = _json_list(raw, name)
    if raw is None:
        raise BadRow(f"field '{name}' is missing or null")
    if not isinstance(raw, list):
        raise BadRow(f"field '{name}' must be a list of {{role, content}} objects, got {type_name(raw)}")
    if not raw:
        raise BadRow(f"field '{name}' is an empty list")
    messages = []
    for i, message in enumerate(raw):
        if not isinstance(message, dict):
            raise BadRow(f"{name}[{i}] must be an object with 'role' and 'content', got {type_name(message)}")
        _check_not_tool_turn(message, f"{name}[{i}]")
        content = text_field(_joined_parts(message.get("content"), f"{name}[{i}].content"), f"{name}[{i}].content")
        messages.append({"role": _role(message.get("role"), f"{name}[{i}]"), "content": content})
    return messages


def _check_not_tool_turn(message: dict[str, Any], name: str) -> None:
    """BadRow for a tool call or a tool's result (OpenAI's `tool_calls`, `function_call`, role tool or function):
    the trainings learn text turns only, so such a conversation is refused whole, saying so."""
    role = message.get("role")
    calls = [key for key in ("tool_calls", "function_call") if message.get(key)]
    if calls or (isinstance(role, str) and role.strip().lower() in ("tool", "function")):
        kind = f"a tool call ({calls[0]})" if calls else f"a tool's result (role {role.strip().lower()})"
        raise BadRow(f"{name} is {kind}: tool use is not trained on, only text turns of the user and the assistant; "
                     "leave the tool turns out of the conversation to keep it")


def _joined_parts(content: Any, name: str) -> Any:
    """`content`, or the text of its parts when it is a list of OpenAI content parts; BadRow for a part not text."""
    if not (isinstance(content, list) and content and all(isinstance(part, dict) and "type" in part
                                                          for part in content)):
        return content
    if (text := text_parts(content)) is None:
        kinds = sorted({str(part["type"]) for part in content if part["type"] != "text"})
        raise BadRow(f"field '{name}' holds a part of type {' and '.join(kinds)}: only text parts are read (the "
                     "models read text)")
    return text


def _json_list(raw: Any, name: str) -> Any:
    """`raw`, or the value of the JSON text it is when that text begins with `[`."""
    if not (isinstance(raw, str) and raw.lstrip().startswith("[")):
        return raw
    try:
        return json.loads(raw)
    except json.JSONDecodeError as error:
        raise BadRow(f"field '{name}' is text starting with '[' but not a JSON list: {error.msg} at character "
                     f"{error.pos}") from None


def _chat(raw: Any, name: str = "messages") -> list[dict[str, str]]:
    messages = message_list(raw, name)
    if messages[-1]["role"] != "assistant":
        raise BadRow("the conversation does not end with an assistant message")
    if not any(m["role"] == "user" for m in messages):
        raise BadRow("the conversation has no user message")
    return messages


def _sharegpt(raw: Any) -> list[dict[str, str]]:
    """A ShareGPT conversation (`conversations`: turns of `{from, value}`, from human/gpt/system) as messages."""
    raw = _json_list(raw, SHAREGPT)
    if not isinstance(raw, list):
        raise BadRow(f"field '{SHAREGPT}' must be a list of {{from, value}} turns, got {type_name(raw)}")
    turns = []
    for i, turn in enumerate(raw):
        if not isinstance(turn, dict):
            raise BadRow(f"{SHAREGPT}[{i}] must be an object with 'from' and 'value', got {type_name(turn)}")
        speaker = turn.get("from")
        role = SHAREGPT_ROLES.get(speaker.strip().lower() if isinstance(speaker, str) else None)
        if role is None:
            raise BadRow(f"{SHAREGPT}[{i}].from is {speaker!r:.60}; expected one of human, gpt, system")
        turns.append({"role": role, "content": text_field(turn.get("value"), f"{SHAREGPT}[{i}].value")})
    return _chat(turns, SHAREGPT)


def _pair(prompt: str, completion: str, system: str | None = None) -> list[dict[str, str]]:
    messages = [{"role": "system", "content": system}] if system else []
    return messages + [{"role": "user", "content": prompt}, {"role": "assistant", "content": completion}]


def _alpaca(row: dict[str, Any], spec: FormatSpec) -> list[dict[str, str]]:
    """Alpaca's `instruction`, optional `input` and `output`; or Dolly's names for the last two, `context` and
    `response`."""
    answer_field = _answer_field(row, "alpaca", spec)
    extra_field = "context" if answer_field == "response" else "input"
    instruction = text_field(row.get("instruction"), "instruction")
    extra = optional_text(row.get(extra_field), extra_field)
    prompt = f"{instruction}\n\n{extra}" if extra else instruction
    return _pair(prompt, _answer_text(row.get(answer_field), answer_field, spec))


def _answer_field(row: dict[str, Any], fmt: str, spec: FormatSpec) -> str | None:
    """The field holding the answer of a row of format `fmt` (None: the answer is a message's text)."""
    if fmt == "alpaca":
        return "response" if "response" in row and "output" not in row else "output"
    return {"prompt_completion": "completion", "columns": spec.columns.get("completion")}.get(fmt)


def _whole_number(value: Any) -> int | None:
    """A whole number, or its digits as text (a CSV cell's), as an int; else None."""
    if isinstance(value, int) and not isinstance(value, bool):
        return value
    return int(value) if isinstance(value, str) and re.fullmatch(r"\s*-?\d+\s*", value) else None


@lru_cache(maxsize=8)
def _number_names(label_names: tuple[str, ...]) -> dict[int, str]:
    """data.label_names that are numbers themselves (star ratings: 1 to 5), by their number; {} if any is not."""
    numbers = {name: _whole_number(name) for name in label_names}
    return {} if None in numbers.values() else {number: name for name, number in numbers.items()}


def _answer_value(row: Any, spec: FormatSpec) -> Any:
    """The value of a raw row's answer field (None: it has none, or its format is not recognised)."""
    try:
        field_name = _answer_field(row, detect_format(row, spec), spec) if isinstance(row, dict) else None
    except BadRow:
        return None
    return row.get(field_name) if field_name else None


def _numbers_name_labels(rows: list[tuple[str, Any, str | None]], spec: FormatSpec) -> bool:
    """Whether a file's whole-number answers are labels rather than class ids: data.label_names are numbers, and
    every such answer of the file's `rows` is one of them (a rating of 5 is the label 5, not class id 5)."""
    names = _number_names(spec.label_names)
    answers = {_whole_number(_answer_value(row, spec)) for _, row, problem in rows if problem is None}
    answers -= {None} if -1 in names else {None, -1}  # -1: Hugging Face's "no label", unless a label is -1
    return bool(names) and bool(answers) and answers <= names.keys()


NUMBERS_READ_AS_IDS = (" (data.label_names are numbers, but the file's answers write a number that is none of them, so "
                       "its numbers are read as class ids)")


def _answer_text(value: Any, name: str, spec: FormatSpec) -> str:
    """An answer field's text; with data.label_names, a class id (a whole number, or its digits as text) is its
    class name, and where they are numbers that the file's answers write, such a number is that label."""
    label_names, number = spec.label_names, _whole_number(value)
    if spec.numbers_are_names and number in _number_names(label_names):
        return _number_names(label_names)[number]
    if label_names and number == -1:
        raise BadRow(f"field '{name}' is class id -1, which Hugging Face datasets give a row without a label (a test "
                     "split's): it has no answer to learn")
    if label_names and number is not None:
        if not 0 <= number < len(label_names):
            raise BadRow(f"field '{name}' is class id {number}, and data.label_names names ids 0 to "
                         f"{len(label_names) - 1}{NUMBERS_READ_AS_IDS if _number_names(label_names) else ''}")
        return label_names[number]
    if isinstance(value, int) and not isinstance(value, bool):
        raise BadRow(f"field '{name}' is the number {value}, not text: where it is a class id, data.label_names "
                     "lists the class names in id order (a Hugging Face dataset has them in "
                     f"features['{name}'].names); where the numbers are the labels (star ratings), it lists them")
    return text_field(value, name)


def _keys(row: dict[str, Any]) -> str:
    return ", ".join(sorted(map(str, row))[:10]) or "none"


def _missing_columns(row: dict[str, Any], columns: dict[str, str], setting: str = "data.columns") -> str:
    """The mapped columns the row lacks, as `mapped column 'utterance' (data.columns.prompt) is not in the file`
    (`setting`: where `columns` is set), or ''."""
    missing = [f"{column!r} ({setting}.{field}{_close_column(column, row)})"
               for field, column in sorted(columns.items()) if column not in row]
    if not missing:
        return ""
    several = len(missing) > 1
    return f"mapped column{'s' * several} {' and '.join(missing)} {'are' if several else 'is'} not in the file"


def _close_column(column: str, row: dict[str, Any]) -> str:
    """`; did you mean 'sentiment'?` for the row's column written most like `column`, case aside; else ''."""
    columns = {str(name).casefold(): str(name) for name in row}
    close = get_close_matches(column.casefold(), list(columns), n=1, cutoff=CLOSE_COLUMN)
    return f"; did you mean {columns[close[0]]!r}?" if close else ""


def check_mapped_columns(row: dict[str, Any], columns: dict[str, str], setting: str = "data.columns") -> None:
    """BadRow when the row lacks a column of `columns` (those `setting` maps that the row's format reads)."""
    missing = _missing_columns(row, columns, setting)
    if missing:
        raise BadRow(f"{missing}; its columns are: {_keys(row)}")


def _mapped(row: dict[str, Any], spec: FormatSpec) -> list[dict[str, str]]:
    columns = spec.columns
    check_mapped_columns(row, columns, spec.columns_setting)
    system_column = columns.get("system")
    return _pair(
        text_field(row.get(columns["prompt"]), columns["prompt"]),
        _answer_text(row.get(columns["completion"]), columns["completion"], spec),
        optional_text(row.get(system_column), system_column) if system_column else None,
    )


def detect_format(row: dict[str, Any], spec: FormatSpec) -> str:
    """The format of one row: the configured one, or recognised from its keys."""
    if spec.format != "auto":
        return spec.format
    if "messages" in row:
        return "messages"
    if SHAREGPT in row:
        return "sharegpt"
    if "instruction" in row and ("output" in row or "response" in row):
        return "alpaca"
    if "prompt" in row and "completion" in row:
        return "prompt_completion"
    mapped = {"prompt", "completion"} <= spec.columns.keys()
    if mapped and spec.columns["prompt"] in row:
        return "columns"
    expected = (f"the {_missing_columns(row, spec.columns, spec.columns_setting)}" if mapped else
                "expected 'messages', 'conversations', 'instruction'+'output' (or 'response'), 'prompt'+'completion', "
                "'prompt'+'chosen'+'rejected', 'prompt'+'completion'+'label' or the columns mapped in task.yaml")
    raise BadRow(f"unrecognised row format: {expected}; the row has keys: {_keys(row)}"
                 f"{_mapping_hint(row, spec if mapped else replace(spec, columns={}))}")


def _mapping_hint(row: dict[str, Any], spec: FormatSpec) -> str:
    """Where the row has columns commonly named for a prompt and an answer, or a preference pair's in another case:
    `; data.columns: {prompt: text, completion: label} reads it`, or where `spec` maps other names, the same for the
    file's own `data.files` entry, or a new one; else ''."""
    names = {str(key).casefold(): str(key) for key in row}
    prompt = next((names[name] for name in LIKELY_PROMPT_COLUMNS if name in names), None)
    found = {"prompt": prompt, "chosen": names.get("chosen"), "rejected": names.get("rejected")}
    if None in found.values():
        found = {"prompt": prompt, "completion": next((names[name] for name in LIKELY_ANSWER_COLUMNS if name in names),
                                                       None)}
    mapping = "{" + ", ".join(f"{field}: {column}" for field, column in found.items()) + "}"
    if None in found.values() or spec.columns and all(spec.columns.get(field) in row for field in found):
        return ""
    if not spec.columns or spec.columns_setting != "data.columns":
        return f"; {spec.columns_setting if spec.columns else 'data.columns'}: {mapping} reads it"
    return (f"; data.files: {{{spec.file or '<this file>'!r}: {{columns: {mapping}}}}} reads this file (its columns "
            f"differ from those {spec.columns_setting} maps)")


def to_messages(row: Any, spec: FormatSpec) -> list[dict[str, str]]:
    """Normalise one raw row to a canonical conversation, or raise BadRow with the reason."""
    if not isinstance(row, dict):
        raise BadRow(f"expected an object/record, got {type_name(row)}")
    fmt = detect_format(row, spec)
    if fmt == "messages":
        messages = _chat(row.get("messages"))
    elif fmt == "sharegpt":
        messages = _sharegpt(row.get(SHAREGPT))
    elif fmt == "alpaca":
        messages = _alpaca(row, spec)
    elif fmt == "prompt_completion":
        messages = _pair(text_field(row.get("prompt"), "prompt"),
                         _answer_text(row.get("completion"), "completion", spec))
    else:
        if not {"prompt", "completion"} <= spec.columns.keys():
            raise BadRow(f"format 'columns' needs {spec.columns_setting}.prompt and {spec.columns_setting}.completion "
                         "in task.yaml")
        messages = _mapped(row, spec)
    messages = with_system_prompt(messages, spec.system_prompt)
    check_size(m["content"] for m in messages)
    if spec.answer_problem is not None and (problem := spec.answer_problem(messages[-1]["content"])):
        raise BadRow(problem)
    return messages


def with_system_prompt(messages: list[dict[str, str]], system_prompt: str | None) -> list[dict[str, str]]:
    """`messages` with `system_prompt` (data.system_prompt) first, unless they start with a system message."""
    if system_prompt and messages[0]["role"] != "system":
        return [{"role": "system", "content": system_prompt}, *messages]
    return messages


def common_system_prompt(conversations: list[list[dict[str, str]]]) -> tuple[str | None, int]:
    """(the system message more than half the conversations start with, or None; how many start with it)."""
    counts = Counter(messages[0]["content"] for messages in conversations if messages[0]["role"] == "system")
    prompt, count = counts.most_common(1)[0] if counts else (None, 0)
    return (prompt, count) if count * 2 > len(conversations) else (None, 0)


def odd_turn_orders(rows: list[dict[str, Any]]) -> str | None:
    """One line on rows whose turns do not alternate (two turns of one role in a row, or a system message after the
    first turn), naming the first; None when every row's turns alternate. Kept: a chat template renders them as they
    are, but an export often writes one message as two, or a note as a turn."""
    odd = [(row["source"], at, message["role"]) for row in rows for at, message in enumerate(row["messages"])
           if at and (message["role"] == "system" or message["role"] == row["messages"][at - 1]["role"])]
    if not odd:
        return None
    rows_odd = len({source for source, _, _ in odd})
    source, at, role = odd[0]
    first = (f"a system message after the first turn at messages[{at}]" if role == "system"
             else f"messages[{at - 1}] and [{at}] both {role}")
    return (f"{rows_odd} of {len(rows)} rows have turns that do not alternate (the first: {source}, {first}): each is "
            "trained as written; merge a message written as two, and put a note for the model in the system prompt")


def system_prompt_mix(rows: list[dict[str, Any]]) -> str | None:
    """One line on rows of which some start with a system message and others with none, naming the files of those
    without (None: all or none start with one)."""
    system = Counter(row["messages"][0]["content"] for row in rows if row["messages"][0]["role"] == "system")
    without = Counter(source_file(row["source"]) for row in rows if row["messages"][0]["role"] != "system")
    if not system or not without:
        return None
    prompt, holding = system.most_common(1)[0]
    others = sum(system.values()) - holding
    files = ", ".join(name for name, _ in without.most_common(3)) + (" and others" if len(without) > 3 else "")
    return (f"{sum(without.values())} of {len(rows)} rows start without a system message ({files}), {holding} with "
            f"{cell(prompt, 40)!r}" + (f" and {others} with another" if others else "") + ": the model learns to "
            "answer with and without an instruction; data.system_prompt gives the rows without one that instruction")


LISTED_LABELS = 3  # a system prompt that names this many labels of data.label_names lists the task's labels


def unlisted_labels(rows: list[dict[str, Any]], label_names: tuple[str, ...] | list[str],
                    labels_of: str = "data.label_names") -> str | None:
    """One line on the rows' system prompt (`common_system_prompt`) where it lists labels of `label_names` (those of
    `labels_of`) but not all (cut off, or written before labels were added), naming those it lacks (None: it names
    all, or too few to be a list)."""
    prompt, holding = common_system_prompt([row["messages"] for row in rows])
    if prompt is None or not label_names:
        return None
    written = f" {loose(prompt)} "
    lacking = [name for name in label_names if f" {loose(name)} " not in written]
    if not lacking or len(label_names) - len(lacking) < LISTED_LABELS:
        return None
    more = f" and {len(lacking) - 5} more" if len(lacking) > 5 else ""
    return (f"the system prompt of {plural(holding, 'row')} names {len(label_names) - len(lacking)} of the "
            f"{len(label_names)} labels of {labels_of}, not {', '.join(lacking[:5])}{more} (it ends "
            f"{prompt[-30:]!r}): the model is told of some labels only; list them all in data.system_prompt")


def check_size(texts: Iterable[str]) -> None:
    """Raise BadRow when the texts of one row hold more than MAX_ROW_CHARS characters together."""
    size = sum(map(len, texts))
    if size > MAX_ROW_CHARS:
        raise BadRow(too_long(size))


def _printable(text: str) -> str:
    """`text` with lone surrogates (undecodable bytes) written as escapes, so it can be stored anywhere."""
    return text.encode("utf-8", "backslashreplace").decode("utf-8")


def _raw_text(row: Any) -> str:
    try:
        text = row if isinstance(row, str) else json.dumps(row, ensure_ascii=False, default=str)
    except (TypeError, ValueError, RecursionError):
        text = f"<{type(row).__name__} that cannot be shown as JSON>"
    text = text if len(text) <= RAW_TEXT_LIMIT else text[:RAW_TEXT_LIMIT] + f"… [{len(text)} characters]"
    return _printable(text)


def _quarantine(result: ReadResult, source: str, reason: str, raw: Any = "") -> None:
    result.quarantine.append({"source": source, "reason": _printable(reason), "raw": _raw_text(raw)})


def source_file(source: str) -> str:
    """The file a row's `source` names: `a.csv` of `a.csv:line 4` (a source without a line or row is its file)."""
    return source.rsplit(":", 1)[0]


def source_order(row: dict[str, Any]) -> tuple:
    """Where a row comes in the task's files, to sort by: its file's name, then its line or row number as a number
    (`a.csv:row 10` after `a.csv:row 9`), then its id."""
    name, _, where = row["source"].rpartition(":")
    number = re.search(r"\d+", where)
    return (name, int(number.group()) if number else 0, where, row["id"]) if name else (row["source"], 0, "", row["id"])


def read_file(path: Path, name: str, spec: FormatSpec, result: ReadResult) -> None:
    """Append one file's examples, preference rows and quarantined rows to `result`; an unreadable or empty file is
    one entry."""
    from ftpipe.core.preferences import to_preference  # preferences builds on this module's row checks

    before = result.rows_read
    result.paths[name] = path
    try:
        rows = iter_file_rows(path)
        if _number_names(spec.label_names):
            rows = list(rows)
            spec = replace(spec, numbers_are_names=_numbers_name_labels(rows, spec))
        for location, row, problem in rows:
            source = f"{name}:{location}"
            try:
                if problem:
                    raise BadRow(problem)
                preference = to_preference(row, spec, source)
                if preference is None:
                    messages = to_messages(row, spec)
                    result.examples.append({"id": example_id(messages), "messages": messages, "source": source})
                else:
                    result.preferences.append(preference)
            except BadRow as bad:
                _quarantine(result, source, str(bad), row)
    except RawDataError as exc:
        _quarantine(result, name, str(exc))
    except OSError as exc:
        _quarantine(result, name, f"file cannot be read ({exc.strerror or exc})")
    if result.rows_read == before:
        _quarantine(result, name, "file contains no rows (it is empty or holds only a header)")


def _display_name(path: Path, raw_dir: Path) -> str:
    """The path relative to raw/, with bytes that are not UTF-8 shown as U+FFFD (names are stored in Parquet)."""
    return path.relative_to(raw_dir).as_posix().encode("utf-8", "surrogateescape").decode("utf-8", "replace")


def _not_readable(path: Path, task_folder: Path) -> str | None:
    """Why a listed path must not be read, or None: a link out of the task folder, a link to a folder, not a file."""
    kind = "folder" if path.is_dir() else "file"
    try:
        contained(task_folder, path.relative_to(task_folder).as_posix())
    except UnsafePathError:
        return f"link to a {kind} outside the task folder; not read"
    except RuntimeError:
        return "link that cannot be resolved (a loop of links); not read"
    except OSError as exc:
        return f"link that cannot be resolved ({exc.strerror}); not read"
    if kind == "folder":
        return "link to a folder; links to folders are not followed"
    if not path.is_file():
        return "link to a missing file; not read" if path.is_symlink() else "not a regular file (a pipe or a device); not read"
    return None


def list_raw_files(raw_dir: Path) -> tuple[list[Path], list[Path]]:
    """(files and folder links to read, ignored files) under raw/, sorted by name so listing order never matters.

    Hidden paths and unsupported suffixes are ignored; links to folders are listed but never followed.
    """
    if not raw_dir.is_dir():
        raise RawDataError(f"{raw_dir}: the task has no raw/ folder")
    found = []
    for root, dirs, files in os.walk(raw_dir):
        found += [Path(root, name) for name in dirs if Path(root, name).is_symlink()] + [Path(root, name) for name in files]
    found.sort(key=lambda p: p.relative_to(raw_dir).as_posix())

    def wanted(path: Path) -> bool:
        hidden = any(part.startswith(".") for part in path.relative_to(raw_dir).parts)
        return not hidden and (path.suffix in SUPPORTED_SUFFIXES or path.is_dir())

    return [p for p in found if wanted(p)], [p for p in found if not wanted(p)]


def read_raw_dir(raw_dir: Path, spec: FormatSpec) -> ReadResult:
    """Read every supported file under `raw_dir`; a path that must not be read (see `_not_readable`) is quarantined whole."""
    result = ReadResult()
    supported, ignored = list_raw_files(raw_dir)
    result.ignored_files = [_display_name(p, raw_dir) for p in ignored]
    for path in supported:
        name = _display_name(path, raw_dir)
        problem = _not_readable(path, raw_dir.parent)
        if problem:
            _quarantine(result, name, problem)
            continue
        result.files.append(name)
        read_file(path, name, own_rows(spec) if name == FEEDBACK_FILE else spec.for_file(name), result)
    result.unused_entries = spec.unused_entries(result.files)
    return result


def write_examples(rows: list[dict[str, Any]], path: Path, metadata: dict[str, str] | None = None) -> None:
    """Write canonical examples as Parquet (deterministic bytes for the same rows), with optional file metadata."""
    schema = EXAMPLE_SCHEMA.with_metadata(metadata) if metadata else EXAMPLE_SCHEMA
    pq.write_table(pa.Table.from_pylist(rows, schema=schema), path)


def read_examples(path: Path) -> list[dict[str, Any]]:
    return pq.read_table(path).to_pylist()


def answers(path: Path) -> list[str]:
    """The last message of each row of an examples file: its answer."""
    return [row["messages"][-1]["content"] for row in read_examples(path)]


def examples_metadata(path: Path) -> dict[str, str]:
    """The file metadata written with `write_examples`."""
    return {k.decode(): v.decode() for k, v in (pq.read_schema(path).metadata or {}).items()}


def user_message(messages: list[dict[str, str]]) -> str:
    """The last user turn of a conversation: what a person reads to know the example (not the shared system prompt)."""
    return next((m["content"] for m in reversed(messages) if m["role"] == "user"), "")


def conversation_text(messages: list[dict[str, str]]) -> str:
    """The turns before the answer as a person reads them (see `prompt_text`)."""
    return prompt_text(messages[:-1])


def prompt_text(turns: list[dict[str, str]]) -> str:
    """Turns as a person reads them, the leading system message aside: the user message alone where it is the only
    turn, else one `user: …` / `assistant: …` line per turn (and `system: …` for a note between turns)."""
    shown = turns[1:] if turns and turns[0]["role"] == "system" else turns
    if sum(m["role"] == "user" for m in shown) <= 1 and all(m["role"] != "system" for m in shown):
        return user_message(turns)
    return "\n".join(f"{m['role']}: {m['content']}" for m in shown)


def write_jsonl(rows: list[dict[str, Any]], path: Path) -> None:
    with path.open("w", encoding="utf-8", errors="backslashreplace") as handle:
        for row in rows:
            handle.write(json.dumps(row, ensure_ascii=False) + "\n")


def build_raw_examples(task_folder: Path, out_dir: Path, spec: FormatSpec,
                       extra: tuple[tuple[Path, str], ...] = ()) -> dict[str, Any]:
    """Read a task's raw/ (and the `extra` (file, source name) files ftpipe wrote, e.g. teacher rows) into
    `out_dir/examples.parquet`, `out_dir/preferences.parquet` and `out_dir/quarantine.jsonl`; return the counts.
    A task with extra rows needs no raw/ folder."""
    from ftpipe.core.preferences import write_preferences  # preferences builds on this module's row checks

    raw = task_folder / "raw"
    extra = tuple((path, name) for path, name in extra if path.is_file() and path.stat().st_size)
    result = read_raw_dir(raw, spec) if raw.is_dir() or not extra else ReadResult()
    for path, name in extra:
        result.files.append(name)
        read_file(path, name, own_rows(spec), result)
    if spec.shape_problems is not None:
        _quarantine_odd_shapes(result, spec.shape_problems)
    if not result.rows_valid:
        reasons = Counter(row["reason"] for row in result.quarantine).most_common(3)
        problems = "; ".join(f"{reason} ({plural(count, 'row')})" for reason, count in reasons) or "no rows at all"
        ignored = (f"; files left out (not {', '.join(SUPPORTED_SUFFIXES)}): {', '.join(result.ignored_files)}"
                   if result.ignored_files else "")
        raise RawDataError(f"{task_folder / 'raw'}: no usable rows in {len(result.files)} file(s), "
                           f"{result.rows_read} rows read; most common problems: {problems}{ignored}")
    summary = {
        "rows_read": result.rows_read,
        "rows_valid": result.rows_valid,
        "rows_quarantined": len(result.quarantine),
        "preference_rows": len(result.preferences),
        "files": result.files,
        "unusable_files": result.unusable_files,
        "ignored_files": result.ignored_files,
        "unused_entries": result.unused_entries,
        "system_prompt_mix": system_prompt_mix(result.examples),
        "odd_turn_orders": odd_turn_orders(result.examples),
        "unlisted_labels": unlisted_labels(result.examples, spec.label_names),
        "quarantine_reasons": dict(Counter(re.sub(r"\[\d+\]", "[n]", row["reason"])  # one reason at any message
                                           for row in result.quarantine).most_common()),
    }
    inputs = {"raw_files": _raw_version(task_folder / "raw"), "format": repr(spec),
              **({"number_labels": "a file's numbers that are all labels read as labels"}
                 if _number_names(spec.label_names) else {})}
    with atomic_dir(out_dir) as tmp:
        write_examples(result.examples, tmp / EXAMPLES)
        write_preferences(result.preferences, tmp / PREFERENCES)
        write_jsonl(result.quarantine, tmp / QUARANTINE)
        produced = {"examples": EXAMPLES, "preferences": PREFERENCES, "quarantine": QUARANTINE}
        Result("raw_examples", reuse_key(inputs), produced, inputs, summary).write(tmp)
    return {**summary, "quarantine": result.quarantine}


def unusable_files_line(unusable: list[str], quarantine: list[dict[str, Any]], path: Path) -> str:
    """One line on the raw files of which every row went to the quarantine (`unusable`): each one's first reason (a
    mapping's hint among them, so every file's is said at once), what to do, and where every reason is (`path`, the
    quarantine file)."""
    firsts = [next(row for row in quarantine if source_file(row["source"]) == name)
              for name in unusable]
    reasons = "; ".join(f"{row['source']}: {row['reason']}" for row in firsts)
    return (f"every row of {', '.join(unusable)} went to the quarantine, e.g. {reasons}; mend the "
            f"{'files or their mappings' if len(unusable) > 1 else 'file or its mapping'} (data.columns, data.files), "
            f"or take {'them' if len(unusable) > 1 else 'it'} out of raw/ (every reason in {path})")


def _quarantine_odd_shapes(result: ReadResult, shape_problems: Callable[[list[str]], list[str | None]]) -> None:
    """Move the examples whose answers depart from the form of the others' to the quarantine: the answer first (before
    a long system prompt the row may start with), then the row as its file holds it."""
    answers = [row["messages"][-1]["content"] for row in result.examples]
    problems = shape_problems(answers)
    odd = [(row, answer, problem) for row, answer, problem in zip(result.examples, answers, problems) if problem]
    raw = _raw_rows(result.paths, {row["source"] for row, _, _ in odd})
    for row, answer, problem in odd:
        _quarantine(result, row["source"], problem, {"answer": answer, "row": raw.get(row["source"])})
    result.examples = [row for row, problem in zip(result.examples, problems) if not problem]


def _raw_rows(paths: dict[str, Path], sources: set[str]) -> dict[str, Any]:
    """The rows of `sources` (`file:location`) as their files hold them, read again (a few rows: their files only)."""
    found = {}
    for name in {source_file(source) for source in sources}:
        found |= {f"{name}:{location}": row for location, row, _ in iter_file_rows(paths[name])
                  if f"{name}:{location}" in sources}
    return found


def _raw_version(raw_dir: Path) -> str:
    """A hash of the names and contents of the files read from `raw_dir`."""
    supported, _ = list_raw_files(raw_dir)
    return sha256_of_files([p for p in supported if p.is_file()], raw_dir)[:16]
