"""Preference rows: a prompt with a preferred and a dispreferred answer (paired, for dpo and orpo), or with one
answer marked desirable or not (unpaired, for kto).

Canonical preference row (what `raw_examples` writes to `preferences.parquet`, beside the chat examples):
``{"id", "prompt": [{"role", "content"}, ...] (ends with a user turn), "chosen", "rejected", "completion", "label",
"source"}``; a paired row has `chosen` and `rejected` (`completion` and `label` null), an unpaired row has
`completion` and `label` (true = desirable; `chosen` and `rejected` null).
"""

from __future__ import annotations

import re
from difflib import get_close_matches
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from ftpipe.core.readable import plural
from ftpipe.core.records import (
    MESSAGE_TYPE, BadRow, FormatSpec, check_mapped_columns, check_size, example_id, message_list, optional_text,
    text_field, type_name, with_system_prompt,
)
from ftpipe.core.text import canonical
from ftpipe.core.training.methods import UNPAIRED_OBJECTIVES

OWN_COLUMNS = {name: name for name in ("prompt", "chosen", "rejected", "completion", "label")}
LABELS = {"true": True, "1": True, "false": False, "0": False}  # JSON and CSV spellings of a label
TRANSCRIPT_TURN = re.compile(r"(?:^|\n\n)(Human|Assistant): ?")  # Anthropic HH-RLHF's "\n\nHuman: …\n\nAssistant: …"
TRANSCRIPT_ROLES = {"Human": "user", "Assistant": "assistant"}
RATINGS = ("score_chosen", "score_rejected")  # UltraFeedback's ratings of a pair's two answers

PREFERENCE_SCHEMA = pa.schema([
    ("id", pa.string()), ("prompt", MESSAGE_TYPE), ("chosen", pa.string()), ("rejected", pa.string()),
    ("completion", pa.string()), ("label", pa.bool_()), ("source", pa.string()),
])


def is_paired(row: dict[str, Any]) -> bool:
    return row["chosen"] is not None


def missing_preference_rows(objective: str, path: Path) -> str | None:
    """Why the preference `objective` has nothing to train on in the preference rows of `path`; None when it has."""
    rows = read_preferences(path)
    if objective in UNPAIRED_OBJECTIVES and not rows:
        return f"{objective} trains on preference rows, and {path} has none"
    if objective not in UNPAIRED_OBJECTIVES and not any(map(is_paired, rows)):
        return (f"{objective} trains on paired preference rows (prompt, chosen, rejected), and {path} has none; add "
                "pairs, or use kto for rows with a completion and a label")
    return None


def missing_split_rows(objective: str, train_path: Path, eval_path: Path, eval_fraction: float) -> str | None:
    """Why the preference `objective` cannot train on the held-out split's preference files (`missing_preference_rows`
    of the first without rows it trains on); where only the eval file lacks them, that the split held none out."""
    if (problem := missing_preference_rows(objective, train_path)) or not missing_preference_rows(objective, eval_path):
        return problem
    kind = "preference row" if objective in UNPAIRED_OBJECTIVES else "pair"
    count = sum(objective in UNPAIRED_OBJECTIVES or is_paired(row) for row in read_preferences(train_path))
    return (f"{objective} is evaluated on held-out {kind}s, and the split held none out: all {plural(count, kind)} "
            f"landed in train (split.eval_fraction {eval_fraction} holds out that share of rows by their content "
            f"hash, so a few can all land in train); add {kind}s, raise split.eval_fraction or change split.seed")


def unpaired_left_out(objective: str | None, train: int, held_out: int) -> str | None:
    """One line on the unpaired preference rows (`train` and `held_out` of them) a paired `objective` trains and is
    evaluated without; None where there are none, or the objective reads them."""
    if objective is None or objective in UNPAIRED_OBJECTIVES or not train + held_out:
        return None
    rows = train + held_out
    return (f"{plural(rows, 'preference row')} ({held_out} held out) {'is' if rows == 1 else 'are'} unpaired (a "
            f"completion and a label): {objective} trains and is evaluated on pairs (chosen and rejected) only, so it "
            "leaves them out; kto trains on both kinds")


