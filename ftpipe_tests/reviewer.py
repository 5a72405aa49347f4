"""A reviewer, for tests: reads a blind review sample and fills in its verdicts."""

from __future__ import annotations

import csv
import json
from pathlib import Path

from ftpipe.core.evaluation.review import COLUMNS


def read_csv(path: Path) -> list[dict]:
    with path.open(encoding="utf-8-sig", newline="") as handle:
        return list(csv.DictReader(handle))


def key_of(sample_dir: Path) -> dict:
    return json.loads((sample_dir / "review_key.json").read_text())


def fill(sample_dir: Path, out: Path, pick, reviewer: str = "") -> Path:
    """review.csv filled in: pick(row, the new model's letter) gives each verdict."""
    new_sides = {row_id: row["new"] for row_id, row in key_of(sample_dir)["rows"].items()}
    rows = [{**row, "verdict": pick(row, new_sides[row["id"]]), "reviewer": reviewer}
            for row in read_csv(sample_dir / "review.csv")]
    out.parent.mkdir(parents=True, exist_ok=True)
    with out.open("w", encoding="utf-8", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=COLUMNS)
        writer.writeheader()
        writer.writerows(rows)
    return out


def other(letter: str) -> str:
    return "B" if letter == "A" else "A"
