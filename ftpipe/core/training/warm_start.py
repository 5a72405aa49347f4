"""Warm-start retraining (`retrain.warm_start`): when the train split only grew, by a small share, and the recipe and
base model are unchanged, the previous SFT adapter is trained further, for `training.epochs` over the new rows plus a
replayed sample of the rows it learnt (not the recipe's `max_steps`), instead of a training from step 0.

The train rows' ids of every split version an SFT training ran on are kept (`cache/warm_start/`), so the next
training knows which rows are new. A chain of warm starts stops, and the next training starts from step 0, once the
rows added since the last training from scratch exceed `retrain.warm_start_max_growth` of its rows.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ftpipe.core.results import Result
from ftpipe.core.storage import atomic_file, write_text

REPLAYED_PER_NEW_ROW = 3  # old rows replayed beside each new row, so the continued adapter keeps what it learnt


@dataclass(frozen=True)
class WarmStart:
    """A warm start of the training `start` (a finished SFT training): its new rows and the old rows it may replay."""

    start: Result
    new_ids: list[str]
    old_ids: list[str]
    scratch_rows: int  # the train rows of the training from scratch this chain of warm starts began with
    added_since_scratch: int  # rows added since then, these new ones included

    def replayed(self, batch_size: int) -> int:
        """How many old rows are replayed: `REPLAYED_PER_NEW_ROW` per new row, at least enough to fill a batch."""
        wanted = max(REPLAYED_PER_NEW_ROW * len(self.new_ids), batch_size - len(self.new_ids))
        return min(wanted, len(self.old_ids))

    def spec_entry(self, batch_size: int) -> dict[str, Any]:
        """The training spec's `warm_start`: what the training continues and on which rows (its result keeps it)."""
        return {"from": self.start.reuse_key, "new_rows": len(self.new_ids), "replayed_rows": self.replayed(batch_size),
                "scratch_rows": self.scratch_rows, "added_since_scratch": self.added_since_scratch}


def train_ids(train_path: Path) -> list[str]:
    import pyarrow.parquet as pq

    return pq.read_table(train_path, columns=["id"]).column("id").to_pylist()


def record_train_ids(folder: Path, split_version: str, train_path: Path) -> None:
    """Keep the ids of a split version's train rows (once), for the warm starts of later trainings."""
    path = _ids_file(folder, split_version)
    if not path.is_file():
        write_text(path, "\n".join(train_ids(train_path)))


def plan_warm_start(folder: Path, previous: Result | None, *, split_version: str, train_path: Path,
                    base_fingerprint: str, recipe_version: str, max_growth: float) -> WarmStart | None:
    """The warm start from `previous` (the current SFT training) onto the split `split_version`, or None when a
    training from step 0 is due: no previous training on another split with this base model and recipe, rows of its
    split changed or removed, or more rows added since the last training from scratch than `max_growth` of its rows."""
    if previous is None or previous.inputs.get("recipe_version") != recipe_version:
        return None
    if previous.inputs["base_fingerprint"] != base_fingerprint or previous.inputs["split_version"] == split_version:
        return None
    known_file = _ids_file(folder, previous.inputs["split_version"])
    if not known_file.is_file():
        return None
    known, current = set(known_file.read_text(encoding="utf-8").split()), train_ids(train_path)
    new = sorted(set(current) - known)
    if not new or not known <= set(current):
        return None
    chain = previous.inputs.get("warm_start") or {"scratch_rows": len(known), "added_since_scratch": 0}
    added = chain["added_since_scratch"] + len(new)
    if added > max_growth * chain["scratch_rows"]:
        return None
    return WarmStart(start=previous, new_ids=new, old_ids=sorted(known), scratch_rows=chain["scratch_rows"],
                     added_since_scratch=added)


def write_warm_rows(plan: WarmStart, train_path: Path, batch_size: int, seed: int, target: Path) -> Path:
    """The rows a warm start trains on, in `target`: every new row and a seeded sample of the old ones."""
    import pyarrow as pa
    import pyarrow.compute as pc
    import pyarrow.parquet as pq

    replayed = random.Random(seed).sample(plan.old_ids, plan.replayed(batch_size))
    wanted = set(plan.new_ids) | set(replayed)
    table = pq.read_table(train_path)
    with atomic_file(target) as tmp:
        pq.write_table(table.filter(pc.is_in(table.column("id"), value_set=pa.array(sorted(wanted)))), tmp)
    return target


def _ids_file(folder: Path, split_version: str) -> Path:
    return folder / f"train-ids-{split_version}.txt"


def describe(entry: dict[str, Any]) -> str:
    """One line for the logs about a spec's `warm_start` entry."""
    return (f"warm start from training {entry['from']}: {entry['new_rows']} new rows and {entry['replayed_rows']} "
            f"earlier ones of the task trained again ({entry['added_since_scratch']} rows added since the training "
            f"from step 0 on {entry['scratch_rows']} rows)")

