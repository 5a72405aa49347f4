"""One spelling per label: labels that differ only in what the evaluation ignores (case, spacing, punctuation:
`Billing`, `billing `, `billing.`) are one label there, so cleaned rows are rewritten to the spelling most of the
label's rows use, and the model learns to write each label one way. The rest of each answer, and each row's id (that
of its raw row), stay as they were."""

from __future__ import annotations

import json
from collections import Counter
from dataclasses import dataclass
from functools import partial
from typing import Any

from ftpipe.core.evaluation.metrics.classification import Classification, most_common, raw_label
from ftpipe.core.text import loose

COLUMNS = ["label", "respelled", "rows"]
SHOWN = 5  # spellings named in the log line


@dataclass(frozen=True)
class Spellings:
    """The spelling each label is trained in: for a label written more than one way (`chosen`, by its `loose`
    form), the one most rows write (the smallest of equally common ones); any other, as written."""

    labels: Classification
    chosen: dict[str, str]

    @classmethod
    def of(cls, rows: list[dict[str, Any]], labels: Classification) -> Spellings:
        found: dict[str, list[str]] = {}
        for label in map(partial(raw_label, label_field=labels.config.label_field), _answers(rows)):
            if label and loose(label):
                found.setdefault(loose(label), []).append(label)
        return cls(labels, {name: most_common(written) for name, written in found.items() if len(set(written)) > 1})

    def label(self, answer: str) -> str | None:
        """The label of `answer` as it is trained."""
        return self._trained(raw_label(answer, self.labels.config.label_field))

    def respell(self, rows: list[dict[str, Any]]) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
        """`rows` with each label in its spelling, and one entry per spelling replaced: the spelling kept (`label`),
        the one replaced (`respelled`), how many `rows`, most rows first."""
        replaced: Counter[tuple[str, str]] = Counter()
        out = []
        for row, answer in zip(rows, _answers(rows)):
            written = raw_label(answer, self.labels.config.label_field)
            keep = self._trained(written)
            respelled = self.labels.respelled(answer, keep) if keep != written else None
            if respelled is not None and raw_label(respelled, self.labels.config.label_field) == keep:
                row = {**row, "messages": [*row["messages"][:-1], {**row["messages"][-1], "content": respelled}]}
                replaced[keep, written] += 1
            out.append(row)
        return out, [{"label": keep, "respelled": written, "rows": n} for (keep, written), n in replaced.most_common()]

    def _trained(self, written: str | None) -> str | None:
        return self.chosen.get(loose(written), written) if written else written


def shown(respelled: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """`respelled` with both spellings quoted, so that a space or a case that tells them apart can be seen."""
    return [{**entry, "label": _quoted(entry["label"]), "respelled": _quoted(entry["respelled"])}
            for entry in respelled]


def said(respelled: list[dict[str, Any]]) -> str:
    """`12 rows' labels respelled as most rows of the label write it: "billing " as "Billing" ×9, ...` (the commonest
    first, SHOWN of them)."""
    named = [f"{r['respelled']} as {r['label']} ×{r['rows']}" for r in shown(respelled[:SHOWN])]
    more = f" and {len(respelled) - SHOWN} other spellings" if len(respelled) > SHOWN else ""
    rows = sum(r["rows"] for r in respelled)
    return f"{rows} rows' labels respelled as most rows of the label write it: {', '.join(named)}{more}"


def _answers(rows: list[dict[str, Any]]) -> list[str]:
    return [row["messages"][-1]["content"] for row in rows]


def _quoted(text: str) -> str:
    return json.dumps(text, ensure_ascii=False)
