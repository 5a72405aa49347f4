"""Extraction: the answer is a JSON object. Exact match of the whole object (primary), JSON validity, and the
share of the reference's fields answered right (overall and by field)."""

from __future__ import annotations

from ftpipe.core.evaluation.metrics.base import (
    FIRST_JSON_OBJECT, AnswerEnd, Scores, TaskMetrics, first_json_object, mean,
)


def field_hits(wanted: dict, got: dict | None) -> dict[str, float]:
    got = got or {}
    return {key: float(key in got and got[key] == value) for key, value in wanted.items()}


class Extraction(TaskMetrics):
    name = "extraction"
    primary = "exact_match"

    def answer_end(self, references: list[str]) -> AnswerEnd:
        """The first JSON object's closing brace: every metric reads that object only."""
        return FIRST_JSON_OBJECT

    def valid_outputs(self, answers: list[str], references: list[str]) -> list[bool]:
        """A JSON object with every field all the training answers have."""
        required = set.intersection(*(set(first_json_object(r) or {}) for r in references)) if references else set()
        return [(found := first_json_object(answer)) is not None and required <= set(found) for answer in answers]

    def scores(self, answers: list[str], references: list[str]) -> Scores:
        wanted = [first_json_object(r) or {} for r in references]
        got = [first_json_object(a) for a in answers]
        hits = [field_hits(w, g) for w, g in zip(wanted, got)]
        by_field: dict[str, list[float]] = {}
        for row in hits:
            for key, hit in row.items():
                by_field.setdefault(key, []).append(hit)
        return Scores(
            rows={
                "exact_match": [float(g == w) for g, w in zip(got, wanted)],
                "json_valid": [float(g is not None) for g in got],
                "field_accuracy": [mean(list(row.values())) for row in hits],
            },
            extra={"field_accuracy_by_field": {key: mean(values) for key, values in sorted(by_field.items())}},
        )

    def reference_problem(self, reference: str) -> str | None:
        return None if first_json_object(reference) is not None else "is not a JSON object"
