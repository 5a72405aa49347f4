"""Finished trainings are kept by fingerprint: a recipe trained before is reused as it is, even after another one,
and never resumed from its last checkpoint."""

from __future__ import annotations

import re

import dagster as dg
import pytest

from ftpipe.assets import data, training
from ftpipe.core.layout import TaskLayout
from ftpipe.partitions import task_partitions
from ftpipe.resources import default_resources
from ftpipe_tests.builders import data_version, materialization

UPSTREAM = [data.raw_examples, data.deduplicated_examples, data.heldout_split, training.base_model]
RECIPE_B = {"ops": {"lora_adapter": {"config": {"overrides": "training: {learning_rate: 0.005}"}}}}


def train(instance: dg.DagsterInstance, task: str, run_config=None) -> tuple[dict, str, str]:
    """Materialize `lora_adapter` (and its upstream); (its metadata, its data version, the run's log)."""
    result = dg.materialize([*UPSTREAM, training.lora_adapter], instance=instance, partition_key=task,
                            resources=default_resources(), run_config=run_config)
    log = "\n".join(event.message or "" for event in instance.all_logs(result.run_id))
    return materialization(result, "lora_adapter"), data_version(result, "lora_adapter"), log


@pytest.mark.slow
def test_a_recipe_trained_before_another_is_reused_as_it_was_without_a_step(tiny_task: str) -> None:
    paths = TaskLayout(tiny_task)
    with dg.instance_for_test() as instance:
        instance.add_dynamic_partitions(task_partitions.name, [tiny_task])
        first, first_version, _ = train(instance, tiny_task)
        other, _, _ = train(instance, tiny_task, RECIPE_B)
        again, again_version, log = train(instance, tiny_task)

    assert not first["reused"] and not other["reused"]
    assert other["training_fingerprint"] != first["training_fingerprint"]
    assert again["reused"] is True and not re.search(r"step \d+/\d+", log) and "resuming" not in log
    assert again["mlflow_run_id"] == first["mlflow_run_id"] and again_version == first_version
    assert again["steps"] == first["steps"] and again["tokens_per_second"] == first["tokens_per_second"]
    current, kept = (paths.adapter(found["training_fingerprint"]) for found in (first, other))
    assert paths.output("lora_adapter").resolve() == current.resolve() and kept.is_dir()
    assert again["adapter_path"] == str(current)