def write_preferences(rows: list[dict[str, Any]], path: Path) -> None:
    """Write canonical preference rows as Parquet (deterministic bytes for the same rows; none is an empty file)."""
    pq.write_table(pa.Table.from_pylist(rows, schema=PREFERENCE_SCHEMA), path)


def read_preferences(path: Path) -> list[dict[str, Any]]:
    """The rows of a preferences file; none when the file does not exist."""
    return pq.read_table(path).to_pylist() if Path(path).is_file() else []


def to_preference(row: Any, spec: FormatSpec, source: str) -> dict[str, Any] | None:
    """The canonical preference row of a raw row, None when it is not one (a chat example), or BadRow with the reason.

    A preference row is recognised by its own keys (`chosen` or `rejected`; `prompt` and `label`), else by the
    columns mapped in data.columns (`chosen` or `rejected`; `label`). Configured formats other than auto and
    columns read chat examples only. A row that also holds another kind's answer (`messages`, or a pair's
    `completion`) is refused rather than read as one kind with the rest dropped. A pair's `chosen` and `rejected` may
    hold whole conversations, whose shared start is the prompt (`_conversation_pair`).
    """
    naming = _naming(row, spec) if isinstance(row, dict) and spec.format in ("auto", "columns") else None
    if naming is None:
        if isinstance(row, dict) and spec.format in ("auto", "columns"):
            _check_label_spelling(row, spec)
        return None
    paired, columns = naming
    copy = row.get(columns["chosen"]) if paired else None  # UltraFeedback's `messages`: the chosen conversation again
    other = [name for name in ("messages", *([columns["completion"]] if paired else []))
             if row.get(name) not in (None, "", copy)]  # another kind's answer in the same row
    if other:
        kind = "a preference pair" if paired else "a single answer with its label"
        raise BadRow(f"holds {kind} and {' and '.join(repr(name) for name in other)} too: one row is one example; "
                     "write each as a row of its own")
    if paired:
        _check_ratings(row)
    if columns is not OWN_COLUMNS:  # named by the mapping: every mapped column its kind reads is in the file
        read = ("prompt", "system", *(("chosen", "rejected") if paired else ("completion", "label")))
        check_mapped_columns(row, {field: spec.columns[field] for field in read if field in spec.columns},
                             spec.columns_setting)
    if paired and (conversations := _conversation_pair(row, columns)):
        prompt, answers = conversations
    else:
        system = optional_text(row.get(columns["system"]), columns["system"]) if "system" in columns else None
        prompt = _prompt(_value(row, columns, "prompt"), columns["prompt"], system)
        answers = _paired_answers(row, columns) if paired else _unpaired_answer(row, columns)
    prompt = with_system_prompt(prompt, spec.system_prompt)
    check_size([*(m["content"] for m in prompt), *(a for a in answers.values() if isinstance(a, str))])
    fields = {"prompt": prompt, "chosen": None, "rejected": None, "completion": None, "label": None, **answers}
    return {"id": example_id(list(fields.values())), **fields, "source": source}


def _naming(row: dict[str, Any], spec: FormatSpec) -> tuple[bool, dict[str, str]] | None:
    """(paired, the column of each field) when `row` is a preference row: by its own keys, else by the mapping.
    An unmapped `label` never makes a row of mapped columns unpaired (`label` may be an SFT row's answer column).
    A row of a file that holds both kinds, whose `chosen` and `rejected` are empty (null, or an empty CSV cell), is
    unpaired when it has a `label`. A row with a mapped column in place of a field's own name (`rejected: rejcted`)
    is read by the mapping."""
    renamed = any(column in row and field not in row for field, column in spec.columns.items() if field in OWN_COLUMNS)
    for columns in (OWN_COLUMNS, {**OWN_COLUMNS, **spec.columns})[renamed:]:
        pair = [columns[side] for side in ("chosen", "rejected") if columns[side] in row]
        unpaired = columns["label"] in row and columns["prompt"] in row and (
            columns is OWN_COLUMNS or "label" in spec.columns)
        if pair and not (unpaired and all(row[name] in (None, "") for name in pair)):
            return True, columns
        if unpaired:
            return False, columns
    return None


