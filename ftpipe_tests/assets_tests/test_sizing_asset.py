"""`lora_adapter` sizes its training before launching it: steps and tokens as trained, minutes from a calibration
or the previous training's rate, and a warning when the run's max runtime is too short; checked against real runs."""

from __future__ import annotations

import json

import dagster as dg
import pytest

from ftpipe.assets import data, training
from ftpipe.core import readable
from ftpipe.core.layout import TaskLayout
from ftpipe.partitions import task_partitions
from ftpipe.resources import default_resources
from ftpipe_tests.builders import materialization

RATE_FACTOR = 3.0  # an estimate from the previous training's rate is within 3x of the measured time (the tiny
# model trains in seconds, so a busy machine moves it more than it moves a real training)
CALIBRATION_FACTOR = 5.0  # the calibration leaves out evaluations and the end of the program: looser
TWO_EPOCHS = {"ops": {"lora_adapter": {"config": {"overrides": "training: {max_steps: -1, epochs: 2, eval_steps: 6}"}}}}
ASSETS = [data.raw_examples, data.deduplicated_examples, data.heldout_split, training.base_model, training.lora_adapter]


def train(instance: dg.DagsterInstance, task: str, run_config=None, tags=None) -> tuple[dict, str]:
    """Materialize `lora_adapter` (and its upstream); (its metadata, the run's log)."""
    result = dg.materialize(ASSETS, instance=instance, partition_key=task, resources=default_resources(),
                            run_config=run_config, tags=tags)
    log = "\n".join(event.message or "" for event in instance.all_logs(result.run_id))
    return materialization(result, "lora_adapter"), log


def within(ratio: float, factor: float) -> bool:
    return 1 / factor <= ratio <= factor


@pytest.mark.slow
def test_the_estimate_is_calibrated_then_taken_from_the_previous_training_and_holds(tiny_task: str) -> None:
    with dg.instance_for_test() as instance:
        instance.add_dynamic_partitions(task_partitions.name, [tiny_task])
        first, first_log = train(instance, tiny_task, tags={"dagster/max_runtime": "5"})
        second, second_log = train(instance, tiny_task, TWO_EPOCHS, tags={"dagster/max_runtime": "5"})

    print(f"calibration: {first['estimated_minutes']} min, actual/estimate {first['estimate_ratio']}; "
          f"previous run: {second['estimated_minutes']} min, actual/estimate {second['estimate_ratio']}")
    assert first["estimate_source"] == "calibration" and "sizing: 6 steps" in first_log
    assert first["estimated_steps"] == first["steps"] == 6
    assert first["calibration_seconds"] > 0 and second["calibration_seconds"] == 0, "the next one does not calibrate"
    assert within(first["estimate_ratio"], CALIBRATION_FACTOR)
    assert "but this run's dagster/max_runtime leaves" in first_log  # from the training program, which calibrated

    previous = f"previous training {first['training_fingerprint'][:8]}"
    assert second["estimate_source"] == previous and second["estimated_peak_memory"].endswith(f"({previous})")
    assert second["estimated_peak_memory"].startswith(readable.size(first["peak_memory_mb"] * 2**20)), "as measured"
    assert 50 < first["peak_memory_mb"] < 8192 and "peak_memory_gib" not in first, "once, in MB"
    assert second["estimated_steps"] == second["steps"] > 6
    assert second["estimated_tokens"] == second["tokens_trained"]  # whole passes, no replay: exact
    assert within(second["estimate_ratio"], RATE_FACTOR)
    assert "but this run's dagster/max_runtime leaves" in second_log
    handed = json.loads(TaskLayout(tiny_task).spec_file().read_text())["eval_tokens_per_second"]
    timed = first["eval_seconds"] > 0  # in tenths of a second: the tiny model's evaluations may take less
    assert handed == (first["eval_tokens_per_evaluation"] * first["evaluations"] / first["eval_seconds"] if timed
                      else None), "the first training's eval rate prices the second's evaluations until one is timed"
