"""The review sample: random deduplicated examples as a CSV for the manual read before training; the system prompt
most rows share is written once beside it, not in every row."""

from __future__ import annotations

import csv
import random
from pathlib import Path
from typing import Any

from ftpipe.core.layout import REVIEW_CSV
from ftpipe.core.records import common_system_prompt, conversation_text, read_examples
from ftpipe.core.results import Result, reuse_key
from ftpipe.core.storage import atomic_dir, file_sha256

SYSTEM_PROMPT_FILE = "system_prompt.txt"
SHARED = f"(shared: {SYSTEM_PROMPT_FILE})"


def review_sample(rows: list[dict[str, Any]], size: int = 100, seed: int = 0) -> tuple[list[dict[str, Any]], str | None]:
    """`size` rows drawn with a fixed seed (all rows if fewer), flattened to prompt/answer columns, and the system
    prompt more than half of them share (None: none), which their `system` column names as SHARED."""
    ordered = sorted(rows, key=lambda r: r["id"])
    picked = random.Random(seed).sample(ordered, min(size, len(ordered)))
    shared, _ = common_system_prompt([row["messages"] for row in picked])
    return [
        {
            "id": row["id"],
            "system": _system(row["messages"], shared),
            "prompt": conversation_text(row["messages"]),
            "answer": row["messages"][-1]["content"],
            "source": row["source"],
        }
        for row in sorted(picked, key=lambda r: r["id"])
    ], shared


def _system(messages: list[dict[str, str]], shared: str | None) -> str:
    system = next((m["content"] for m in messages if m["role"] == "system"), "")
    return SHARED if system == shared else system


def build_review_sample(examples_path: Path, out_dir: Path) -> list[dict[str, Any]]:
    """Write `review_sample(...)` of the examples as `out_dir/review_sample.csv`, the shared system prompt as
    `out_dir/system_prompt.txt` (with a result); return its rows."""
    sample, shared = review_sample(read_examples(examples_path))
    inputs = {"examples": file_sha256(examples_path)[:16]}
    produced = {"csv": REVIEW_CSV, **({"system_prompt": SYSTEM_PROMPT_FILE} if shared else {})}
    with atomic_dir(out_dir) as tmp:
        _write_csv(sample, tmp / REVIEW_CSV)
        if shared:
            (tmp / SYSTEM_PROMPT_FILE).write_text(shared, encoding="utf-8")
        Result("review_sample", reuse_key(inputs), produced, inputs, {"rows": len(sample)}).write(tmp)
    return sample


def _write_csv(rows: list[dict[str, Any]], path: Path) -> None:
    with path.open("w", encoding="utf-8", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(rows[0]) if rows else ["id"])
        writer.writeheader()
        writer.writerows(rows)
