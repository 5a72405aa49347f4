"""Pieces every asset module uses: run config, task config, data versions, Markdown tables."""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any

import dagster as dg

from ftpipe.config import TaskConfig
from ftpipe.core.tasks import task_config


GPU_POOL = "gpu"  # training and evaluation: one step at a time per GPU (the limit is set in dagster.yaml)


class TaskRunConfig(dg.Config):
    """Launchpad overrides of the task's task.yaml for one run, e.g. `overrides: "split: {seed: 3}"`."""

    overrides: str = ""


def load_config(context: dg.AssetExecutionContext, config: TaskRunConfig) -> TaskConfig:
    return task_config(context.partition_key, config.overrides)


def file_version(*paths: Path) -> dg.DataVersion:
    """A data version from the bytes of the files an asset wrote."""
    digest = hashlib.sha256()
    for path in paths:
        digest.update(path.read_bytes())
    return dg.DataVersion(digest.hexdigest()[:16])


def markdown_table(rows: list[dict[str, Any]], columns: list[str], limit: int = 200) -> dg.MetadataValue:
    """A Markdown table for the UI; cells are shortened and pipes escaped."""

    def cell(value: Any) -> str:
        text = " ".join(str(value).split())
        return (text[:limit] + "…" if len(text) > limit else text).replace("|", "\\|")

    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(cell(row.get(c, "")) for c in columns) + " |" for row in rows]
    return dg.MetadataValue.md("\n".join(lines))
