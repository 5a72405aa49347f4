"""Classification: the answer is a label (the whole answer, or one JSON field of it). Accuracy (primary) and
macro-F1, a confusion table per model, and the label set: for ranking labels by log-likelihood, and as complete
answers to constrain generation to."""

from __future__ import annotations

import json
import re
from collections import Counter
from collections.abc import Callable
from functools import partial
from typing import Any

from ftpipe.core.evaluation.metrics.base import (
    FIRST_JSON_OBJECT, AnswerEnd, LabelChoices, Resampled, Scores, TaskMetrics, first_json_object, missing_field,
)
from ftpipe.core.evaluation.metrics.extraction import OBJECT_SHAPE_RULE, object_shape_check
from ftpipe.core.readable import plural
from ftpipe.core.text import clipped, counted, label_key, markdown_table

UNPARSEABLE = "(unparseable)"
OTHER_LABEL = "(not a label)"  # in parentheses: no normalised label has them
WIDE_LABELS = 12  # more labels than this: the confusion table lists what each label was confused with instead
OTHER_CHARS = 40
OTHER_SHOWN = 5  # of the answers that are no label, under a confusion table
STOPPED = "…"  # ends a bare-label answer cut where it could no longer become a label


def raw_label(text: str, label_field: str | None = None) -> str | None:
    """The label as written: JSON field `label_field` of the first JSON object when given, else the whole text."""
    if not label_field:
        return text.strip()
    found = first_json_object(text)
    if found is None or found.get(label_field) is None:
        return None
    return str(found[label_field])


def parse_label(text: str, label_field: str | None = None) -> str | None:
    """The label in `text` (see `raw_label`) as `label_key` reads it; None when absent or empty."""
    raw = raw_label(text, label_field)
    return (label_key(raw) or None) if raw is not None else None


def may_become_a_label(text: str, labels: tuple[str, ...]) -> bool:
    """Whether more text could still make `text` one of `labels` (each a `label_key`): its key so far starts one."""
    key = label_key(text)
    return any(label.startswith(key) for label in labels)


def past_the_labels(text: str, labels: tuple[str, ...]) -> int | None:
    """Where `text` stops being the start of any of `labels`: from there on it is wrong whatever follows (None while
    it may still become one). Found by bisection: a text past the labels stays past them."""
    if may_become_a_label(text, labels):
        return None
    could, cannot = 0, len(text)
    while cannot - could > 1:
        middle = (could + cannot) // 2
        could, cannot = (middle, cannot) if may_become_a_label(text[:middle], labels) else (could, middle)
    return cannot


def _key(label: str | None) -> str | None:
    return None if label is None else label_key(label)


def most_common(values: list) -> Any:
    """The most frequent value (the smallest of equally frequent ones)."""
    return min(Counter(values).items(), key=lambda item: (-item[1], item[0]))[0]


def resampled_macro_f1(expected: list[str], predicted: list[str | None]) -> Resampled:
    """Macro-F1, the mean F1 over the labels seen in `expected` (a None prediction is wrong for every label), of
    resamples of the rows: an index matrix (resamples × rows), each row counted as often as it is drawn."""
    import numpy as np

    index = {label: i for i, label in enumerate(sorted(set(expected)))}
    one_hot = np.eye(len(index) + 1)[:, :len(index)]  # its last row: an answer that is no held-out label
    truth, said = (one_hot[[index.get(label, len(index)) for label in labels]] for labels in (expected, predicted))
    right = truth * said  # rows × labels

    def metric(resamples):
        times = len(resamples)
        drawn = np.bincount((resamples + len(expected) * np.arange(times)[:, None]).ravel(),
                            minlength=times * len(expected)).reshape(times, len(expected))
        held, answered = drawn @ truth, drawn @ said
        f1 = np.divide(2 * (drawn @ right), held + answered, out=np.zeros_like(held), where=held > 0)
        return f1.sum(axis=1) / (held > 0).sum(axis=1)

    return metric


def confusion_table(expected: list[str], predicted: list[str | None], written: dict[str, str] | None = None) -> str:
    """Markdown counts, reference label × predicted label; answers that are no reference label go to
    `(not a label)`, and are listed under the table. Labels are shown as `written` spells them
    (`Classification.spellings`), else by their normalised name. With more than WIDE_LABELS labels, a row per reference
    label instead (`_confusions`), so the table stays readable."""
    labels = sorted(set(expected))
    shown = written or {}
    if len(labels) > WIDE_LABELS:
        return _confusions(labels, expected, predicted, shown)
    column = [UNPARSEABLE if p is None else p if p in labels else OTHER_LABEL for p in predicted]
    counts = Counter(zip(expected, column))
    columns = labels + [c for c in (OTHER_LABEL, UNPARSEABLE) if c in column or c == UNPARSEABLE]
    rows = [[shown.get(label, label), *(counts[label, c] for c in columns)] for label in labels]
    table = markdown_table(["reference / predicted", *(shown.get(c, c) for c in columns)], rows)
    others = Counter(p for p in predicted if p is not None and p not in labels)
    listed = counted(others, OTHER_SHOWN, OTHER_CHARS, "answers", lambda answer: shown.get(answer, answer))
    return table + (f"\n\n{OTHER_LABEL} holds answers that are no held-out label, most often first: {listed}"
                    if others else "")


