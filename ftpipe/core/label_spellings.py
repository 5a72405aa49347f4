"""One spelling per label: labels that differ only in what the evaluation ignores (case, spacing, punctuation:
`Billing`, `billing `, `billing.`) are one label there, so cleaned rows are rewritten to the spelling most rows of the
label use, and the model learns to write each label one way. The rest of each answer, and each row's id (that of its
raw row), stay as they were."""

from __future__ import annotations

import json
from collections import Counter
from typing import Any

from ftpipe.core.evaluation.metrics.classification import Classification, most_common, raw_label
from ftpipe.core.text import loose

COLUMNS = ["label", "respelled", "rows"]
SHOWN = 5  # spellings named in the log line


def one_spelling_per_label(rows: list[dict[str, Any]],
                           labels: Classification) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """`rows` with each label written as most of its rows write it (the smallest of equally common spellings), and
    one entry per spelling replaced: the spelling kept (`label`), the one replaced (`respelled`), how many `rows`."""
    field = labels.config.label_field
    written = [raw_label(row["messages"][-1]["content"], field) or "" for row in rows]
    spellings: dict[str, list[str]] = {}
    for label in filter(loose, written):
        spellings.setdefault(loose(label), []).append(label)
    kept = {name: most_common(found) for name, found in spellings.items() if len(set(found)) > 1}
    replaced: Counter[tuple[str, str]] = Counter()
    out = []
    for row, label in zip(rows, written):
        keep = kept.get(loose(label), label)
        answer = labels.respelled(row["messages"][-1]["content"], keep) if keep != label else None
        if answer is not None and raw_label(answer, field) == keep:
            row = {**row, "messages": [*row["messages"][:-1], {**row["messages"][-1], "content": answer}]}
            replaced[keep, label] += 1
        out.append(row)
    return out, [{"label": keep, "respelled": label, "rows": n} for (keep, label), n in replaced.most_common()]


def shown(respelled: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """`respelled` with both spellings quoted, so that a space or a case that tells them apart can be seen."""
    return [{**entry, "label": _quoted(entry["label"]), "respelled": _quoted(entry["respelled"])}
            for entry in respelled]


def said(respelled: list[dict[str, Any]]) -> str:
    """`12 rows' labels respelled as most rows of the label write it: "billing " as "Billing" ×9, ...` (the commonest
    first, SHOWN of them); empty when none was."""
    if not respelled:
        return ""
    named = [f"{r['respelled']} as {r['label']} ×{r['rows']}" for r in shown(respelled[:SHOWN])]
    more = f" and {len(respelled) - SHOWN} other spellings" if len(respelled) > SHOWN else ""
    rows = sum(r["rows"] for r in respelled)
    return f"{rows} rows' labels respelled as most rows of the label write it: {', '.join(named)}{more}"


def _quoted(text: str) -> str:
    return json.dumps(text, ensure_ascii=False)
