"""Where things live (data dir, artifact home) and atomic writes of files and directories."""

from __future__ import annotations

import hashlib
import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[2]


class UnsafePathError(ValueError):
    """A path that would leave the directory it must stay in."""


def data_dir() -> Path:
    return Path(os.environ.get("FTPIPE_DATA_DIR") or REPO_ROOT / "data").resolve()


def home_dir() -> Path:
    return Path(os.environ.get("FTPIPE_HOME") or REPO_ROOT / ".ftpipe").resolve()


def contained(root: Path, *parts: str) -> Path:
    """`root/parts...`, refusing anything (`..`, absolute parts, symlinks) that resolves outside root."""
    root = root.resolve()
    path = root.joinpath(*parts).resolve()
    if path != root and root not in path.parents:
        raise UnsafePathError(f"{'/'.join(parts)!r} resolves to {path}, outside {root}")
    return path


def tasks_dir() -> Path:
    return data_dir() / "tasks"


def task_dir(task: str) -> Path:
    return contained(tasks_dir(), task)


def artifact_dir(task: str, asset: str) -> Path:
    """`$FTPIPE_HOME/tasks/<task>/<asset>/` (written whole with `atomic_dir`)."""
    return contained(home_dir(), "tasks", task, asset)


@contextmanager
def atomic_file(target: Path) -> Iterator[Path]:
    """Yield a temporary path beside `target`; it replaces `target` only if the block succeeds."""
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent)
    os.close(fd)
    try:
        yield Path(tmp)
        os.replace(tmp, target)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


@contextmanager
def atomic_dir(target: Path) -> Iterator[Path]:
    """Yield an empty directory beside `target`; it replaces `target` only if the block succeeds.

    Readers never see a partial directory: the old one is renamed aside, the new one renamed in,
    and only then is the old one deleted.
    """
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent))
    try:
        yield tmp
        old = None
        if target.exists():
            old = target.with_name(f".{target.name}.old-{os.getpid()}")
            os.replace(target, old)
        os.replace(tmp, target)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def write_text(target: Path, text: str) -> Path:
    with atomic_file(target) as tmp:
        tmp.write_text(text, encoding="utf-8")
    return target


def sha256_of_files(paths: list[Path], root: Path) -> str:
    """A hash over the relative names and contents of files (order-independent)."""
    digest = hashlib.sha256()
    for path in sorted(paths, key=lambda p: p.relative_to(root).as_posix()):
        digest.update(path.relative_to(root).as_posix().encode())
        with path.open("rb") as handle:
            for chunk in iter(lambda: handle.read(1 << 20), b""):
                digest.update(chunk)
    return digest.hexdigest()