def _as_written(answer: str, shown: dict[str, str]) -> str:
    return clipped(shown.get(answer, answer), OTHER_CHARS)


def _confusions(labels: list[str], expected: list[str], predicted: list[str | None], shown: dict[str, str]) -> str:
    """One row per reference label: its rows, how many were right, its precision and F1 (the F1 macro-F1 averages),
    and what was answered instead, most often first (an answer that is no label as it was written, cut to
    OTHER_CHARS characters)."""
    counts = Counter(zip(expected, (UNPARSEABLE if p is None else p for p in predicted)))
    answered = Counter(UNPARSEABLE if p is None else p for p in predicted)

    def row(label: str) -> list[Any]:
        rows, right = sum(n for (e, _), n in counts.items() if e == label), counts[label, label]
        precision = f"{right / answered[label]:.2f}" if answered[label] else "–"  # never answered
        return [shown.get(label, label), rows, right, precision, f"{2 * right / (rows + answered[label]):.2f}",
                ", ".join(f"{_as_written(p, shown)} ×{n}"
                          for (e, p), n in counts.most_common() if e == label and p != label)]

    columns = ["reference", "rows", "right", "precision", "F1", "predicted instead"]
    table = markdown_table(columns, list(map(row, labels)))
    return f"{table}\n\n{_answer_spread(labels, answered, counts, shown)}{_single_rows(expected)}"


def _answer_spread(labels: list[str], answered: Counter, counts: Counter, shown: dict[str, str]) -> str:
    """One line on how many of the held-out labels a model answers at all and how often its commonest whole answer
    (not one STOPPED, whose many different texts share a start), which tells a model that answers one label for most
    rows (a collapse) from one that spreads its mistakes."""
    spread = f"{sum(answered[label] > 0 for label in labels)} of the {len(labels)} held-out labels are answered at all"
    whole = Counter({answer: times for answer, times in answered.items()
                     if answer != UNPARSEABLE and not shown.get(answer, answer).endswith(STOPPED)})
    if not whole:
        return f"{spread}."
    (top, times), total = whole.most_common(1)[0], sum(answered.values())
    right = f", right in {counts[top, top]} of them" if top in labels else ""
    return (f"{spread}; the commonest answer, {_as_written(top, shown)}, is {times} of the {total} answers "
            f"({times / total:.0%}){right}.")


def _single_rows(expected: list[str]) -> str:
    """A sentence on the labels with one held-out row, whose figures one answer decides ("" when none has one)."""
    single = sum(rows == 1 for rows in Counter(expected).values())
    if not single:
        return ""
    has, its = ("has", "its") if single == 1 else ("have", "their")
    return f" {plural(single, 'label')} {has} one held-out row: one answer decides {its} precision and F1."


