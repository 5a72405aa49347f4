"""When a training is warm-started (`retrain.warm_start`) and when it starts from step 0."""

from __future__ import annotations

from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from ftpipe.core.results import Result
from ftpipe.core.training.warm_start import plan_warm_start, record_train_ids, write_warm_rows


def split(folder: Path, name: str, ids: list[str]) -> Path:
    path = folder / f"{name}.parquet"
    pq.write_table(pa.table({"id": ids, "text": [f"row {i}" for i in ids]}), path)
    return path


def trained(split_version: str, recipe: str = "r1", base: str = "b1", chain: dict | None = None) -> Result:
    inputs = {"split_version": split_version, "base_fingerprint": base, "recipe_version": recipe}
    return Result(kind="lora_adapter", reuse_key=f"fp-{split_version}", inputs={**inputs, **({"warm_start": chain}
                                                                                             if chain else {})})


@pytest.fixture
def cache(tmp_path: Path) -> Path:
    record_train_ids(tmp_path / "cache", "v1", split(tmp_path, "v1", [f"r{i:03}" for i in range(100)]))
    return tmp_path / "cache"


def plan(cache: Path, previous: Result, train: Path, **changed):
    settings = {"split_version": train.stem, "train_path": train, "base_fingerprint": "b1", "recipe_version": "r1",
                "max_growth": 0.1, **changed}
    return plan_warm_start(cache, previous, **settings)


def test_new_rows_within_the_share_warm_start_with_their_replayed_sample(cache: Path, tmp_path: Path) -> None:
    grown = split(tmp_path, "v2", [f"r{i:03}" for i in range(104)])
    warm = plan(cache, trained("v1"), grown)
    assert warm.new_ids == ["r100", "r101", "r102", "r103"] and len(warm.old_ids) == 100
    assert (warm.scratch_rows, warm.added_since_scratch, warm.replayed(batch_size=8)) == (100, 4, 12)
    rows = pq.read_table(write_warm_rows(warm, grown, 8, seed=0, target=tmp_path / "rows.parquet"))
    assert len(rows) == 16 and {f"r{i}" for i in range(100, 104)} <= set(rows.column("id").to_pylist())
    assert rows.column("text").to_pylist()[-1] == "row r103", "whole rows, as the split has them"


@pytest.mark.parametrize("why, previous, changed", [
    ("another recipe", trained("v1", recipe="r0"), {}),
    ("another base model", trained("v1", base="b0"), {}),
    ("trained on this very split", trained("v2"), {}),
    ("rows since step 0 over the share", trained("v1", chain={"scratch_rows": 90, "added_since_scratch": 6}), {}),
    ("a lower share allowed", trained("v1"), {"max_growth": 0.03}),
    ("no rows of its split known", trained("v0"), {}),
])
def test_a_training_starts_from_step_0_with(why: str, previous: Result, changed: dict, cache: Path,
                                            tmp_path: Path) -> None:
    assert plan(cache, previous, split(tmp_path, "v2", [f"r{i:03}" for i in range(104)]), **changed) is None, why


def test_a_removed_or_changed_row_starts_from_step_0(cache: Path, tmp_path: Path) -> None:
    assert plan(cache, trained("v1"), split(tmp_path, "v2", [f"r{i:03}" for i in range(1, 102)])) is None


def test_the_log_says_what_changed_since_the_current_adapter(tmp_path: Path) -> None:
    from ftpipe.core.tasks import TrainingInputs, why_training_runs

    base = Result(kind="base_model", reuse_key="base-1")
    found = TrainingInputs(tmp_path / "train.parquet", tmp_path / "eval.parquet", "split-2", base, "fp-new", "recipe-1")
    current = Result(kind="lora_adapter", reuse_key="fp-old",
                     inputs={"split_version": "split-1", "base_fingerprint": "base-1", "recipe_version": "recipe-1"})
    assert why_training_runs(found, None) == "the task has no adapter yet"
    assert why_training_runs(found, current) == "the held-out split changed since the current adapter"
    current.inputs.update(base_fingerprint="base-0", recipe_version="recipe-0")
    assert why_training_runs(found, current) == (
        "the held-out split, the base model and the training settings changed since the current adapter")
    assert why_training_runs(found, Result(kind="lora_adapter", reuse_key="fp-new")) == (
        "the training of these inputs did not finish")
