"""The task layout: every artifact path stays inside its task's folder, and pruning removes only what is stale."""

from __future__ import annotations

import os
import time
from pathlib import Path

import pytest

from ftpipe.core.layout import TaskLayout
from ftpipe.core.storage import UnsafePathError, atomic_dir, home_dir

LONG_AGO = time.time() - 24 * 3600


def checkpoint_folder(paths: TaskLayout, fingerprint: str, idle: bool) -> Path:
    folder = paths.checkpoints(fingerprint)
    (folder / "checkpoint-3").mkdir(parents=True)
    if idle:
        os.utime(folder, (LONG_AGO, LONG_AGO))
    return folder


def merged_model(paths: TaskLayout, name: str) -> Path:
    folder = paths.merged(name, "0123456789abcdef")
    with atomic_dir(folder) as tmp:
        (tmp / "model.safetensors").write_text(name)
    return folder


def test_every_path_is_under_the_tasks_folder() -> None:
    paths = TaskLayout("shop")
    found = [paths.asset("raw_examples"), paths.examples("deduplicated_examples"), *paths.split_files, paths.spec_file(),
             paths.output("lora_adapter"), paths.output("merged_model"), paths.checkpoints("f" * 16),
             paths.merged("b" * 16, "a" * 16), paths.eval_base_cache]
    assert all(home_dir() / "tasks" / "shop" in path.parents for path in found)


def test_a_link_out_of_the_tasks_folder_is_refused(tmp_path: Path) -> None:
    paths = TaskLayout("shop")
    outside = tmp_path / "elsewhere"
    (outside / "abc").mkdir(parents=True)
    paths.root.mkdir(parents=True)
    (paths.root / "checkpoints").symlink_to(outside)
    with pytest.raises(UnsafePathError, match="outside"):
        paths.checkpoints("abc")
    with pytest.raises(UnsafePathError, match="outside"):
        paths.prune_checkpoints(keep="new")
    assert (outside / "abc").is_dir(), "nothing outside the task's folder is touched"


def test_pruning_checkpoints_keeps_the_current_training_and_any_still_written() -> None:
    paths = TaskLayout("shop")
    current = checkpoint_folder(paths, "current", idle=True)
    stale = checkpoint_folder(paths, "stale", idle=True)
    busy = checkpoint_folder(paths, "busy", idle=False)
    assert paths.prune_checkpoints(keep="current") == ["stale"]
    assert current.is_dir() and busy.is_dir() and not stale.exists()
    assert sorted(p.name for p in paths.path("checkpoints").iterdir()) == ["busy", "current"]


def test_pruning_merged_models_keeps_the_named_ones_and_the_latest() -> None:
    paths = TaskLayout("shop")
    champion, old, newest = (merged_model(paths, name) for name in ("champion", "old00000", "newest00"))
    paths.mark_latest_merged(newest)
    assert paths.prune_merged(keep={champion.name}) == [old.name]
    assert champion.is_dir() and newest.is_dir() and not old.exists()
    assert paths.output("merged_model").resolve() == newest.resolve()
    assert not any(p.name.startswith(f".{old.name}.") for p in paths.path("merged_model").iterdir()), "its version went too"


def test_pruning_merged_models_removes_replaced_versions_of_every_model() -> None:
    """A model written twice (two runs merging the same adapter) leaves its first copy beside it; so does a model whose
    link is gone. Pruning removes such copies once the grace period for readers of an old copy has passed."""
    paths = TaskLayout("shop")
    twice, gone = merged_model(paths, "twice000"), merged_model(paths, "gone0000")
    merged_model(paths, "twice000")
    gone.unlink()
    paths.mark_latest_merged(twice)
    folder = paths.path("merged_model")
    copies = [p for p in folder.iterdir() if p.name.endswith(".v") and p.resolve() != twice.resolve()]
    assert len(copies) == 2
    assert paths.prune_merged(keep={twice.name}) == [] and all(p.is_dir() for p in copies), "readers get time"
    for copy in copies:
        os.utime(copy, (LONG_AGO, LONG_AGO))
    assert paths.prune_merged(keep={twice.name}) == []
    assert not any(p.exists() for p in copies)
    assert paths.output("merged_model").resolve() == twice.resolve() and (twice / "model.safetensors").is_file()
    assert sorted(p.name for p in folder.iterdir() if p.name.endswith(".v")) == [os.readlink(twice)]
