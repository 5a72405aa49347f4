"""Corrections of served answers become training rows: a correction names a logged request and gives the right
output; the request's conversation with that output is appended to the task's `raw/feedback.jsonl`, with its
provenance, and the data-change automation and retraining policy take it from there.

Corrections arrive through the server (`POST /v1/feedback`) or as JSON-lines files dropped in the task's
`feedback/` folder (`{"request_id": ..., "output": ...}` per line; `messages` too when the task's log keeps no
content); the production report applies dropped files and moves them to `feedback/applied/`. A label none of the
task's rows has yet may be a typo, and so may an extraction category none has (an `issue`, not an order id): its
correction is refused unless it says `"new_label": true`."""

from __future__ import annotations

import json
import os
import time
from collections.abc import Callable
from difflib import get_close_matches
from functools import lru_cache
from pathlib import Path
from typing import Any

import pyarrow.parquet as pq

from ftpipe.config import EvaluationConfig
from ftpipe.core.dedup import comparable_answer
from ftpipe.core.evaluation.metrics import answer_problem, label_reader, shape_check, task_metrics
from ftpipe.core.evaluation.metrics.base import first_json_object
from ftpipe.core.evaluation.metrics.extraction import category_values, new_category
from ftpipe.core.layout import TaskLayout
from ftpipe.core.records import FEEDBACK_FILE, BadRow, message_list, with_system_prompt
from ftpipe.core.results import read_result
from ftpipe.core.server.request_log import CLIENT_CLOSED, find_record, read_records
from ftpipe.core.storage import exclusive, task_dir, write_text
from ftpipe.core.tasks import split_system_prompt, task_config
from ftpipe.core.text import label_key

APPLIED = "applied"
ADDED, CONFIRMED, UNCHANGED, REPLACED = "added", "confirmed", "unchanged", "replaced"


class FeedbackError(ValueError):
    """A correction that cannot become a row, with the reason in one line."""


def feedback_dir(task: str) -> Path:
    return task_dir(task) / "feedback"


