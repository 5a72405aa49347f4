"""Preference rows: a prompt with a preferred and a dispreferred answer (paired, for dpo and orpo), or with one
answer marked desirable or not (unpaired, for kto).

Canonical preference row (what `raw_examples` writes to `preferences.parquet`, beside the chat examples):
``{"id", "prompt": [{"role", "content"}, ...] (ends with a user turn), "chosen", "rejected", "completion", "label",
"source"}``; a paired row has `chosen` and `rejected` (`completion` and `label` null), an unpaired row has
`completion` and `label` (true = desirable; `chosen` and `rejected` null).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from ftpipe.core.records import MESSAGE_TYPE

PREFERENCE_SCHEMA = pa.schema([
    ("id", pa.string()), ("prompt", MESSAGE_TYPE), ("chosen", pa.string()), ("rejected", pa.string()),
    ("completion", pa.string()), ("label", pa.bool_()), ("source", pa.string()),
])


def is_paired(row: dict[str, Any]) -> bool:
    return row["chosen"] is not None


def write_preferences(rows: list[dict[str, Any]], path: Path) -> None:
    """Write canonical preference rows as Parquet (deterministic bytes for the same rows; none is an empty file)."""
    pq.write_table(pa.Table.from_pylist(rows, schema=PREFERENCE_SCHEMA), path)


def read_preferences(path: Path) -> list[dict[str, Any]]:
    """The rows of a preferences file; none when the file does not exist."""
    return pq.read_table(path).to_pylist() if Path(path).is_file() else []
