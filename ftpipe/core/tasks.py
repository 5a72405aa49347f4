"""Task folders: `<data dir>/tasks/<task>/{task.yaml, raw/}`; each valid folder is one partition."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from ftpipe.config import TaskConfig, TaskConfigError, check_task_name, load_task_config
from ftpipe.core.storage import task_dir, tasks_dir


@dataclass
class Discovery:
    tasks: list[str] = field(default_factory=list)
    refused: dict[str, str] = field(default_factory=dict)


def discover_tasks(root: Path | None = None) -> Discovery:
    """Valid task folder names, and the folders refused with the reason."""
    root = root or tasks_dir()
    found = Discovery()
    for folder in sorted(p for p in root.iterdir() if p.is_dir()) if root.is_dir() else []:
        if folder.name.startswith("."):
            continue
        try:
            found.tasks.append(check_task_name(folder.name))
        except TaskConfigError as error:
            found.refused[folder.name] = str(error)
    return found


def task_config(task: str, overrides: str = "") -> TaskConfig:
    """The validated configuration of a task, with optional run overrides."""
    return load_task_config(task_dir(check_task_name(task)) / "task.yaml", overrides)
