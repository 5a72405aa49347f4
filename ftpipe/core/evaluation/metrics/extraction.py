"""Extraction: the answer is a JSON object. Exact match of the whole object (primary), JSON validity (the answer
begins with its object, where the reference does: the evaluation stops an answer at its object's end), and the share
of the fields answered right (overall and by field): the reference's fields, and any field the answer invents, which
is never right. Values are equal only as the same JSON type (`true` is not `1`). An answer missing a field nearly all
the others give, giving it another JSON type, or writing text around its object where nearly all the others are the
object alone, is set aside as a reference."""

from __future__ import annotations

import json
import unicodedata
from collections import Counter
from collections.abc import Callable
from difflib import get_close_matches
from typing import Any

from ftpipe.config import EvaluationConfig
from ftpipe.core.evaluation.metrics.base import (
    FIRST_JSON_OBJECT, AnswerEnd, Scores, TaskMetrics, first_json_object, json_object_span, mean, misspelt_key,
)
from ftpipe.core.readable import plural
from ftpipe.core.text import clipped, counted, markdown_table, whole_json_object

SHAPE_SHARE = 0.95  # a field (or a field's JSON type) this share of the answers give is expected of every answer
SHAPE_MIN_ANSWERS = 20  # fewer answers say too little about the usual shape
SHOWN_VALUE_CHARS = 40  # of an odd value, in its quarantine reason
SHOWN_AROUND_CHARS = 20  # of the text around an answer's object, in its quarantine reason
CATEGORY_REPEATS = 5  # a string field whose values come back this often on average holds categories
TYPE_SLIP_SHARE = 0.8  # a field's values this share of which have one JSON type: the others' type is a slip
SHOWN_FIELDS = 5  # of the fields a model's answers invent that no reference has, under the report's table


def same_value(a: Any, b: Any) -> bool:
    """Equal JSON values of one JSON type (`true` is not `1`, as Python's `==` has it; `1` is `1.0`), strings equal
    in their composed Unicode form (an "ë" written as "e" and a combining mark is the same "ë")."""
    if json_type(a) != json_type(b):
        return False
    if isinstance(a, dict):
        return a.keys() == b.keys() and all(same_value(a[key], b[key]) for key in a)
    if isinstance(a, list):
        return len(a) == len(b) and all(map(same_value, a, b))
    if isinstance(a, str):
        return a == b or unicodedata.normalize("NFC", a) == unicodedata.normalize("NFC", b)
    return a == b


def field_hits(wanted: dict, got: dict | None) -> dict[str, float]:
    """Each field of the reference or the answer: 1.0 when the answer gives the reference's value, else 0.0."""
    got = got or {}
    return {key: float(key in wanted and key in got and same_value(got[key], wanted[key]))
            for key in {**wanted, **got}}


def object_alone(answer: str) -> bool:
    """The answer is a JSON object and nothing else, whitespace aside: what `json.loads` reads as an object."""
    return whole_json_object(answer) is not None


def object_first(answer: str) -> bool:
    """The answer begins with its JSON object, whitespace aside: what a client reads as JSON when the answer stops at
    the object's end, as it does in the evaluation (an answer is JSON valid when it does, or its reference does
    not either)."""
    span = json_object_span(answer)
    return span is not None and not answer[:span[1]].strip()


def by_field(hits: list[dict[str, float]]) -> dict[str, list[float]]:
    """The hits of each field, over the rows where the reference or the answer has it."""
    found: dict[str, list[float]] = {}
    for row in hits:
        for key, hit in row.items():
            found.setdefault(key, []).append(hit)
    return dict(sorted(found.items()))


