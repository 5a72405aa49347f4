"""The review sample: random deduplicated examples, and preference rows, as CSVs for the manual read before training;
the system prompt most rows share is written once beside them, not in every row."""

from __future__ import annotations

import csv
import random
from pathlib import Path
from typing import Any

from ftpipe.core.layout import REVIEW_CSV
from ftpipe.core.preferences import read_preferences
from ftpipe.core.records import common_system_prompt, conversation_text, prompt_text, read_examples
from ftpipe.core.results import Result, reuse_key
from ftpipe.core.storage import atomic_dir, file_sha256

SYSTEM_PROMPT_FILE = "system_prompt.txt"
PREFERENCES_CSV = "review_preferences.csv"
SHARED = f"(shared: {SYSTEM_PROMPT_FILE})"
ANSWER_COLUMNS = ("chosen", "rejected", "completion", "label")


def review_sample(rows: list[dict[str, Any]], preferences: list[dict[str, Any]] = (), size: int = 100,
                  seed: int = 0) -> tuple[list[dict[str, Any]], list[dict[str, Any]], str | None]:
    """`size` chat rows and `size` preference rows drawn with a fixed seed (all of them where fewer), flattened to
    columns, and the system prompt more than half of them share (None: none), which their `system` column names as
    SHARED."""
    chats, pairs = _drawn(rows, size, seed), _drawn(preferences, size, seed)
    shared, _ = common_system_prompt([row["messages"] for row in chats] + [row["prompt"] for row in pairs])
    return [_chat_columns(row, shared) for row in chats], [_preference_columns(row, shared) for row in pairs], shared


def _drawn(rows: list[dict[str, Any]], size: int, seed: int) -> list[dict[str, Any]]:
    ordered = sorted(rows, key=lambda r: r["id"])
    return sorted(random.Random(seed).sample(ordered, min(size, len(ordered))), key=lambda r: r["id"])


def _chat_columns(row: dict[str, Any], shared: str | None) -> dict[str, Any]:
    return {"id": row["id"], "system": _system(row["messages"], shared), "prompt": conversation_text(row["messages"]),
            "answer": row["messages"][-1]["content"], "source": row["source"]}


def _preference_columns(row: dict[str, Any], shared: str | None) -> dict[str, Any]:
    """A pair's `chosen` and `rejected`, or an unpaired row's `completion` and `label` (the other two empty)."""
    columns = {**row, "system": _system(row["prompt"], shared), "prompt": prompt_text(row["prompt"])}
    return {name: "" if value is None else value for name, value in columns.items()}


def answer_columns(pairs: list[dict[str, Any]]) -> list[str]:
    """The answer columns the sampled `pairs` fill: `chosen` and `rejected`, `completion` and `label`, or all four
    where paired and unpaired rows mix."""
    return [name for name in ANSWER_COLUMNS if any(row[name] != "" for row in pairs)]


def _system(messages: list[dict[str, str]], shared: str | None) -> str:
    system = next((m["content"] for m in messages if m["role"] == "system"), "")
    return SHARED if system == shared else system


def build_review_sample(examples_path: Path, preferences_path: Path,
                        out_dir: Path) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """Write `review_sample(...)` of the examples and preference rows as `out_dir/review_sample.csv` and
    `review_preferences.csv` (where there are any), the shared system prompt as `out_dir/system_prompt.txt` (with a
    result); return both samples."""
    chats, pairs, shared = review_sample(read_examples(examples_path), read_preferences(preferences_path))
    inputs = {"examples": file_sha256(examples_path)[:16],
              **({"preferences": file_sha256(preferences_path)[:16]} if pairs else {})}
    produced = {"csv": REVIEW_CSV, **({"preferences_csv": PREFERENCES_CSV} if pairs else {}),
                **({"system_prompt": SYSTEM_PROMPT_FILE} if shared else {})}
    with atomic_dir(out_dir) as tmp:
        _write_csv(chats, tmp / REVIEW_CSV)
        if pairs:
            _write_csv(pairs, tmp / PREFERENCES_CSV, ["id", "system", "prompt", *answer_columns(pairs), "source"])
        if shared:
            (tmp / SYSTEM_PROMPT_FILE).write_text(shared, encoding="utf-8")
        Result("review_sample", reuse_key(inputs), produced, inputs,
               {"rows": len(chats), "preference_rows": len(pairs)}).write(tmp)
    return chats, pairs


def _write_csv(rows: list[dict[str, Any]], path: Path, columns: list[str] | None = None) -> None:
    with path.open("w", encoding="utf-8", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=columns or (list(rows[0]) if rows else ["id"]),
                                extrasaction="ignore")
        writer.writeheader()
        writer.writerows(rows)
