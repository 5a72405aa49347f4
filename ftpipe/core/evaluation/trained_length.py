"""What the evaluation reads of the training that made a model: its training.max_length (it left rows that long out,
or cut them, so the report scores held-out rows that long apart from the others), its replay (the advice to forget
less) and its warm start, if any."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from ftpipe.core.modeling import chat_length
from ftpipe.core.results import read_result


def _training(model_dir: Path) -> dict[str, Any] | None:
    """The training settings of the training that made `model_dir` (None: not a training ftpipe published)."""
    result = read_result(model_dir)
    return result.produced.get("training") if result else None


def trained_length(model_dir: Path) -> dict[str, Any] | None:
    """{max_length, too_long} of the training that made `model_dir` (None: not a training ftpipe published)."""
    training = _training(model_dir)
    return {key: training[key] for key in ("max_length", "too_long")} if training else None


def trained_replay(model_dir: Path) -> float | None:
    """The training.replay of the training that made `model_dir` (None: not a training ftpipe published)."""
    training = _training(model_dir)
    return training.get("replay", 0.0) if training else None


def warm_start(model_dir: Path) -> dict[str, Any] | None:
    """{from, new_rows, replayed_rows} of the warm start (`retrain.warm_start`) of the training that made `model_dir`:
    it continued that training's adapter; None when it trained from the base (or is not an ftpipe training)."""
    result = read_result(model_dir)
    return result.inputs.get("warm_start") if result else None


def mark_over_max_length(records: list[dict[str, Any]], rows: list[dict], tokenizer, max_length: int) -> int:
    """Set each record's `over_max_length` (its row's conversation, in the chat template, is longer than
    `max_length` tokens); return how many are."""
    over = {row["id"]: chat_length(tokenizer, row["messages"]) > max_length for row in rows}
    for record in records:
        record["over_max_length"] = over[record["id"]]
    return sum(over.values())
