"""The review sample: random deduplicated examples as a CSV for the manual read before training."""

from __future__ import annotations

import csv
import random
from pathlib import Path
from typing import Any

from ftpipe.core.layout import REVIEW_CSV
from ftpipe.core.records import read_examples
from ftpipe.core.results import Result, reuse_key
from ftpipe.core.storage import atomic_dir, file_sha256


def review_sample(rows: list[dict[str, Any]], size: int = 100, seed: int = 0) -> list[dict[str, Any]]:
    """`size` rows drawn with a fixed seed (all rows if fewer), flattened to prompt/answer columns."""
    ordered = sorted(rows, key=lambda r: r["id"])
    picked = random.Random(seed).sample(ordered, min(size, len(ordered)))
    return [
        {
            "id": row["id"],
            "system": next((m["content"] for m in row["messages"] if m["role"] == "system"), ""),
            "prompt": "\n".join(m["content"] for m in row["messages"][:-1] if m["role"] == "user"),
            "answer": row["messages"][-1]["content"],
            "source": row["source"],
        }
        for row in sorted(picked, key=lambda r: r["id"])
    ]


def build_review_sample(examples_path: Path, out_dir: Path) -> list[dict[str, Any]]:
    """Write `review_sample(...)` of the examples as `out_dir/review_sample.csv` (with a result); return its rows."""
    sample = review_sample(read_examples(examples_path))
    inputs = {"examples": file_sha256(examples_path)[:16]}
    with atomic_dir(out_dir) as tmp:
        _write_csv(sample, tmp / REVIEW_CSV)
        Result("review_sample", reuse_key(inputs), {"csv": REVIEW_CSV}, inputs, {"rows": len(sample)}).write(tmp)
    return sample


def _write_csv(rows: list[dict[str, Any]], path: Path) -> None:
    with path.open("w", encoding="utf-8", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(rows[0]) if rows else ["id"])
        writer.writeheader()
        writer.writerows(rows)