def json_type(value: Any) -> str:
    """The JSON type name of a parsed JSON value."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "boolean"
    if isinstance(value, (int, float)):
        return "number"
    return {str: "string", list: "array"}.get(type(value), "object")


def shape_of(objects: list[dict]) -> Callable[[dict], str | None]:
    """How an object departs from the shape nearly all `objects` share (None: it does not): it lacks a field at least
    SHAPE_SHARE of them give, or gives a field another JSON type than that share of its non-null values."""
    total = len(objects)
    given = Counter(key for found in objects for key in found)
    expected = [key for key, count in given.items() if total >= SHAPE_MIN_ANSWERS and count >= SHAPE_SHARE * total]
    usual = {}
    for key in given:
        kinds = Counter(json_type(found[key]) for found in objects if found.get(key) is not None)
        values = sum(kinds.values())
        kind, count = kinds.most_common(1)[0] if kinds else ("", 0)
        if values >= SHAPE_MIN_ANSWERS and count >= SHAPE_SHARE * values:
            usual[key] = (kind, count, values)

    def problem(found: dict) -> str | None:
        if missing := next((key for key in expected if key not in found), None):
            instead = misspelt_key(missing, [key for key in found if key not in expected])
            return (f"lacks the field {missing!r}, which {given[missing]} of {total} answers give"
                    + (f" ({instead})" if instead else ""))
        odd = next((key for key, (kind, _, _) in usual.items()
                    if found.get(key) is not None and json_type(found[key]) != kind), None)
        if odd is None:
            return None
        kind, count, values = usual[odd]
        shown = clipped(json.dumps(found[odd], ensure_ascii=False), SHOWN_VALUE_CHARS)
        return f"gives {odd!r} as a {json_type(found[odd])} ({shown}), where {count} of {values} answers give a {kind}"

    return problem


def json_error(text: str) -> str | None:
    """Why the text from the first `{` to the last `}` of `text` is no JSON object, as the parser says it, with the
    text where it stopped (None: there is no such text, or it is one)."""
    start, end = text.find("{"), text.rfind("}")
    if start < 0 or end < start:
        return None
    try:
        json.loads(text[start:end + 1])
    except json.JSONDecodeError as error:
        at = start + error.pos
        return f"{error.msg} at character {at + 1} ({clipped(text[max(at - 12, 0):], 24)!r})"
    return None


OBJECT_SHAPE_RULE = f"fields and types of {SHAPE_SHARE:.0%} of {SHAPE_MIN_ANSWERS}+ answers, the object alone"


def text_around(answer: str, span: tuple[dict, int, int] | None) -> str | None:
    """What `answer` writes around its JSON object (`span`: `json_object_span(answer)`), as "'```json' before it";
    None when it is the object alone, whitespace aside, or holds no object."""
    if span is None:
        return None
    _, start, end = span
    parts = [f"{clipped(text, SHOWN_AROUND_CHARS)!r} {where}"
             for text, where in ((answer[:start].strip(), "before it"), (answer[end:].strip(), "after it")) if text]
    return " and ".join(parts) or None


def object_shape_check(references: list[str]) -> Callable[[str], str | None]:
    """How an answer's JSON object departs from the shape nearly all `references`' objects share (`shape_of`), or
    the answer from their form: text around the object where nearly all are the object alone (a model trained on a
    few fenced answers learns to fence some)."""
    spans = [json_object_span(reference) for reference in references]
    problem = shape_of([span[0] if span else {} for span in spans])
    alone = sum(text_around(reference, span) is None for reference, span in zip(references, spans))
    usually_alone = len(references) >= SHAPE_MIN_ANSWERS and alone >= SHAPE_SHARE * len(references)

    def check(answer: str) -> str | None:
        span = json_object_span(answer)
        if usually_alone and (around := text_around(answer, span)):
            return (f"has text around its JSON object ({around}), where {alone} of {len(references)} answers are the "
                    "object alone")
        return problem(span[0] if span else {})

    return check


def category_counts(references: list[str]) -> dict[str, Counter]:
    """The string fields of `references`' objects that hold categories: given by SHAPE_MIN_ANSWERS answers or more,
    each value CATEGORY_REPEATS times on average (an `issue`, not an order id); field -> its values' counts."""
    given: dict[str, Counter] = {}
    for reference in references:
        for key, value in (first_json_object(reference) or {}).items():
            if isinstance(value, str):
                given.setdefault(key, Counter())[value] += 1
    return {key: values for key, values in given.items()
            if values.total() >= SHAPE_MIN_ANSWERS and values.total() >= CATEGORY_REPEATS * len(values)}


