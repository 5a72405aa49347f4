"""Task folders: `<data dir>/tasks/<task>/{task.yaml, raw/}`; each valid folder is one partition."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from ftpipe.config import TaskConfig, TaskConfigError, check_task_name, load_task_config
from ftpipe.core.storage import sha256_of_files, task_dir, tasks_dir


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


def task_files_version(task: str) -> str:
    """A hash of what the pipeline reads from a task folder: `task.yaml` and the files under `raw/`."""
    folder = task_dir(task)
    candidates = [folder / "task.yaml", *(folder / "raw").rglob("*")]
    inside = [p for p in candidates if p.is_file() and folder in p.resolve().parents]
    return sha256_of_files(inside, folder)[:16]
