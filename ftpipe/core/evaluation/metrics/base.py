"""What every task type provides: per-row scores, a primary metric, a check of the references it can read, and
optional extras (a label set to rank by log-likelihood or to constrain answers to, final answers to check, groups
for picking few-shot examples, report sections)."""

from __future__ import annotations

import json
import re
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from difflib import get_close_matches
from typing import Any, ClassVar

from ftpipe.config import EvaluationConfig


def mean(values: list[float]) -> float:
    return sum(values) / len(values) if values else 0.0


def json_object_span(text: str) -> tuple[dict, int, int] | None:
    """The first `{...}` in `text` that parses as a JSON object, with where it starts and ends."""
    decoder = json.JSONDecoder()
    for match in re.finditer(r"\{", text):
        try:
            value, end = decoder.raw_decode(text, match.start())
        except json.JSONDecodeError:
            continue
        if isinstance(value, dict):
            return value, match.start(), end
    return None


def first_json_object(text: str) -> dict | None:
    """The first `{...}` in `text` that parses as a JSON object (text around it is ignored)."""
    found = json_object_span(text)
    return found[0] if found else None


def missing_field(answer: str, field: str, setting: str) -> str:
    """Why `answer` gives no value in its JSON object's `field` (the task.yaml `setting` that names it), with the key
    it gives instead where one looks like a misspelling, or that it holds no JSON object at all."""
    found = first_json_object(answer)
    if found is None:
        return f"is not a JSON object, so it has no field {field!r} ({setting}; plain answers: leave it unset)"
    if field in found:
        return f"gives nothing usable in its JSON field {field!r} ({json.dumps(found[field])}; {setting})"
    instead = misspelt_key(field, [key for key in found if key != field])
    return f"has no JSON field {field!r} ({setting}{f'; {instead}' if instead else ''})"


def misspelt_key(field: str, keys: list[str]) -> str:
    """`it gives 'priorty': misspelt?` for the one of an object's other `keys` written most like `field`; else ''."""
    close = get_close_matches(field, keys, n=1)
    return f"it gives {close[0]!r}: misspelt?" if close else ""


def first_object_end(text: str) -> int | None:
    """Where the JSON object opened by the first `{` of `text` closes (None: no `{`, not closed yet, or not JSON).
    Text after it cannot change what `first_json_object` finds."""
    start = text.find("{")
    try:
        return json.JSONDecoder().raw_decode(text, start)[1] if start >= 0 else None
    except json.JSONDecodeError:
        return None


@dataclass(frozen=True)
class AnswerEnd:
    """Where an answer being generated is complete as far as every score of its task type goes: `find(text so far)`
    is that position, None while it is not; generation stops and the answer is cut there, `mark` added to say so.
    `key` names the rule and what it depends on (the per-row cache keeps answers by it)."""

    key: Any
    find: Callable[[str], int | None]
    mark: str = ""

    def __call__(self, text: str) -> int | None:
        return self.find(text)

    def cut(self, text: str) -> str:
        """`text` as kept: up to where it is complete, with the mark, or whole while it is not."""
        end = self.find(text)
        return text if end is None else text[:end] + self.mark


FIRST_JSON_OBJECT = AnswerEnd("first JSON object", first_object_end)


Resampled = Callable[[Any], Any]  # an index matrix (resamples × rows, numpy) -> the metric of each resample


@dataclass(frozen=True)
class Scores:
    """`rows`: per-row score lists by metric name; `resampled`: metrics of the whole set of rows that are no mean of
    per-row scores (macro-F1), each a `Resampled`; `extra`: summary-only values; `labels`: each row's label as the
    references write it (None when unreadable), for task types that have labels; `final_answers`: each row's
    extracted final answer, when the task checks final answers."""

    rows: dict[str, list[float]]
    resampled: dict[str, Resampled] = field(default_factory=dict)
    extra: dict[str, Any] = field(default_factory=dict)
    labels: list[str | None] | None = None
    final_answers: list[str | None] | None = None

    @property
    def summary(self) -> dict[str, Any]:
        """Every metric's value: the mean of each per-row metric, each resampled metric on all rows once, then the
        summary-only values."""
        import numpy as np

        size = len(next(iter(self.rows.values())))
        whole = np.arange(size)[None]
        return {**{name: mean(values) for name, values in self.rows.items()},
                **{name: float(metric(whole)[0]) for name, metric in self.resampled.items()}, **self.extra}