def type_slips(references: list[str]) -> list[dict[str, Any]]:
    """The fields of `references`' objects whose values have one JSON type in TYPE_SLIP_SHARE of them or more and
    another in the rest (the rest beyond SHAPE_SHARE is quarantined as it is read): the field, the other `kind`, its
    `answers`, the index and value of the `first` of them, and the `usual` type and its answers."""
    kinds: dict[str, Counter] = {}
    first: dict[tuple[str, str], tuple[int, Any]] = {}
    for index, reference in enumerate(references):
        for key, value in (first_json_object(reference) or {}).items():
            if value is not None:
                kinds.setdefault(key, Counter())[json_type(value)] += 1
                first.setdefault((key, json_type(value)), (index, value))
    slips = []
    for key, counts in kinds.items():
        (usual, many), *others = counts.most_common()
        if counts.total() >= SHAPE_MIN_ANSWERS and many >= TYPE_SLIP_SHARE * counts.total():
            slips += [{"field": key, "kind": kind, "answers": count, "first": first[key, kind], "usual": usual,
                       "usual_answers": many} for kind, count in others]
    return slips


def type_slips_said(slips: list[dict[str, Any]]) -> str:
    """One line on `type_slips` (each `first` given as its row's source)."""
    named = [f"{slip['field']!r} is a {slip['kind']} in {slip['answers']} answers (the first {slip['first']}) and a "
             f"{slip['usual']} in {slip['usual_answers']}" for slip in slips[:SHOWN_FIELDS]]
    more = f" and {len(slips) - SHOWN_FIELDS} more" if len(slips) > SHOWN_FIELDS else ""
    return (f"{plural(len(slips), 'field')} of the answers {'has' if len(slips) == 1 else 'have'} values of another "
            f"JSON type than most: {'; '.join(named)}{more}; a value scores only as its own type, so the model learns "
            "to answer both ways: write them one way in the raw files")


def category_values(references: list[str]) -> dict[str, set[str]]:
    """`category_counts`' values, field -> its values."""
    return {key: set(values) for key, values in category_counts(references).items()}


def new_category(categories: dict[str, set[str]], answer: str) -> tuple[str, str, list[str]] | None:
    """(field, value, the closest known value or none) of the first category field whose value in `answer` none of
    `categories` has, else None."""
    found = first_json_object(answer) or {}
    for key, values in categories.items():
        if isinstance(value := found.get(key), str) and value not in values:
            return key, value, get_close_matches(value, sorted(values), n=1)
    return None


def _values_given(wanted: list[dict], got: dict[str, list[dict | None]], sides: dict[str, str], expected: Counter,
                  hits: dict[str, dict[str, list[float]]]) -> list[tuple[str, str]]:
    """The report section of the fields some references leave null: each model's accuracy on the rows whose reference
    gives a value, beside the null share (what answering null every time scores on the field); under it, the fields
    where the accuracy of a model that gives the field at all (`hits`: the first table's) is below that share."""
    nulls = Counter(key for found in wanted for key, value in found.items() if value is None)
    if not nulls:
        return []
    valued = {side: by_field([{key: hit for key, hit in field_hits(w, g).items() if w.get(key) is not None}
                              for w, g in zip(wanted, got[side])]) for side in sides}
    share = {key: nulls[key] / expected[key] for key in nulls}
    rows = [[key, f"{share[key]:.3f}", expected[key] - nulls[key],
             *(f"{mean(valued[side][key]):.3f}" if key in valued[side] else "n/a" for side in sides)]
            for key in sorted(nulls)]
    header = ["field", "null in the reference (answering null scores this)", "rows with a value", *sides.values()]
    below = [f"{key} ({title} {mean(hits[side][key]):.3f} against {share[key]:.3f})" for key in sorted(nulls)
             for side, title in sides.items()
             if _answered(got[side], key) and mean(hits[side][key]) < share[key]]  # a model that gives the field
    under = f"\n\nBelow what answering null every time scores: {'; '.join(below)}" if below else ""
    return [("Fields on the rows that give a value", markdown_table(header, rows) + under)]


