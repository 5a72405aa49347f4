"""Atomic directories: readers see a whole version or the previous one, even when a writer is killed mid-write."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pyarrow.parquet as pq
import pytest

from ftpipe.core import storage
from ftpipe.core.layout import (
    EVAL, EVAL_PREFERENCES, EXAMPLES, PREFERENCES, QUARANTINE, REMOVED, SPLIT_RECORD, TRAIN, TRAIN_PREFERENCES, TaskLayout,
)
from ftpipe.core.results import RESULT_FILE
from ftpipe.core.storage import UnsafePathError, atomic_dir, contained, file_sha256, task_dir
from ftpipe_tests.builders import make_task
from ftpipe_tests.tiny_model import toy_rows

FILES = 5
WRITER = """
import sys, time
from pathlib import Path
from ftpipe.core import storage
from ftpipe.core.storage import atomic_dir
target, versions, pause = Path(sys.argv[1]), int(sys.argv[2]), float(sys.argv[3])
for version in range(2, versions + 2):
    with atomic_dir(target) as tmp:
        for i in range({files}):
            (tmp / f"part{{i}}").write_text(str(version))
            print("writing", flush=True)
            time.sleep(pause)
""".format(files=FILES)


def publish(target: Path, version: int) -> None:
    with atomic_dir(target) as tmp:
        for i in range(FILES):
            (tmp / f"part{i}").write_text(str(version))


def versions_seen(target: Path) -> set[str]:
    """The version in every file of `target`, read like a reader does: resolve the path once, then read it all.

    Fails on a partial or mixed directory; a version deleted after it was superseded reads as an empty set.
    """
    version = Path(os.path.realpath(target))
    try:
        names = sorted(p.name for p in version.iterdir())
        assert names == [f"part{i}" for i in range(FILES)], names
        return {(version / name).read_text() for name in names}
    except FileNotFoundError:
        return set()


def writer(target: Path, versions: int, pause: float) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-c", WRITER, str(target), str(versions), str(pause)],
                            stdout=subprocess.PIPE, text=True)


def test_readers_never_see_a_partial_directory_while_versions_are_published(tmp_path: Path) -> None:
    target = tmp_path / "asset"
    publish(target, 1)
    process = writer(target, versions=100, pause=0.0)
    seen = set()
    while process.poll() is None:
        versions = versions_seen(target)
        assert len(versions) <= 1, f"a reader saw files of different versions: {versions}"
        seen |= versions
    assert process.returncode == 0
    assert versions_seen(target) == {"101"} and len(seen) > 3
    assert not any(p.name.endswith((".tmp", ".link")) for p in tmp_path.iterdir()), "no leftovers"


def test_a_writer_killed_mid_write_leaves_the_previous_version_then_its_leftovers_go(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    target = tmp_path / "asset"
    publish(target, 1)
    process = writer(target, versions=1, pause=5.0)
    assert process.stdout.readline().strip() == "writing"
    process.send_signal(signal.SIGKILL)
    process.wait()
    assert versions_seen(target) == {"1"}
    assert any(p.name.endswith(".tmp") for p in tmp_path.iterdir()), "the killed writer left its temporary dir"
    publish(target, 3)
    assert versions_seen(target) == {"3"}
    assert not any(p.name.endswith(".tmp") for p in tmp_path.iterdir()), "the next write removed the leftovers"
    monkeypatch.setattr(storage, "SUPERSEDED_GRACE_S", 0)
    publish(target, 4)
    hidden = {p.name for p in tmp_path.iterdir() if p.name.startswith(".")}
    assert hidden == {os.readlink(target)}, "a replaced version goes once its grace period is over"


def test_re_publishing_keeps_the_live_version_and_only_the_one_it_replaced(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(storage, "READ_GRACE_S", 0)  # writes minutes apart, as re-materializations are
    target = tmp_path / "asset"
    replaced = []
    for version in range(1, 5):
        if target.is_symlink():
            replaced.append(os.readlink(target))
        publish(target, version)
        hidden = {p.name for p in tmp_path.iterdir() if p.name.startswith(".")}
        assert hidden == {os.readlink(target), *replaced[-1:]}, f"after {version} writes: {sorted(hidden)}"
    assert versions_seen(target) == {"4"} and versions_seen(tmp_path / replaced[-1]) == {"3"}


def test_a_file_write_removes_what_a_killed_writer_left(tmp_path: Path) -> None:
    gone = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    leftover = tmp_path / f".metrics.json.{gone.stdout.strip()}.k1ll3d_x.tmp"
    leftover.write_text('{"half": ')
    storage.write_text(tmp_path / "metrics.json", "{}")
    assert not leftover.exists() and (tmp_path / "metrics.json").read_text() == "{}"


DATA_STEPS = """
import sys
from pathlib import Path
from ftpipe.core import dedup, records, split
from ftpipe.core.similarity import Settings
task, out = Path(sys.argv[1]), Path(sys.argv[2])
near = Settings(threshold=0.8, num_perm=64, shingle_words=3)
while True:
    records.build_raw_examples(task, out / "raw_examples", records.FormatSpec())
    dedup.build_deduplicated(out / "raw_examples" / "examples.parquet", out / "deduplicated_examples", near)
    split.build_split(out / "deduplicated_examples" / "examples.parquet", out / "heldout_split",
                      eval_fraction=0.2, seed=0, settings=near)
    print("round", flush=True)
