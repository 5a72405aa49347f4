"""Text helpers shared by cleaning, evaluation and reports: the two normal forms of text, and Markdown tables."""

from __future__ import annotations

import unicodedata
from typing import Any

CELL_CHARS = 160


def canonical(text: str) -> str:
    """Unicode NFKC, case-folded, whitespace collapsed: what makes two rows the same row (cleaning, split).

    ASCII text is already NFKC, and its casefold is lower(), so it takes the fast path.
    """
    folded = text.lower() if text.isascii() else unicodedata.normalize("NFKC", text).casefold()
    return " ".join(folded.split())


def loose(text: str) -> str:
    """`canonical` with punctuation removed: what makes two answers the same answer (metrics, labels)."""
    kept = "".join(ch for ch in canonical(text) if not unicodedata.category(ch).startswith("P"))
    return " ".join(kept.split())


def cell(value: Any, limit: int = CELL_CHARS) -> str:
    """One Markdown table cell: on one line, at most `limit` characters, pipes escaped."""
    flat = " ".join(str(value).split())
    return (flat if len(flat) <= limit else flat[: limit - 1] + "…").replace("|", "\\|")


def markdown_table(header: list[str], rows: list[list[Any]], limit: int = CELL_CHARS) -> str:
    """A Markdown table of `rows` under `header`, cells shortened to `limit` characters."""
    lines = ["| " + " | ".join(cell(h, limit) for h in header) + " |", "|" + "---|" * len(header)]
    return "\n".join(lines + ["| " + " | ".join(cell(v, limit) for v in row) + " |" for row in rows])
