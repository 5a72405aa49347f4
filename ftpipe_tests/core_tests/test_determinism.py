"""The same raw files give byte-identical data outputs, whatever order they were created or listed in."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from ftpipe.core import dedup, records, split
from ftpipe.core.similarity import Settings
from ftpipe_tests.builders import make_task
from ftpipe_tests.tiny_model import toy_rows

NEAR = Settings(threshold=0.8, num_perm=64, shingle_words=3)


def raw_files() -> dict[str, str]:
    """Four files in three formats whose rows overlap across files, and one bad row."""
    rows = [{"messages": r["messages"]} for r in toy_rows(120, seed=5)]
    near = [{"prompt": r["messages"][0]["content"] + " please", "completion": r["messages"][1]["content"]} for r in rows[:30]]
    return {
        "a.jsonl": "".join(json.dumps(r) + "\n" for r in rows[:70]) + "{broken\n",
        "b.json": json.dumps(rows[50:120]),
        "sub/c.csv": "prompt,completion\n" + "".join(f'"{r["prompt"]}","{r["completion"]}"\n' for r in near),
        "sub/d.jsonl": "".join(json.dumps(r) + "\n" for r in rows[100:]),
    }


def build(task_folder: Path, out: Path) -> dict[str, bytes]:
    """raw_examples -> deduplicated_examples -> heldout_split into `out`; every output file's bytes."""
    records.build_raw_examples(task_folder, out / "raw", records.FormatSpec())
    dedup.build_deduplicated(out / "raw" / "examples.parquet", out / "dedup", NEAR)
    split.build_split(out / "dedup" / "examples.parquet", out / "split", eval_fraction=0.2, seed=0, settings=NEAR)
    return {f"{step}/{path.name}": path.read_bytes() for step in ("raw", "dedup", "split") for path in (out / step).iterdir()}


def test_outputs_are_byte_identical_whatever_the_file_order(
    ftpipe_env: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    files = raw_files()
    forward = make_task(ftpipe_env, "forward", {})
    backward = make_task(ftpipe_env, "backward", {})
    for folder, names in ((forward, sorted(files)), (backward, sorted(files, reverse=True))):
        for name in names:  # created in opposite orders
            (folder / "raw" / name).parent.mkdir(parents=True, exist_ok=True)
            (folder / "raw" / name).write_text(files[name])

    first = build(forward, tmp_path / "first")
    again = build(forward, tmp_path / "again")
    walk = os.walk
    monkeypatch.setattr(records.os, "walk", lambda top: ((r, d[::-1], f[::-1]) for r, d, f in reversed(list(walk(top)))))
    backwards = build(backward, tmp_path / "backwards")

    assert {"raw/examples.parquet", "dedup/examples.parquet", "dedup/removed.jsonl", "split/train.parquet",
            "split/eval.parquet", "split/split.json"} <= first.keys()
    assert b"exact_duplicate" in first["dedup/removed.jsonl"], "which copy is kept depends on the order rows are seen"
    assert again == first
    assert backwards == first