"""
OUTPUTS = {
    "raw_examples": sorted([EXAMPLES, PREFERENCES, QUARANTINE, RESULT_FILE]),
    "deduplicated_examples": sorted([EXAMPLES, PREFERENCES, REMOVED, RESULT_FILE]),
    "heldout_split": sorted([EVAL, EVAL_PREFERENCES, RESULT_FILE, SPLIT_RECORD, TRAIN, TRAIN_PREFERENCES]),
}


def check_outputs(out: Path) -> None:
    """Every output dir is whole: its files all there, every Parquet and JSON file readable."""
    for asset, names in OUTPUTS.items():
        folder = out / asset
        assert sorted(p.name for p in folder.iterdir()) == names, asset
        for name in names:
            if name.endswith(".parquet"):
                pq.read_table(folder / name)
            elif name.endswith(".json"):
                json.loads((folder / name).read_text())
    split_rows = sum(pq.read_metadata(out / "heldout_split" / n).num_rows for n in ("train.parquet", "eval.parquet"))
    assert split_rows > 0


def writing(out: Path, pid: int) -> bool:
    """Whether process `pid` has a temporary file or folder beside an output: a write it started and did not publish."""
    return any(p.name.endswith(".tmp") and f".{pid}." in p.name for p in out.iterdir())


def wait_until_writing(out: Path, process: subprocess.Popen, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while not writing(out, process.pid):
        assert process.poll() is None and time.monotonic() < deadline, "the data steps never started a write"
        time.sleep(0.002)


def test_killing_the_data_steps_at_random_moments_never_leaves_a_partial_output(ftpipe_env: Path, tmp_path: Path) -> None:
    folder = make_task(ftpipe_env, "big", {"rows.jsonl": [{"messages": r["messages"]} for r in toy_rows(3000, seed=1)]})
    out = tmp_path / "out"
    command = [sys.executable, "-c", DATA_STEPS, str(folder), str(out)]
    first = subprocess.Popen(command, stdout=subprocess.PIPE, text=True)
    assert first.stdout.readline().strip() == "round"  # one whole version of every output exists
    first.kill()
    first.wait()
    killed_mid_write = 0
    for delay in (0.0, 0.01, 0.05, 0.2, 0.5, 0.8):
        process = subprocess.Popen(command, stdout=subprocess.PIPE, text=True)
        wait_until_writing(out, process)
        time.sleep(delay)  # somewhere inside the three steps, from that write on
        process.send_signal(signal.SIGKILL)
        process.wait()
        killed_mid_write += writing(out, process.pid)
        check_outputs(out)
    assert killed_mid_write, "no kill landed inside a write, so nothing was tested"


@pytest.mark.parametrize("part", ["../escape", "/etc", "a/../../escape", "link"])
def test_paths_cannot_leave_their_root(tmp_path: Path, part: str) -> None:
    root = tmp_path / "root"
    root.mkdir()
    (root / "link").symlink_to(tmp_path)
    with pytest.raises(UnsafePathError, match="outside"):
        contained(root, part)
    assert contained(root, "a/../b") == root.resolve() / "a/../b"


@pytest.mark.parametrize("key", ["../other", "..", "/tmp", "a/b", ".hidden", "Upper"])
def test_task_names_and_partition_keys_cannot_escape(key: str) -> None:
    for path_of in (task_dir, lambda task: TaskLayout(task).root):
        with pytest.raises(ValueError, match="invalid name"):
            path_of(key)


def test_file_hash_streams_the_files_one_after_the_other(tmp_path: Path) -> None:
    import hashlib

    parts = [tmp_path / "a", tmp_path / "b"]
    parts[0].write_bytes(b"x" * (3 << 20))
    parts[1].write_bytes(b"tail")
    assert file_sha256(*parts) == hashlib.sha256(b"x" * (3 << 20) + b"tail").hexdigest()


def test_a_process_is_alive_until_it_ends_and_a_later_one_with_its_pid_is_another() -> None:
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    deadline = time.monotonic() + 30
    while storage.process_alive(child.pid) and time.monotonic() < deadline:  # a zombie until waited for: not alive
        time.sleep(0.1)
    assert not storage.process_alive(child.pid)
    child.wait()
    assert storage.process_alive(os.getpid()) and storage.process_alive(os.getpid(), started_by=time.time())
    assert not storage.process_alive(os.getpid(), started_by=0), "this process started after time 0"
    started = psutil.Process().create_time()
    assert storage.process_alive(os.getpid(), started_by=started - 5), (
        "a clock set back seconds between the start and the logged time does not make a live process another")
    assert not storage.process_alive(os.getpid(), started_by=started - 600), "a pid reused minutes later"


def test_keyed_lines_appended_after_a_line_a_crash_cut_short_are_all_read_back(tmp_path: Path) -> None:
    path = tmp_path / "cache.jsonl"
    storage.append_lines(path, [{"key": "a", "answer": "1"}])
    with path.open("a") as file:
        file.write('{"key": "b", "ans')  # a crash mid-line
    storage.append_lines(path, [{"key": "c", "answer": "3"}, {"key": "a", "answer": "4"}])
    assert storage.read_keyed_lines(path) == {"a": {"key": "a", "answer": "4"}, "c": {"key": "c", "answer": "3"}}


def test_a_file_written_whole_keeps_its_permissions_and_a_new_one_is_readable_by_all(tmp_path: Path) -> None:
    new, kept = tmp_path / "new.jsonl", tmp_path / "kept.jsonl"
    storage.write_text(new, "{}\n")
    kept.write_text("")
    kept.chmod(0o664)
    storage.write_text(kept, "{}\n")
    assert (new.stat().st_mode & 0o777, kept.stat().st_mode & 0o777) == (0o644, 0o664)