@dataclass(frozen=True)
class LabelChoices:
    """The label set of a classification, for ranking labels by log-likelihood: `names` (normalised labels of the
    held-out and train rows) and as `written`, each held-out row's expected name, each row's candidate answers
    (one per name, in the row's answer format), and each name's train rows."""

    names: list[str]
    written: list[str]
    expected: list[str]
    candidates: list[list[str]]
    train_rows: dict[str, int] = field(default_factory=dict)

    def without_heldout_rows(self) -> dict[str, int]:
        """The labels (as written) that only train rows have, each with its train rows, the largest first: the
        held-out scores say nothing about them."""
        held = set(self.expected)
        unheld = {written: self.train_rows.get(name, 0) for name, written in zip(self.names, self.written)
                  if name not in held}
        return dict(sorted(unheld.items(), key=lambda item: -item[1]))


class TaskMetrics:
    """One task type's scoring (a subclass per type, registered in `metrics.TASK_TYPES` under `name`)."""

    name: ClassVar[str]
    primary: str  # the metric the gate judges
    labelled: ClassVar[bool] = False  # answers carry a label from a fixed set
    checks_answers: bool = False  # a final answer is extracted from each answer and checked
    compares_to_copy: bool = False  # free text: scored beside a copy of the input (`copy_baseline`)
    compares_to_majority: ClassVar[bool] = False  # labels: scored beside the most common one (`majority_baseline`)
    shape_rule: ClassVar[str] = ""  # what `shape_check` checks, for reuse keys ("": nothing)

    def __init__(self, config: EvaluationConfig):
        self.config = config

    def scores(self, answers: list[str], references: list[str]) -> Scores:
        raise NotImplementedError

    def reference_problem(self, reference: str) -> str | None:
        """Why the metrics cannot read `reference` (None: they can)."""
        return None

    def shape_check(self, references: list[str]) -> Callable[[str], str | None]:
        """How an answer departs from the form nearly all `references` share (None: it does not)."""
        return lambda answer: None

    def group(self, reference: str) -> str:
        """The group of a row for picking varied few-shot examples (one group unless a type has labels)."""
        return ""

    def answer_end(self, references: list[str]) -> AnswerEnd | None:
        """Where this type's answers are complete, given the `references` of the held-out and train rows (None: at
        the model's end of turn)."""
        return None

    def valid_outputs(self, answers: list[str], references: list[str]) -> list[bool]:
        """Per answer, whether it has the form of the task's answers (judged against the training `references`)."""
        return [bool(answer.strip()) for answer in answers]

    def label_choices(self, references: list[str], train_references: list[str] = ()) -> LabelChoices | None:
        """The label set to rank by log-likelihood for the held-out `references`, the labels of the train rows'
        included (None: the type has no labels)."""
        return None

    def label_answers(self, references: list[str]) -> list[str] | None:
        """The label set as complete answers, to constrain answers to (None: the type has no labels)."""
        return None

    def final_answer(self, text: str) -> str | None:
        """The final answer extracted from `text`, when the task checks final answers."""
        return None

    def categories(self, references: list[str]) -> dict[str, Counter]:
        """The fields of `references`' answers that hold categories, each with its values' counts (none: the type's
        answers have no such fields)."""
        return {}

    def type_slips(self, references: list[str]) -> list[dict[str, Any]]:
        """The fields of `references`' answers whose values have one JSON type but for a few (none: the type's
        answers have no fields)."""
        return []

    def uncomputed_final_answers(self, references: list[str]) -> list[tuple[int, str, str]]:
        """(index, final answer, the last number before it) of the `references` whose final answer their working
        never writes (none: the type checks no final answer by a pattern)."""
        return []

    def report_sections(self, records: list[dict[str, Any]], sides: dict[str, str]) -> list[tuple[str, str]]:
        """Extra (title, Markdown) report sections built from the prediction records (`sides`: column prefix to
        the model's name in titles)."""
        return []