def few_valued(wanted: list[dict]) -> dict[str, Counter]:
    """The fields of the reference objects `wanted` that hold a boolean or one of a few strings (each CATEGORY_REPEATS
    times on average), given in SHAPE_MIN_ANSWERS of them or more: field -> its values' counts, as JSON text."""
    values: dict[str, list[Any]] = {}
    for found in wanted:
        for key, value in found.items():
            values.setdefault(key, []).append(value)
    few = {}
    for key, given in values.items():
        kinds = {type(value) for value in given if value is not None}
        counts = Counter(json.dumps(value, ensure_ascii=False) for value in given)
        if len(given) >= SHAPE_MIN_ANSWERS and (kinds == {bool} or kinds == {str} and len(
                given) >= CATEGORY_REPEATS * len(counts)):
            few[key] = counts
    return few


def _answered(got: list[dict | None], key: str) -> Counter:
    """The values the answers `got` give field `key`, as JSON text."""
    return Counter(json.dumps(found[key], ensure_ascii=False) for found in got if found is not None and key in found)


def _few_values(wanted: list[dict], got: dict[str, list[dict | None]], sides: dict[str, str],
                hits: dict[str, dict[str, list[float]]]) -> list[tuple[str, str]]:
    """The report section of the fields of a few values (`few_valued`): what the references' commonest value
    answered every time scores (the most any constant answer scores), and each model's commonest answer with its
    share of its answers and the answers no reference gives (a model answering one value everywhere tells nothing
    apart); under it, the fields where a model that answers the field scores no more than that constant."""
    few = few_valued(wanted)
    if not few:
        return []
    constant = {key: (value, count / counts.total()) for key, counts in few.items()
                for value, count in [counts.most_common(1)[0]]}
    answered = {side: {key: _answered(got[side], key) for key in few} for side in sides}
    rows = [[key, len(few[key]), f"{constant[key][1]:.3f} (`{constant[key][0]}`)",
             *(_commonest(answered[side][key], few[key]) for side in sides)] for key in sorted(few)]
    header = ["field", "values", "the commonest every time scores", *(f"{title} answers most" for title in
                                                                        sides.values())]
    level = [f"{key} ({title} {mean(hits[side][key]):.3f} against {constant[key][1]:.3f} for `{constant[key][0]}`)"
             for key in sorted(few) for side, title in sides.items()
             if answered[side][key] and mean(hits[side][key]) <= constant[key][1]]
    under = (f"\n\nNo better than answering the commonest value every time: {'; '.join(level)}: the model does not "
             "tell this field's values apart") if level else ""
    return [("Fields of a few values", markdown_table(header, rows) + under)]


def _commonest(answers: Counter, known: Counter) -> str:
    """`value` in N of the M answers that give the field, and how many give a value no reference (`known`) gives;
    n/a where none gives the field."""
    if not answers:
        return "n/a"
    value, count = answers.most_common(1)[0]
    unknown = sum(found for answer, found in answers.items() if answer not in known)
    others = f", {unknown} with a value no reference gives" if unknown else ""
    return f"`{value}` in {count} of {answers.total()}{others}"


