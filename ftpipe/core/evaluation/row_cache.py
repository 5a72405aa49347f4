"""One model's per-row results cached on disk: greedy answers, constrained answers, label candidates' and answers'
log-probabilities, each keyed by its kind, the settings that produced it and its input (a prompt, a conversation).
A file belongs to one model (the version of its weights, on one device), so an eval split that gained rows runs
the model on its new rows only, and the probe is not run again when only the split changed."""

from __future__ import annotations

import hashlib
import json
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from ftpipe.core.storage import append_lines, read_keyed_lines

Compute = Callable[[list], list]  # items -> one JSON value per item, in order


def row_key(kind: str, settings: Any, item: Any) -> str:
    text = json.dumps([kind, settings, item], sort_keys=True, ensure_ascii=False)
    return hashlib.sha256(text.encode()).hexdigest()[:32]


class RowCache:
    """Results by key in a JSON-lines file, each with the seconds it took (its call's time over its items); lines
    are only ever appended (a line cut short by a crash is skipped when read). The file is read once, at the first
    call."""

    def __init__(self, path: Path):
        self.path = Path(path)
        self._known: dict[str, dict[str, Any]] | None = None

    def _entries(self) -> dict[str, dict[str, Any]]:
        if self._known is None:
            self._known = read_keyed_lines(self.path)
        return self._known

    def missing(self, kind: str, items: list, settings: Any = None) -> list[int]:
        """The indices of the items whose `kind` was never computed (the first of equal items only)."""
        known = self._entries()
        first_of: dict[str, int] = {}
        for index, item in enumerate(items):
            first_of.setdefault(row_key(kind, settings, item), index)
        return sorted(index for key, index in first_of.items() if key not in known)

    def add(self, kind: str, items: list, values: list, seconds: float, settings: Any = None) -> None:
        """Store the `kind` value of each item (computed in `seconds` each) that is not stored yet."""
        known, entries = self._entries(), {}
        for item, value in zip(items, values, strict=True):
            key = row_key(kind, settings, item)
            if key not in known:
                entries[key] = {"key": key, "value": value, "seconds": seconds}
        if entries:
            append_lines(self.path, list(entries.values()))
            known.update((key, json.loads(json.dumps(entry))) for key, entry in entries.items())  # as read back

    def values(self, kind: str, items: list, compute: Compute, settings: Any = None) -> list:
        """The result of `kind` for each item, calling `compute` once with the items never computed before (in
        order); results come back as JSON gives them (a tuple as a list)."""
        missing = self.missing(kind, items, settings)
        if missing:
            started = time.perf_counter()
            fresh = compute([items[i] for i in missing])
            self.add(kind, [items[i] for i in missing], fresh, (time.perf_counter() - started) / len(missing), settings)
        return self.stored(kind, items, settings)

    def stored(self, kind: str, items: list, settings: Any = None) -> list:
        """The stored result of `kind` for each item (every one must be stored)."""
        known = self._entries()
        return [known[row_key(kind, settings, item)]["value"] for item in items]

    def seconds_per_item(self, kind: str, items: list, settings: Any = None) -> float | None:
        """The mean seconds computing `kind` took per item, over those computed (None: none was)."""
        known = self._entries()
        seconds = [entry["seconds"] for item in items if (entry := known.get(row_key(kind, settings, item)))]
        return sum(seconds) / len(seconds) if seconds else None