def _check_label_spelling(row: dict[str, Any], spec: FormatSpec) -> None:
    """BadRow where a row of a prompt and a completion has, in place of `label`, a column spelt like it that holds
    true or false: an unpaired preference row whose label column is misspelt, not an SFT example to learn."""
    columns = {**OWN_COLUMNS, **spec.columns}
    if columns["completion"] not in row or columns["label"] in row:
        return
    for key in get_close_matches(columns["label"], [str(key) for key in row if key not in columns.values()], n=3):
        value = row[key]
        if isinstance(value, bool) or str(value).strip().lower() in ("true", "false"):
            raise _misspelt_field(columns["label"], "label", key, f" ({value!r:.10})",
                                  " as an unpaired preference row")


def _check_ratings(row: dict[str, Any]) -> None:
    """BadRow where a pair's own ratings (`RATINGS`, numbers or their text) tie, so the pair states no preference, or
    rate the rejected answer higher; nothing where the row has no such ratings."""
    chosen, rejected = (_rating(row.get(name)) for name in RATINGS)
    if chosen is None or rejected is None:
        return
    if chosen == rejected:
        raise BadRow("fields 'score_chosen' and 'score_rejected' are equal: a tie states no preference")
    if chosen < rejected:
        raise BadRow("field 'score_rejected' is above 'score_chosen': the pair prefers its rejected answer (swap them, "
                     "or leave the pair out)")


def _rating(value: Any) -> float | None:
    if isinstance(value, bool) or not isinstance(value, (int, float, str)):
        return None
    try:
        return float(value)
    except ValueError:
        return None


def _prompt(value: Any, name: str, system: str | None) -> list[dict[str, str]]:
    """The prompt as messages ending with a user turn: a text (the user's turn) or a list of messages."""
    if not isinstance(value, list):
        return with_system_prompt([{"role": "user", "content": text_field(value, name)}], system)
    messages = message_list(value, name)
    last = messages[-1]["role"]
    if last != "user":
        raise BadRow(f"field '{name}' must end with a user message, but its last message has role '{last}'")
    return messages


def _answer(value: Any, name: str) -> str:
    """An answer's text: a text, an assistant message, or a list holding one (TRL's conversational form)."""
    if isinstance(value, dict):
        value = [value]
    if not isinstance(value, list):
        return text_field(value, name)
    if len(value) != 1:
        raise BadRow(f"field '{name}' must hold one assistant message, got a list of {len(value)}")
    (message,) = message_list(value, name)
    if message["role"] != "assistant":
        raise BadRow(f"field '{name}' must be an assistant message, but it has role '{message['role']}'")
    return message["content"]


def _value(row: dict[str, Any], columns: dict[str, str], field: str) -> Any:
    """The row's value of `field` (in its column); BadRow naming a close spelling when the row lacks the column."""
    name = columns[field]
    others = [str(key) for key in row if key not in columns.values()]
    if name not in row and (close := get_close_matches(name, others, n=1)):
        raise _misspelt_field(name, field, close[0])
    return row.get(name)


def _misspelt_field(name: str, field: str, column: str, shown: str = "", reading: str = "") -> BadRow:
    """The reason of a row that lacks column `name` (of `field`) but has `column`, spelt like it (its value `shown`):
    the mapping that reads it (as `reading`)."""
    return BadRow(f"field '{name}' is missing, and the row has '{column}'{shown}: misspelt? (data.columns: "
                  f"{{{field}: {column}}} reads it{reading})")


def _conversation_pair(row: dict[str, Any], columns: dict[str, str]) -> tuple[list[dict], dict[str, str]] | None:
    """(prompt, answers) when `chosen` and `rejected` hold whole conversations, each ending with its answer: the
    prompt is the conversation before the answers, which both must share (TRL's implicit-prompt form; UltraFeedback's,
    with `prompt` its last user message; HH-RLHF's transcripts). None when they hold their answers alone."""
    names = {side: columns[side] for side in ("chosen", "rejected")}
    wholes = {side: _whole_conversation(row.get(name), name) for side, name in names.items()}
    if not any(wholes.values()):
        return None
    conversations = {side: _conversation(wholes[side] or _value(row, columns, side), name)
                     for side, name in names.items()}
    prompt = conversations["chosen"][:-1]
    if conversations["rejected"][:-1] != prompt:
        raise BadRow(f"fields '{names['chosen']}' and '{names['rejected']}' hold conversations that differ before "
                     "their answers: a pair answers one prompt")
    given = row.get(columns["prompt"])
    stated = message_list(given, columns["prompt"]) if isinstance(given, list) else given
    if stated not in (None, "", prompt, prompt[-1]["content"]):
        raise BadRow(f"field '{columns['prompt']}' is neither the conversation in '{names['chosen']}' and "
                     f"'{names['rejected']}' before their answers nor its last user message")
    return prompt, _distinct(conversations["chosen"][-1]["content"], conversations["rejected"][-1]["content"], names)


