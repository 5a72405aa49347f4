"""The general-skills probe: its rows, and the check each row's answer is scored with (the row's `check`)."""

from __future__ import annotations

import json
import unicodedata
from collections.abc import Callable
from pathlib import Path

from ftpipe.core.evaluation.metrics.final_answer import NUMBER, to_number
from ftpipe.core.text import loose

PROBE_MAX_NEW_TOKENS = 16
DEFAULT_CHECK = "contains"


def read_probe(path: Path, limit: int | None = None) -> list[dict]:
    """The first `limit` rows (all when None) of the probe JSONL: {id, skill, check, messages (ending with a user
    turn), reference}; the file interleaves its skills, so any prefix mixes them."""
    rows = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    return rows[:limit]


def first_number(text: str) -> float | None:
    """The first number written in `text` (thousands separators allowed), or None."""
    found = NUMBER.search(text)
    return to_number(found.group()) if found else None


def cased_words(text: str) -> str:
    """`text` without punctuation, whitespace collapsed, case kept."""
    kept = "".join(ch for ch in unicodedata.normalize("NFKC", text) if not unicodedata.category(ch).startswith("P"))
    return " ".join(kept.split())


def same_number(answer: str, reference: str) -> bool:
    expected = first_number(reference)
    return expected is not None and first_number(answer) == expected


CHECKS: dict[str, Callable[[str, str], bool]] = {
    "contains": lambda answer, reference: f" {loose(reference)} " in f" {loose(answer)} ",
    "exact": lambda answer, reference: loose(answer) == loose(reference),
    "exact_case": lambda answer, reference: cased_words(answer) == cased_words(reference),
    "number": same_number,
}


def probe_correct(answer: str, row: dict) -> bool:
    """Whether `answer` passes the row's check: `contains` (the reference as whole words, case and punctuation
    aside; the default), `exact` (the answer is the reference, case and punctuation aside), `exact_case` (the
    same with case) or `number` (the first number of the answer is the reference's)."""
    return CHECKS[row.get("check", DEFAULT_CHECK)](answer, row["reference"])
