"""Typed results: what a step produced, from which inputs, and the key that decides whether it can be reused.

Every step that publishes a folder (the training program, each asset) writes one `result.json` inside it,
in the same atomic publish, so a reader never sees a folder without its result or a result without its files.
Consumers read the result instead of recomputing paths or keys; one rule decides reuse: a published
result whose `reuse_key` equals the key of the inputs at hand is reused.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

RESULT_FILE = "result.json"


@dataclass(frozen=True)
class Result:
    """`kind`: the producing step (e.g. `lora_adapter`); `produced`: what it wrote (names relative to its folder,
    facts such as `method`); `inputs`: the versions it was made from; `reuse_key`: a hash of everything that
    decides its content; `metadata`: the materialization metadata it reported."""

    kind: str
    reuse_key: str
    produced: dict[str, Any] = field(default_factory=dict)
    inputs: dict[str, Any] = field(default_factory=dict)
    metadata: dict[str, Any] = field(default_factory=dict)

    def write(self, folder: Path) -> Path:
        """Write `folder/result.json` (call inside the folder's `atomic_dir` block)."""
        path = Path(folder) / RESULT_FILE
        path.write_text(json.dumps(asdict(self), indent=2, sort_keys=True, default=str), encoding="utf-8")
        return path


def reuse_key(*parts: Any) -> str:
    """A short hash of everything that decides a result's content."""
    return hashlib.sha256(repr(parts).encode()).hexdigest()[:16]


def read_result(folder: Path, kind: str | None = None) -> Result | None:
    """The result published in `folder`, or None when there is none (or it is of another kind)."""
    path = Path(folder) / RESULT_FILE
    if not path.is_file():
        return None
    result = Result(**json.loads(path.read_text(encoding="utf-8")))
    return result if kind is None or result.kind == kind else None


def reusable(folder: Path, kind: str, reuse_key: str) -> Result | None:
    """The result in `folder` when it was made from exactly these inputs (same kind and reuse key), else None."""
    result = read_result(folder, kind)
    return result if result is not None and result.reuse_key == reuse_key else None