def add_feedback(task: str, request_id: str, output: str, messages: list[dict[str, str]] | None = None,
                 logged: dict[str, dict[str, Any]] | None = None,
                 new_label: bool = False) -> tuple[dict[str, Any], str]:
    """Append the logged request `request_id` answered with `output` to the task's raw data, with the system prompt most
    train rows carry when the conversation had none (the model answered with it); returns (the row, what happened:
    ADDED, CONFIRMED (added, giving the answer that was served), UNCHANGED or REPLACED). An `output` the task type
    cannot use as an answer is refused, and so is one in another form than the task's cleaned answers share (cleaning
    would quarantine it), and one with a label (or extraction category) no row of the task has yet, unless `new_label`.
    `messages` stand in for a request logged without content; `logged` holds the log's records by request id (the
    log is searched when not given). The output is kept without surrounding whitespace."""
    if not isinstance(output, str) or not output.strip():
        raise FeedbackError("output: the corrected answer must be a non-empty string")
    output = output.strip()  # "label " and "label" are one answer
    if problem := _answer_problem(task, output) or _odd_shape(task, output):
        raise FeedbackError(f"output: {problem}")
    if not new_label and (problem := _unknown_label(task, output) or _new_category(task, output)):
        raise FeedbackError(f"output: {problem}")
    found = find_record(task, request_id) if logged is None else logged.get(request_id)
    if found is None:
        raise FeedbackError(f"request_id: {request_id!r} is not in the request log of task {task!r}")
    if 400 <= found.get("status", 200) < CLIENT_CLOSED:
        raise FeedbackError(f"request_id: {request_id!r} was refused ({found['status']}: {found.get('error')}), so "
                            "no answer was served to correct")
    conversation = _checked(messages) if messages is not None else found["messages"]
    if not isinstance(conversation, list):
        raise FeedbackError(f"messages: task {task!r} logs no content, so the correction must bring the messages")
    system = split_system_prompt(task)[0]  # data.system_prompt, when set, is added by cleaning as to every row
    conversation = _checked([*with_system_prompt(conversation, system), {"role": "assistant", "content": output}])
    row = {"messages": conversation, "feedback_for": request_id, "served_by": f"{found['model']} v{found['version']}",
           "served_output": found["output"], "corrected_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
    with exclusive(feedback_dir(task)):  # the server's threads and the production report may add at once
        row, outcome = _record(task_dir(task) / "raw" / FEEDBACK_FILE, row)
    return row, CONFIRMED if outcome == ADDED and confirms(row, same_answer(_evaluation(task))) else outcome


def _evaluation(task: str) -> EvaluationConfig | None:
    """The task's evaluation settings; None when task.yaml does not read (mid-edit: a correction is not lost for it,
    and cleaning checks the row when it reads the raw files)."""
    try:
        return task_config(task).evaluation
    except (OSError, ValueError):
        return None


def same_answer(evaluation: EvaluationConfig | None) -> Callable[[str, str], bool]:
    """Whether two answers are the same answer to the task of these `evaluation` settings: a JSON object by its
    value, a bare label (classification without `label_field`) in any spelling, any other answer as written
    (surrounding whitespace aside; as written too without settings)."""
    bare_labels = evaluation is not None and label_reader(evaluation) is not None and not evaluation.label_field

    def same(one: str, other: str) -> bool:
        return (comparable_answer(one.strip()) == comparable_answer(other.strip())
                or bare_labels and label_key(one) == label_key(other))
    return same


def confirms(row: dict[str, Any], same: Callable[[str, str], bool]) -> bool:
    """Whether a correction row gives the answer that was served (`same`: `same_answer`): a confirmation, which trains
    as any row does but corrects nothing."""
    served = row.get("served_output")
    return isinstance(served, str) and same(served, row["messages"][-1]["content"])


def _checked(messages: Any) -> list[dict[str, str]]:
    """`messages` as a row's messages are read (`records.message_list`), or the FeedbackError of the row that
    `raw_examples` would quarantine."""
    try:
        return message_list(messages, "messages")
    except BadRow as error:
        raise FeedbackError(f"messages: {error}") from None


def _answer_problem(task: str, output: str) -> str | None:
    """Why the task type could not use `output` as an answer (extraction: not a JSON object); None when it could, or
    when task.yaml does not read (mid-edit: `raw_examples` quarantines such a row when it reads it)."""
    evaluation = _evaluation(task)
    return answer_problem(evaluation)(output) if evaluation else None


def _odd_shape(task: str, output: str) -> str | None:
    """How `output` departs from the form the answers of the task's cleaned rows share (extraction: their fields and
    the fields' JSON types), as cleaning says it of a raw row; None when it does not, or when the task type checks no
    form or there are no cleaned rows yet."""
    evaluation = _evaluation(task)
    cleaned = TaskLayout(task).examples("deduplicated_examples")
    if evaluation is None or not task_metrics(evaluation).shape_rule or not cleaned.is_file():
        return None
    return _cleaned_shape(cleaned, cleaned.stat().st_mtime_ns, evaluation.model_dump_json())(output)


@lru_cache(maxsize=8)
def _cleaned_shape(cleaned: Path, version: int, evaluation: str) -> Callable[[str], str | None]:
    """`shape_check` of the answers in `cleaned` at `version` (its mtime) under the `evaluation` settings (JSON):
    built once for a dropped file's corrections and the server's, until cleaning writes the file again."""
    return shape_check(EvaluationConfig.model_validate_json(evaluation), _cleaned_answers(cleaned, version))


@lru_cache(maxsize=8)
def _cleaned_categories(cleaned: Path, version: int) -> dict[str, set[str]]:
    return category_values(_cleaned_answers(cleaned, version))


@lru_cache(maxsize=2)
def _cleaned_answers(cleaned: Path, version: int) -> list[str]:
    """The answers of the rows in `cleaned` at `version` (its mtime)."""
    conversations = pq.read_table(cleaned, columns=["messages"])["messages"].to_pylist()
    return [messages[-1]["content"] for messages in conversations]


def _new_category(task: str, output: str) -> str | None:
    """What is wrong with an extraction answer's value of a field that holds categories (`category_values`) when no
    cleaned row nor earlier correction gives it: likely a typo (None when one does, or there is nothing to compare)."""
    evaluation = _evaluation(task)
    cleaned = TaskLayout(task).examples("deduplicated_examples")
    if evaluation is None or evaluation.task_type != "extraction" or not cleaned.is_file():
        return None
    known = _cleaned_categories(cleaned, cleaned.stat().st_mtime_ns)
    corrected = [first_json_object(row["messages"][-1]["content"]) or {} for row in corrections(task)]
    given = {key: values | {answer[key] for answer in corrected if isinstance(answer.get(key), str)}
             for key, values in known.items()}  # a correction's null or number is no category
    found = new_category(given, output)
    if found is None:
        return None
    key, value, close = found
    return (f"{key} {value!r} is new to task {task!r}" + (f" (did you mean {close[0]!r}?)" if close else "")
            + f"; its rows give {len(known[key])} values of {key}; send \"new_label\": true to add it as a new one")


def _unknown_label(task: str, output: str) -> str | None:
    """What is wrong with `output`'s label when no row of the task has it yet, in cleaning's last count or among the
    corrections since (None when one has, or the task has no labels or no cleaned rows to compare with)."""
    evaluation = _evaluation(task)
    label_of = label_reader(evaluation) if evaluation else None
    cleaned = read_result(TaskLayout(task).asset("deduplicated_examples"), "deduplicated_examples")
    label = label_of(output) if label_of else None
    if label is None or cleaned is None:
        return None
    corrected = [row["messages"][-1]["content"] for row in corrections(task)]
    known = {label_key(name): name for name in [*map(label_of, corrected), *cleaned.metadata["removed_by_label"]]
             if name}  # the cleaned rows' spelling of a label, before a correction's
    if label_key(label) in known:
        return None
    close = get_close_matches(label_key(label), list(known), n=1)
    return (f"label {label!r} is new to task {task!r}" + (f" (did you mean {known[close[0]]!r}?)" if close else "")
            + f"; its rows have {len(known)} labels; send \"new_label\": true to add it as a new one")


def corrections(task: str) -> list[dict[str, Any]]:
    """The task's correction rows (`raw/feedback.jsonl`), in the order they were written."""
    return [json.loads(line) for line in _lines(task_dir(task) / "raw" / FEEDBACK_FILE)]


def _lines(path: Path) -> list[str]:
    """The non-blank lines of `path` (none when it does not exist)."""
    return [line for line in path.read_text(encoding="utf-8").splitlines() if line.strip()] if path.is_file() else []


def _record(path: Path, row: dict[str, Any]) -> tuple[dict[str, Any], str]:
    """The correction's row in `path` and what happened: appended (ADDED); the row already there when the same
    correction came before, a JSON answer in any key order or spacing (UNCHANGED); or in place of an earlier
    correction of the same request (REPLACED: the later one stands, rather than two answers that would contradict
    each other)."""
    lines = _lines(path)
    earlier = [number for number, line in enumerate(lines) if json.loads(line).get("feedback_for") == row["feedback_for"]]
    if not earlier:
        _append(path, row)
        return row, ADDED
    before = json.loads(lines[earlier[-1]])
    if [*map(_compared, before["messages"])] == [*map(_compared, row["messages"])]:
        return before, UNCHANGED
    kept = [line for number, line in enumerate(lines) if number not in earlier]
    write_text(path, "".join(f"{line}\n" for line in [*kept, json.dumps(row, ensure_ascii=False)]))
    return row, REPLACED


def _compared(message: dict[str, str]) -> dict[str, str]:
    """A message as cleaning compares answers: a JSON object by its value (`dedup.comparable_answer`)."""
    return {**message, "content": comparable_answer(message["content"])}


def _append(path: Path, row: dict[str, Any]) -> None:
    """One whole line per row, on disk before returning."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("a", encoding="utf-8") as handle:
        handle.write(json.dumps(row, ensure_ascii=False) + "\n")
        handle.flush()
        os.fsync(handle.fileno())


def apply_dropped_feedback(task: str) -> tuple[int, list[str]]:
    """Add the corrections in the `*.jsonl` files dropped in the task's `feedback/` folder, then move each file to
    `feedback/applied/` (under a free name); returns (rows added or replaced, one line per correction refused: file,
    line and reason, and one per other file, left in place)."""
    folder = feedback_dir(task)
    dropped = sorted(p for p in folder.iterdir() if p.is_file()) if folder.is_dir() else []
    files = [p for p in dropped if p.suffix == ".jsonl"]
    refused = [f"{p.name}: not a .jsonl file (one correction a line), left where it is"
               for p in dropped if p not in files and not p.name.startswith(".")]
    logged = {record["request_id"]: record for record in read_records(task)} if files else {}
    changed = 0
    for path in files:
        for number, line in enumerate(path.read_text(encoding="utf-8-sig").splitlines(), start=1):
            if line.strip():
                try:
                    changed += _apply_line(task, line, logged) != UNCHANGED
                except FeedbackError as error:
                    refused.append(f"{path.name}:{number}: {error}")
        path.rename(_free_name(folder / APPLIED, path.name))
    return changed, refused


def _apply_line(task: str, line: str, logged: dict[str, dict[str, Any]]) -> str:
    """What one line of a dropped file did (ADDED, CONFIRMED, UNCHANGED, REPLACED); FeedbackError says why it could
    not."""
    try:
        item = json.loads(line)
    except json.JSONDecodeError as error:
        raise FeedbackError(f"not valid JSON ({error})") from None
    if not isinstance(item, dict):
        raise FeedbackError('not a JSON object: {"request_id": "...", "output": "..."}')
    if not isinstance(item.get("request_id"), str):
        raise FeedbackError("request_id: missing: the id of the served answer it corrects (the response's `id`)")
    return add_feedback(task, item.get("request_id"), item.get("output"), item.get("messages"), logged,
                        new_label=item.get("new_label") is True)[1]


def _free_name(folder: Path, name: str) -> Path:
    """`folder/name`, or `folder/<stem>.2.jsonl`, `.3`, ... when taken: an applied file is never overwritten."""
    folder.mkdir(exist_ok=True)
    path, stem, number = folder / name, Path(name).stem, 1
    while path.exists():
        number += 1
        path = folder / f"{stem}.{number}{Path(name).suffix}"
    return path
