"""Warm-start retraining (`retrain.warm_start`) through the assets: a split that grew a little continues the previous
adapter on the new rows and a replayed sample of the old ones; anything else trains from step 0."""

from __future__ import annotations

import json
import math

import dagster as dg
import pyarrow.parquet as pq
import pytest

from ftpipe.assets import data, training
from ftpipe.core.layout import TaskLayout
from ftpipe.core.storage import task_dir
from ftpipe.partitions import task_partitions
from ftpipe.resources import default_resources
from ftpipe_tests.builders import append_rows, materialization

UPSTREAM = [data.raw_examples, data.deduplicated_examples, data.heldout_split, training.base_model]


def train(instance: dg.DagsterInstance, task: str) -> dict:
    """Materialize `lora_adapter` and its upstream; its metadata."""
    result = dg.materialize([*UPSTREAM, training.lora_adapter], instance=instance, partition_key=task,
                            resources=default_resources())
    return materialization(result, "lora_adapter")


def train_ids(task: str) -> set[str]:
    return set(pq.read_table(TaskLayout(task).split_files[0], columns=["id"]).column("id").to_pylist())


@pytest.mark.slow
def test_a_split_that_grew_a_little_continues_the_adapter_and_more_growth_or_a_removed_row_starts_over(
    tiny_task: str,
) -> None:
    folder, paths = task_dir(tiny_task), TaskLayout(tiny_task)
    with (folder / "task.yaml").open("a") as handle:
        handle.write("retrain: {warm_start: true, warm_start_max_growth: 0.1}\n")
    with dg.instance_for_test() as instance:
        instance.add_dynamic_partitions(task_partitions.name, [tiny_task])
        first = train(instance, tiny_task)
        before = train_ids(tiny_task)
        append_rows(folder, "more.jsonl", 3, seed=11)
        warm = train(instance, tiny_task)
        new = train_ids(tiny_task) - before
        again = train(instance, tiny_task)
        append_rows(folder, "even_more.jsonl", 8, seed=12)  # past a tenth of the first training's rows in all
        grown = train(instance, tiny_task)
        (folder / "raw" / "more.jsonl").unlink()
        shrunk = train(instance, tiny_task)

    assert first["warm_started"] is False and not first["reused"]
    assert len(new) >= 1 and train_ids(tiny_task) != before
    assert warm["warm_started"] is True and warm["warm_start_from"] == first["training_fingerprint"]
    replayed = max(3 * len(new), 8 - len(new))  # three per new row, at least a batch in all
    assert warm["warm_start_new_rows"] == len(new) and warm["warm_start_replayed_rows"] == replayed
    assert warm["steps"] == math.ceil((len(new) + replayed) / 8) < first["steps"], "one epoch of those rows"
    assert warm["training_fingerprint"] != first["training_fingerprint"]
    rows = pq.read_table(paths.warm_start_cache / f"rows-{warm['training_fingerprint']}.parquet").column("id")
    assert new <= set(rows.to_pylist()) <= before | new and len(rows) == len(new) + replayed
    weights = json.loads((paths.adapter(warm["training_fingerprint"]) / "adapter_config.json").read_text())
    assert weights["r"] == json.loads((paths.adapter(first["training_fingerprint"]) / "adapter_config.json")
                                      .read_text())["r"], "the same adapter, trained further, not a second one"
    assert again["reused"] is True and again["training_fingerprint"] == warm["training_fingerprint"]
    assert grown["warm_started"] is False and grown["steps"] == first["steps"], "too many rows since step 0"
    assert shrunk["warm_started"] is False, "rows removed: a warm start would keep what they taught"
