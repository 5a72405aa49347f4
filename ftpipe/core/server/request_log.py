"""The serving request log: every request and response as one JSON line, in segments per task.

    $FTPIPE_HOME/tasks/<task>/requests/
      <start>-<pid>-<token>.jsonl.open    the segment being written (each record flushed as it is appended)
      <start>-<pid>-<token>.jsonl         a finished segment: fsynced, then renamed, so it is whole or absent

A crash loses at most the open segment's unflushed tail; readers take the open segments' whole lines too.
For a task with `serving.log_content: false`, messages and outputs are kept only as hashes and sizes.
"""

from __future__ import annotations

import hashlib
import json
import os
import threading
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

from ftpipe.core.layout import TaskLayout

# the header by which ftpipe's own requests (a teacher answering prompts for distillation) say why they were sent:
# the log keeps it as the record's `purpose`, and the production report leaves such requests out
PURPOSE_HEADER = "X-Ftpipe-Purpose"

OPEN_SUFFIX = ".open"
SEGMENT_SUFFIX = ".jsonl"
SEGMENT_RECORDS = 1000
SEGMENT_SECONDS = 60.0
CLIENT_CLOSED = 499  # the status logged for a stream the client closed early (a client-side status, as in nginx)


def requests_dir(task: str) -> Path:
    return TaskLayout(task).requests_dir


def redacted(text: str) -> dict[str, Any]:
    """What is kept of a text when content logging is off: its hash and size."""
    return {"sha256": hashlib.sha256(text.encode()).hexdigest(), "chars": len(text)}


@dataclass
class _Segment:
    path: Path
    handle: IO[str]
    opened: float
    records: int = 0


@dataclass
class RequestLog:
    """Appends records to the open segment of their task; thread-safe."""

    without_content: set[str] = field(default_factory=set)  # tasks whose messages and outputs are kept as hashes
    segment_records: int = SEGMENT_RECORDS
    segment_seconds: float = SEGMENT_SECONDS
    _open: dict[str, _Segment] = field(default_factory=dict)
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def append(self, record: dict[str, Any]) -> None:
        """Write `record` (it names its `task`; `messages` and `output` are redacted for `without_content` tasks)."""
        if record["task"] in self.without_content:
            record = {**record, "messages": redacted(json.dumps(record.get("messages"))),
                      "output": redacted(record.get("output") or "")}
        line = json.dumps(record, ensure_ascii=False) + "\n"
        with self._lock:
            segment = self._segment(record["task"])
            segment.handle.write(line)
            segment.handle.flush()
            segment.records += 1
            if segment.records >= self.segment_records:
                self._finish(record["task"])

    def rotate(self, now: float | None = None) -> None:
        """Finish every segment open longer than `segment_seconds` (called from time to time)."""
        now = time.time() if now is None else now
        with self._lock:
            for task in [t for t, s in self._open.items() if now - s.opened >= self.segment_seconds]:
                self._finish(task)

    def close(self) -> None:
        with self._lock:
            for task in list(self._open):
                self._finish(task)

    def _segment(self, task: str) -> _Segment:
        found = self._open.get(task)
        if found is None:
            folder = requests_dir(task)
            folder.mkdir(parents=True, exist_ok=True)
            now = time.time_ns()  # names sort by start; the token keeps apart two started at once
            stamp = time.strftime("%Y%m%dT%H%M%S", time.gmtime(now / 1e9)) + f".{now % 1_000_000_000:09d}"
            path = folder / f"{stamp}-{os.getpid()}-{uuid.uuid4().hex[:8]}{SEGMENT_SUFFIX}{OPEN_SUFFIX}"
            found = self._open[task] = _Segment(path, path.open("a", encoding="utf-8"), time.time())
        return found

    def _finish(self, task: str) -> None:
        segment = self._open.pop(task)
        os.fsync(segment.handle.fileno())
        segment.handle.close()
        segment.path.rename(segment.path.with_name(segment.path.name.removesuffix(OPEN_SUFFIX)))


def segments(task: str) -> list[Path]:
    """The task's segments, finished and open, oldest first."""
    folder = requests_dir(task)
    if not folder.is_dir():
        return []
    return sorted(p for p in folder.iterdir() if p.name.endswith((SEGMENT_SUFFIX, SEGMENT_SUFFIX + OPEN_SUFFIX)))


def read_records(task: str, since: float | None = None) -> list[dict[str, Any]]:
    """Every whole record of the task's segments, oldest segment first (a torn last line of a crashed writer's
    open segment is left out); with `since` (a Unix time), not those of segments last written before it."""
    records = []
    for path in segments(task):
        if since is None or path.stat().st_mtime >= since:
            records.extend(filter(None, map(_record, path.read_text(encoding="utf-8").splitlines())))
    return records


def find_record(task: str, request_id: str) -> dict[str, Any] | None:
    """The record of `request_id`, searched from the newest segment back (a correction mostly follows its answer
    soon), parsing only the lines that hold the id; None when the log has none."""
    for path in reversed(segments(task)):
        for line in path.read_text(encoding="utf-8").splitlines():
            if request_id in line and (record := _record(line)) and record.get("request_id") == request_id:
                return record
    return None


def _record(line: str) -> dict[str, Any] | None:
    try:
        return json.loads(line)
    except json.JSONDecodeError:
        return None