class Extraction(TaskMetrics):
    name = "extraction"
    primary = "exact_match"
    shape_rule = OBJECT_SHAPE_RULE

    def __init__(self, config: EvaluationConfig):
        super().__init__(config)
        self.primary = config.extraction_metric or self.primary

    def answer_end(self, references: list[str]) -> AnswerEnd:
        """The first JSON object's closing brace: every metric reads that object only."""
        return FIRST_JSON_OBJECT

    def valid_outputs(self, answers: list[str], references: list[str]) -> list[bool]:
        """A JSON object with every field all the training answers have, and nothing around it where nearly all of
        them are the object alone."""
        required = set.intersection(*(set(first_json_object(r) or {}) for r in references)) if references else set()
        strict = sum(map(object_alone, references)) >= SHAPE_SHARE * len(references)
        return [(found := first_json_object(answer)) is not None and required <= set(found)
                and (object_alone(answer) or not strict) for answer in answers]

    def scores(self, answers: list[str], references: list[str]) -> Scores:
        wanted = [first_json_object(r) or {} for r in references]
        got = [first_json_object(a) for a in answers]
        hits = [field_hits(w, g) for w, g in zip(wanted, got)]
        return Scores(
            rows={
                "exact_match": [float(g is not None and same_value(g, w)) for g, w in zip(got, wanted)],
                "json_valid": [float(g is not None and (object_first(a) or not object_first(r)))
                               for a, g, r in zip(answers, got, references)],
                "field_accuracy": [mean(list(row.values())) for row in hits],
            },
            extra={"field_accuracy_by_field": {key: mean(values) for key, values in by_field(hits).items()}},
        )

    def report_sections(self, records: list[dict[str, Any]], sides: dict[str, str]) -> list[tuple[str, str]]:
        """Each reference field's accuracy for every model, over the rows whose reference or answer has it, and how
        many of its answers invent it; under the table, the fields no reference has that each model's answers give.
        Then, for the fields some references leave null, each model's accuracy on the rows that give a value (a model
        answering null every time scores the null share on the first table); and the fields of a few values, beside
        what their commonest value scores as every answer (`_few_values`)."""
        wanted = [first_json_object(r["reference"]) or {} for r in records]
        got = {side: [first_json_object(r[f"{side}_answer"]) for r in records] for side in sides}
        hits = {side: by_field([field_hits(w, g) for w, g in zip(wanted, got[side])]) for side in sides}
        expected = Counter(key for found in wanted for key in found)
        rows = [[key, expected[key], *(f"{mean(hits[side].get(key, [])):.3f}" for side in sides),
                 *(len(hits[side].get(key, [])) - expected[key] for side in sides)] for key in sorted(expected)]
        header = ["field", "reference rows", *sides.values(), *(f"invented by {title}" for title in sides.values())]
        made_up = {title: Counter({key: len(found) for key, found in hits[side].items() if key not in expected})
                   for side, title in sides.items()}
        lines = [f"{title}: {counted(fields, SHOWN_FIELDS, SHOWN_VALUE_CHARS, 'fields')}"
                 for title, fields in made_up.items() if fields]
        under = "\n\nFields no reference has, in the answers of " + "; ".join(lines) if lines else ""
        sections = [("Fields", markdown_table(header, rows) + under)] if rows else []
        return sections + _values_given(wanted, got, sides, expected, hits) + _few_values(wanted, got, sides, hits)

    def reference_problem(self, reference: str) -> str | None:
        if first_json_object(reference) is not None:
            return None
        text = reference.strip()
        if text.startswith("{") and text.count("{") > text.count("}"):
            return "is not a JSON object (cut off?)"
        error = json_error(text)
        return f"is not valid JSON: {error}" if error else "is not a JSON object"

    def shape_check(self, references: list[str]) -> Callable[[str], str | None]:
        return object_shape_check(references)

    def categories(self, references: list[str]) -> dict[str, Counter]:
        return category_counts(references)

    def type_slips(self, references: list[str]) -> list[dict[str, Any]]:
        return type_slips(references)