class Classification(TaskMetrics):
    name = "classification"
    primary = "accuracy"
    labelled = True
    compares_to_majority = True

    @property
    def shape_rule(self) -> str:  # type: ignore[override]
        """Answers that are JSON objects (a `label_field`) keep the fields and types nearly all share, as extraction's
        do: a misspelt or missing field is caught as well as the label."""
        return OBJECT_SHAPE_RULE if self.config.label_field else ""

    def shape_check(self, references: list[str]) -> Callable[[str], str | None]:
        return object_shape_check(references) if self.config.label_field else super().shape_check(references)

    def expected_label(self, reference: str) -> str:
        return parse_label(reference, self.config.label_field) or label_key(reference)

    def answer_end(self, references: list[str]) -> AnswerEnd:
        """With a `label_field`, the first JSON object's closing brace (the label is read from that object only);
        a bare label is the whole answer: where it can no longer become one of the references' labels (a model that
        goes on past the label line, or answers something else, is wrong whatever follows), marked STOPPED."""
        if self.config.label_field:
            return FIRST_JSON_OBJECT
        labels = tuple(sorted({self.expected_label(r) for r in references}))
        return AnswerEnd(["past the labels", labels, STOPPED], partial(past_the_labels, labels=labels), STOPPED)

    def valid_outputs(self, answers: list[str], references: list[str]) -> list[bool]:
        """A label of the training set."""
        labels = {self.expected_label(r) for r in references}
        return [parse_label(answer, self.config.label_field) in labels for answer in answers]

    def scores(self, answers: list[str], references: list[str]) -> Scores:
        """Accuracy and macro-F1 of the labels read from `answers`, each label as the references write it (an answer
        that is no label of theirs as it was written; None when unreadable)."""
        expected = [self.expected_label(r) for r in references]
        predicted = [parse_label(a, self.config.label_field) for a in answers]
        written = self.spellings(references)
        return Scores(rows={"accuracy": [float(p == e) for e, p in zip(expected, predicted)]},
                      resampled={"macro_f1": resampled_macro_f1(expected, predicted)},
                      labels=[None if p is None else written.get(p) or raw_label(a, self.config.label_field)
                              for a, p in zip(answers, predicted)])

    def reference_problem(self, reference: str) -> str | None:
        field = self.config.label_field
        if field and parse_label(reference, field) is None:
            return missing_field(reference, field, "evaluation.label_field")
        return None

    def group(self, reference: str) -> str:
        return self.expected_label(reference)

    def spellings(self, references: list[str]) -> dict[str, str]:
        """Each label of the references (by name, sorted) as the references most often write it."""
        written: dict[str, list[str]] = {}
        for reference in references:
            written.setdefault(self.expected_label(reference), []).append(
                raw_label(reference, self.config.label_field) or reference.strip())
        return {name: most_common(written[name]) for name in sorted(written)}

    def label_choices(self, references: list[str], train_references: list[str] = ()) -> LabelChoices:
        """Every label of the references and of the readable train references; a row's candidates are its
        reference cut right after the label's value, with each label in turn (or the bare label when the whole
        answer is the label)."""
        readable = [reference for reference in train_references if self.reference_problem(reference) is None]
        spelling = self.spellings([*references, *readable])
        written = [self._written(label) for label in spelling.values()]
        candidates = [[before + label for label in written] for before, _ in map(self._around_label, references)]
        return LabelChoices(names=list(spelling), written=list(spelling.values()),
                            expected=[self.expected_label(r) for r in references], candidates=candidates,
                            train_rows=Counter(map(self.expected_label, readable)))

    def label_answers(self, references: list[str]) -> list[str]:
        """One complete answer per label of the references (sorted by name): the label as the references most
        often write it, inside the answer text the references most often have around their label (the JSON
        object, with `label_field`); none without references."""
        if not references:
            return []
        before, after = most_common([self._around_label(reference) for reference in references])
        return [before + self._written(label) + after for label in self.spellings(references).values()]

    def respelled(self, reference: str, spelling: str) -> str:
        """`reference` with its label written as `spelling`, the rest of the answer as it was."""
        before, after = self._around_label(reference)
        return before + self._written(spelling) + after

    def _written(self, label: str) -> str:
        return json.dumps(label, ensure_ascii=False) if self.config.label_field else label

    def _around_label(self, reference: str) -> tuple[str, str]:
        """(text before, text after) the label's value in `reference` (both empty when the whole answer is the
        label; a bare JSON object around it when the field cannot be found)."""
        field = self.config.label_field
        if not field:
            return "", ""
        key = re.search(rf'"{re.escape(field)}"\s*:\s*', reference)
        if key is None:
            return f"{{{json.dumps(field)}: ", "}"
        try:
            _, end = json.JSONDecoder().raw_decode(reference, key.end())
        except json.JSONDecodeError:
            return reference[: key.end()], "}"
        return reference[: key.end()], reference[end:]

    def report_sections(self, records: list[dict[str, Any]], sides: dict[str, str]) -> list[tuple[str, str]]:
        """A confusion table per model, labels as the references write them and other answers as that model wrote
        them, with the labels macro-F1 averages over (an answer cut where it could no longer become a label ends in
        STOPPED, said under the table)."""
        expected = [self.expected_label(r["reference"]) for r in records]
        references = self.spellings([r["reference"] for r in records])
        averaged = f"\n\nmacro-F1 averages the F1 of the {len(set(expected))} labels that have held-out rows."
        tables = []
        for side, title in sides.items():
            if not records or f"{side}_label" not in records[0]:
                continue
            answers = [r[f"{side}_answer"] for r in records]
            table = confusion_table(expected, [_key(r[f"{side}_label"]) for r in records],
                                    {**self.spellings(answers), **references})
            tables.append((f"Confusion table ({title})", table + averaged + self._stopped_note(answers)))
        return tables

    def _stopped_note(self, answers: list[str]) -> str:
        stopped = 0 if self.config.label_field else sum(answer.endswith(STOPPED) for answer in answers)
        return (f"\n\n{stopped} answer(s) ending in {STOPPED} stopped where they could no longer become a label "
                "(wrong whatever followed)." if stopped else "")