def _whole_conversation(value: Any, name: str) -> list | None:
    """`value` (of field `name`) as a list of messages when it holds a whole conversation: a list of several, or an
    HH-RLHF transcript of a human turn and the assistant's answer at least; else None. BadRow for a transcript's
    empty turn, named by its number (a transcript has no list to index)."""
    if isinstance(value, list):
        return value if len(value) > 1 else None
    parts = TRANSCRIPT_TURN.split(value) if isinstance(value, str) else []
    if len(parts) < 5 or parts[0].strip():
        return None
    turns = list(zip(parts[1::2], parts[2::2]))
    if empty := [number for number, (_, text) in enumerate(turns, 1) if not text.strip()]:
        role = turns[empty[0] - 1][0]
        raise BadRow(f"field '{name}' holds a transcript whose turn {empty[0]} of {len(turns)} ({role}:) is empty")
    return [{"role": TRANSCRIPT_ROLES[role], "content": text.strip()} for role, text in turns]


def _conversation(value: Any, name: str) -> list[dict[str, str]]:
    """The messages of a whole conversation in field `name`, which ends with a user message and the answer."""
    messages = message_list(value, name)
    if len(messages) < 2 or [message["role"] for message in messages[-2:]] != ["user", "assistant"]:
        raise BadRow(f"field '{name}' holds a conversation, which must end with a user message and the assistant's "
                     "answer")
    return messages


def _paired_answers(row: dict[str, Any], columns: dict[str, str]) -> dict[str, str]:
    chosen = _answer(_value(row, columns, "chosen"), columns["chosen"])
    rejected = _answer(_value(row, columns, "rejected"), columns["rejected"])
    return _distinct(chosen, rejected, columns)


def _distinct(chosen: str, rejected: str, columns: dict[str, str]) -> dict[str, str]:
    """The pair's answers; BadRow when they are one answer."""
    if canonical(chosen) == canonical(rejected):
        names = f"'{columns['chosen']}' and '{columns['rejected']}'"
        raise BadRow(f"fields {names} are the same answer after normalisation")
    return {"chosen": chosen, "rejected": rejected}


def _unpaired_answer(row: dict[str, Any], columns: dict[str, str]) -> dict[str, Any]:
    return {"completion": _answer(_value(row, columns, "completion"), columns["completion"]),
            "label": _label(_value(row, columns, "label"), columns["label"])}


def _label(value: Any, name: str) -> bool:
    """A label as a boolean: true or false, or their JSON and CSV spellings 1, 0, "true", "false", "1", "0" (and 1.0
    and 0.0, as pandas writes an integer column with gaps)."""
    if isinstance(value, bool):
        return value
    if isinstance(value, float) and value in (0.0, 1.0):
        return value == 1.0
    spelling = str(value).strip().lower() if isinstance(value, (int, str)) else None
    if spelling not in LABELS:
        shown = "null" if value is None else f"{type_name(value)} {value!r:.60}"
        raise BadRow(f"field '{name}' must be a boolean (true or false), got {shown}")
    return LABELS[spelling]


def as_chat(row: dict[str, Any]) -> dict[str, Any]:
    """A preference row as a chat example (its prompt, then its chosen or only answer), for what compares prompts:
    similarity, the split's hash."""
    answer = row["chosen"] if is_paired(row) else row["completion"]
    return {"id": row["id"], "messages": [*row["prompt"], {"role": "assistant", "content": answer}],
            "source": row["source"]}
