"""Where things live (data dir, artifact home) and atomic writes of files and directories."""

from __future__ import annotations

import glob
import hashlib
import json
import os
import shutil
import tempfile
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from ftpipe.config import check_task_name

REPO_ROOT = Path(__file__).resolve().parents[2]
SUPERSEDED_GRACE_S = 600
READ_GRACE_S = 60


class UnsafePathError(ValueError):
    """A path that would leave the directory it must stay in."""


def data_dir() -> Path:
    return Path(os.environ.get("FTPIPE_DATA_DIR") or REPO_ROOT / "data").resolve()


def home_dir() -> Path:
    return Path(os.environ.get("FTPIPE_HOME") or REPO_ROOT / ".ftpipe").resolve()


def contained(root: Path, *parts: str) -> Path:
    """`root/parts...`, refusing anything (`..`, absolute parts, symlinks) that resolves outside root.

    The path is returned unresolved, so a directory published by `atomic_dir` is named by its link.
    """
    root = root.resolve()
    path = root.joinpath(*parts)
    resolved = path.resolve()
    if resolved != root and root not in resolved.parents:
        raise UnsafePathError(f"{'/'.join(parts)!r} resolves to {resolved}, outside {root}")
    return path


def tasks_dir() -> Path:
    return data_dir() / "tasks"


def task_dir(task: str) -> Path:
    """`<data dir>/tasks/<task>/`; `task` (a folder name or partition key) must be a valid task name."""
    return contained(tasks_dir(), check_task_name(task))


@contextmanager
def atomic_file(target: Path) -> Iterator[Path]:
    """Yield a temporary path beside `target`; it replaces `target` only if the block succeeds, with `target`'s
    permissions (a new file `rw-r--r--`, not a temporary file's `rw-------`)."""
    target.parent.mkdir(parents=True, exist_ok=True)
    remove_leftovers(target)
    fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.{os.getpid()}.", suffix=".tmp", dir=target.parent)
    os.close(fd)
    try:
        yield Path(tmp)
        os.chmod(tmp, target.stat().st_mode & 0o777 if target.exists() else 0o644)
        os.replace(tmp, target)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


@contextmanager
def atomic_dir(target: Path) -> Iterator[Path]:
    """Yield an empty directory beside `target`; it becomes `target` in one step only if the block succeeds.

    `target` is a symlink to a hidden version directory, and publishing swaps the link with one rename: a
    reader sees the old version or the new one whole, never a partial one, even if the writer is killed.
    The version replaced last is kept until a write `SUPERSEDED_GRACE_S` after it was replaced, so a reader that
    opened it just before the swap can finish; older ones only `READ_GRACE_S`, for a reader that two quick swaps
    overtook.
    """
    target.parent.mkdir(parents=True, exist_ok=True)
    remove_leftovers(target)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.{os.getpid()}.", suffix=".tmp", dir=target.parent))
    try:
        yield tmp
        version = tmp.with_suffix(".v")
        os.rename(tmp, version)
        point(target, version)
        remove_leftovers(target)  # the version replaced before the one just replaced
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def point(link: Path, directory: Path) -> None:
    """Make `link` a relative symlink to `directory` in one step; the version it replaces is marked superseded now.

    A plain directory at `link` (written by an older ftpipe) is first moved aside as a hidden version.
    """
    previous = link.parent / os.readlink(link) if link.is_symlink() else None
    if link.exists() and previous is None:
        previous = link.with_name(f".{link.name}.{os.getpid()}.legacy.v")
        os.replace(link, previous)
    staged = link.with_name(f".{link.name}.{os.getpid()}.{uuid.uuid4().hex[:8]}.link")
    os.symlink(os.path.relpath(directory, link.parent), staged)
    os.replace(staged, link)
    if previous is not None and previous.is_dir():
        os.utime(previous)


def discard(published: Path) -> None:
    """Remove a directory published by `atomic_dir`: its link, then the version it points to."""
    version = published.parent / os.readlink(published)
    published.unlink()
    remove_tree(version)


def remove_tree(folder: Path) -> None:
    """Delete a folder after renaming it, so nobody finds it half-deleted under its old name."""
    doomed = folder.with_suffix(".tmp")
    os.rename(folder, doomed)
    shutil.rmtree(doomed, ignore_errors=True)


def _sibling_kind(target: Path, name: str) -> str | None:
    """`tmp`, `v` or `link` when `name` is one of `atomic_dir`'s own siblings of `target`, else None."""
    prefix = f".{target.name}."
    parts = name.removeprefix(prefix).split(".") if name.startswith(prefix) else []
    if len(parts) == 3 and parts[0].isdigit() and parts[2] in ("tmp", "v", "link"):
        return parts[2]
    return None


def _writer_gone(path: Path) -> bool:
    """A temporary file or link of this process or of a writer that is gone."""
    pid = int(path.name.split(".")[-3])
    return pid == os.getpid() or not process_alive(pid)


