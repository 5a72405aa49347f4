"""Pieces every asset module uses: run config, task config, upstream results, data versions and Markdown metadata."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import dagster as dg

from ftpipe.config import TaskConfig, TaskConfigError
from ftpipe.core.layout import TaskLayout
from ftpipe.core.results import Result, read_result
from ftpipe.core.storage import file_sha256
from ftpipe.core.tasks import task_config
from ftpipe.core.readable import rounded
from ftpipe.core.text import markdown_table

GPU_POOL = "gpu"  # training, evaluation and merging: one step at a time per GPU (the limit is set in dagster.yaml)


class TaskRunConfig(dg.Config):
    """Launchpad overrides of the task's task.yaml for one run, e.g. `overrides: "split: {seed: 3}"`."""

    overrides: str = ""


def load_config(context: dg.AssetExecutionContext, config: TaskRunConfig) -> TaskConfig:
    """The task's configuration with this run's overrides; a broken one fails the step at once, without retries."""
    return effective_config(context.partition_key, config.overrides)


def effective_config(task: str, overrides: str = "") -> TaskConfig:
    """task.yaml with `overrides` (a YAML snippet) merged in; Failure (not retried) when it does not validate."""
    try:
        return task_config(task, overrides)
    except TaskConfigError as error:
        raise dg.Failure(description=str(error), allow_retries=False) from None


def run_overrides(context: dg.AssetExecutionContext | dg.AssetCheckExecutionContext, asset: str) -> str:
    """The launchpad overrides this run gave `asset` (none when the asset is not part of the run)."""
    ops = context.run.run_config.get("ops", {})
    return ops.get(dg.AssetKey(asset).to_python_identifier(), {}).get("config", {}).get("overrides", "")


def upstream(task: str, asset: str) -> Result:
    """The result `asset` published for `task`; the step fails, saying so, when there is none yet."""
    found = read_result(TaskLayout(task).output(asset), asset)
    if found is None:
        raise dg.Failure(description=f"{asset} of task {task!r} has no result yet: materialize {asset} first")
    return found


def file_version(*paths: Path) -> dg.DataVersion:
    """A data version from the bytes of the files an asset wrote."""
    return dg.DataVersion(file_sha256(*paths)[:16])


def rounded_floats(metadata: dict[str, Any]) -> dict[str, Any]:
    """`metadata` with its floats rounded for reading (the files keep the exact values)."""
    return {key: rounded(value) if isinstance(value, float) else value for key, value in metadata.items()}


def table(rows: list[dict[str, Any]], columns: list[str]) -> dg.MetadataValue:
    """`rows` as a Markdown table for the UI, one column per name in `columns`."""
    return dg.MetadataValue.md(markdown_table(columns, [[row.get(column, "") for column in columns] for row in rows]))