def remove_leftovers(target: Path) -> None:
    """Delete what no reader of `target` can still need: replaced versions past their grace (`SUPERSEDED_GRACE_S` for
    the one replaced last, `READ_GRACE_S` for older ones) and what killed writers left; never the live version."""
    live = Path(os.readlink(target)).name if target.is_symlink() else None
    siblings = [(sibling, _sibling_kind(target, sibling.name))
                for sibling in target.parent.glob(f".{glob.escape(target.name)}.*")]
    replaced = sorted((sibling for sibling, kind in siblings if kind == "v" and sibling.name != live),
                      key=lambda version: version.stat().st_mtime, reverse=True)
    doomed = [*(version for rank, version in enumerate(replaced)
                if _replaced_before(version, SUPERSEDED_GRACE_S if rank == 0 else READ_GRACE_S)),
              *(sibling for sibling, kind in siblings if kind in ("tmp", "link") and _writer_gone(sibling))]
    for sibling in doomed:
        if sibling.is_dir() and not sibling.is_symlink():
            remove_tree(sibling)
        else:
            sibling.unlink(missing_ok=True)


def _replaced_before(version: Path, seconds: float) -> bool:
    return time.time() - version.stat().st_mtime > seconds


def read_keyed_lines(path: Path) -> dict[str, dict[str, Any]]:
    """The JSON lines of an append-only file by their `key` (a later line wins); a line a crash cut short is skipped."""
    entries: dict[str, dict[str, Any]] = {}
    if path.is_file():
        for line in path.read_text(encoding="utf-8").splitlines():
            try:
                entry = json.loads(line)
            except json.JSONDecodeError:
                continue
            entries[entry["key"]] = entry
    return entries


def append_lines(path: Path, entries: list[dict[str, Any]]) -> None:
    """Append `entries` as JSON lines and fsync them; after a line a crash cut short, on a line of their own."""
    path.parent.mkdir(parents=True, exist_ok=True)
    text = "".join(json.dumps(entry, ensure_ascii=False) + "\n" for entry in entries)
    with path.open("ab+") as file:  # appends go to the end wherever the file was read
        end = file.seek(0, os.SEEK_END)
        if end:
            file.seek(end - 1)
            text = text if file.read(1) == b"\n" else "\n" + text
        file.write(text.encode("utf-8"))
        file.flush()
        os.fsync(file.fileno())


def remove_leftovers_in(folder: Path) -> None:
    """`remove_leftovers` for every target in `folder` with hidden siblings, also targets whose link was removed."""
    names = {sibling.name[1:].rsplit(".", 3)[0] for sibling in folder.glob(".*.*.*.*")}
    for name in sorted(names):
        remove_leftovers(folder / name)


# A process's start time is read as the boot time plus its age, and the boot time moves when the wall clock is set
# or slewed (seconds on a busy virtual machine): a live run worker must not read as started after it logged its pid.
# A pid is reused only after the kernel went through all the others, far more than a minute's worth.
START_TIME_SLACK_S = 60


@contextmanager
def exclusive(folder: Path, waiting: Callable[[], None] | None = None) -> Iterator[None]:
    """Hold an exclusive lock on `folder` (its `.lock` file) for the block; another process waits until it is free,
    calling `waiting` first where given (to say so)."""
    import fcntl

    folder.mkdir(parents=True, exist_ok=True)
    with open(folder / ".lock", "a") as handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
            free = True
        except BlockingIOError:
            free = False
        if not free:  # waited for outside the handler, so an interruption does not carry the BlockingIOError along
            if waiting:
                waiting()
            fcntl.flock(handle, fcntl.LOCK_EX)
        yield


def process_alive(pid: int, started_by: float | None = None) -> bool:
    """Whether process `pid` runs (a zombie does not); with `started_by` (a Unix time), also whether it had started
    by then, give or take `START_TIME_SLACK_S`, so a later process that reuses the pid of one that ended does not
    count."""
    import psutil

    try:
        process = psutil.Process(pid)
        running = process.status() != psutil.STATUS_ZOMBIE
        return running and (started_by is None or process.create_time() <= started_by + START_TIME_SLACK_S)
    except psutil.NoSuchProcess:
        return False


def write_text(target: Path, text: str) -> Path:
    with atomic_file(target) as tmp:
        tmp.write_text(text, encoding="utf-8")
    return target


def _feed(digest, path: Path) -> None:
    with path.open("rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)


def file_sha256(*paths: Path) -> str:
    """A hash of the files' bytes, one after the other (read in chunks, so large weights are never held whole)."""
    digest = hashlib.sha256()
    for path in paths:
        _feed(digest, path)
    return digest.hexdigest()


def sha256_of_files(paths: list[Path], root: Path) -> str:
    """A hash over the relative names and contents of files (order-independent)."""
    digest = hashlib.sha256()
    for path in sorted(paths, key=lambda p: p.relative_to(root).as_posix()):
        digest.update(path.relative_to(root).as_posix().encode("utf-8", "surrogateescape"))
        _feed(digest, path)
    return digest.hexdigest()
