"""Sensors, the retraining schedule and the automation conditions, evaluated against a real instance."""

import json
from datetime import datetime, timezone
from pathlib import Path

import dagster as dg
import pytest
from dagster._daemon.asset_daemon import get_auto_materialize_paused

from ftpipe.assets import data, training
from ftpipe.automation import retrain_on_data_change_sensor, retrain_schedule, task_files_sensor
from ftpipe.core.tasks import task_files_version
from ftpipe.definitions import defs
from ftpipe.partitions import task_partitions
from ftpipe.resources import default_resources
from ftpipe_tests.builders import append_rows, chat, make_task

ROWS = [chat(f"ticket {i}: my order {i * 7} never arrived", f"shipping-{i % 3}") for i in range(30)]
MONDAY_3AM = datetime(2026, 11, 30, 3, 0, tzinfo=timezone.utc)
MONDAY_2_45 = datetime(2026, 11, 30, 2, 45, tzinfo=timezone.utc)


def sensor_tick(instance: dg.DagsterInstance):
    """Evaluate the task files sensor and apply its result as the daemon does."""
    result = task_files_sensor(dg.build_sensor_context(instance=instance))
    if isinstance(result, dg.SensorResult):
        for request in result.dynamic_partitions_requests:
            instance.add_dynamic_partitions(request.partitions_def_name, list(request.partition_keys))
        for event in result.asset_events:
            instance.report_runless_asset_event(event)
    return result


def test_task_files_sensor_new_folder_changed_file_unchanged(ftpipe_env: Path) -> None:
    folder = make_task(ftpipe_env, "first", {"a.jsonl": ROWS})
    (ftpipe_env / "tasks" / "Bad Name").mkdir()
    with dg.instance_for_test() as instance:
        assert get_auto_materialize_paused(instance), "a new instance's switch starts paused"
        [request] = sensor_tick(instance).dynamic_partitions_requests
        assert not get_auto_materialize_paused(instance), "the UI's Auto-materialize tag shows what runs"
        assert list(request.partition_keys) == ["first"]
        [observed] = sensor_tick(instance).asset_events
        assert observed.partition == "first"
        assert observed.tags["dagster/data_version"] == task_files_version("first")
        assert observed.metadata["content_hash"].value == task_files_version("first")
        assert "| raw/a.jsonl | " in observed.metadata["files"].value and "KiB |" in observed.metadata["files"].value

        unchanged = sensor_tick(instance)
        assert isinstance(unchanged, dg.SkipReason) and "1 refused" in unchanged.skip_message
        (folder / "raw" / "a.jsonl").write_text((folder / "raw" / "a.jsonl").read_text())
        assert isinstance(sensor_tick(instance), dg.SkipReason), "rewriting the same bytes is no change"

        with (folder / "raw" / "a.jsonl").open("a") as handle:
            handle.write(json.dumps(chat("a new ticket", "billing")) + "\n")
        [changed] = sensor_tick(instance).asset_events
        assert changed.tags["dagster/data_version"] not in (observed.tags["dagster/data_version"], None)
        (folder / "task.yaml").write_text("split: {seed: 1}\n")
        assert sensor_tick(instance).asset_events, "an edit of task.yaml is a change too"

        make_task(ftpipe_env, "second", {"a.jsonl": ROWS})
        assert list(sensor_tick(instance).dynamic_partitions_requests[0].partition_keys) == ["second"]


def test_every_sensor_and_schedule_says_what_it_does() -> None:
    automations = [*defs.sensors, *defs.schedules]
    assert {a.name for a in automations} >= {"task_files_sensor", "retrain_on_data_change_sensor", "retrain_schedule"}
    for automation in automations:
        assert automation.description and len(automation.description) > 30, automation.name


def requested(result: dg.EvaluateAutomationConditionsResult) -> dict[str, set]:
    return {key.to_user_string(): result.get_requested_partitions(key) for key in defs.resolve_asset_graph().get_all_asset_keys()
            if result.get_num_requested(key)}


def test_data_assets_refresh_when_task_files_change(ftpipe_env: Path) -> None:
    make_task(ftpipe_env, "shop", {"a.jsonl": ROWS})
    with dg.instance_for_test() as instance:
        start = dg.evaluate_automation_conditions(defs=defs, instance=instance)
        sensor_tick(instance)
        sensor_tick(instance)
        first = dg.evaluate_automation_conditions(defs=defs, instance=instance, cursor=start.cursor)
        data_assets = {"teacher_examples", "raw_examples", "deduplicated_examples", "review_sample", "heldout_split"}
        assert requested(first) == {name: {"shop"} for name in data_assets}, "a new task's data is built at once"

        dg.materialize([data.teacher_examples, data.raw_examples, data.deduplicated_examples, data.review_sample,
                        data.heldout_split], instance=instance, partition_key="shop")
        quiet = dg.evaluate_automation_conditions(defs=defs, instance=instance, cursor=first.cursor)
        assert requested(quiet) == {}

        with (ftpipe_env / "tasks" / "shop" / "raw" / "b.jsonl").open("w") as handle:
            handle.write(json.dumps(chat("another ticket", "billing")) + "\n")
        sensor_tick(instance)
        refresh = dg.evaluate_automation_conditions(defs=defs, instance=instance, cursor=quiet.cursor)
        assert requested(refresh) == {name: {"shop"} for name in data_assets}, "only the data assets refresh"


def schedule_at(instance: dg.DagsterInstance, when: datetime):
    return retrain_schedule(dg.build_schedule_context(instance=instance, scheduled_execution_time=when))


def on_data_change(instance: dg.DagsterInstance):
    return retrain_on_data_change_sensor(dg.build_sensor_context(instance=instance))


@pytest.mark.slow
def test_retraining_policy_due_not_due_and_unchanged(ftpipe_env: Path, tiny_task: str) -> None:
    folder = ftpipe_env / "tasks" / tiny_task
    config = (folder / "task.yaml").read_text() + "retrain: {schedule: '0 3 * * 1'%s}\n"
    (folder / "task.yaml").write_text(config % "")
    assets = [data.raw_examples, data.deduplicated_examples, data.heldout_split, training.base_model, training.lora_adapter]
    with dg.instance_for_test() as instance:
        instance.add_dynamic_partitions(task_partitions.name, [tiny_task])
        not_due = schedule_at(instance, MONDAY_2_45)
        assert isinstance(not_due, dg.SkipReason) and "fell due" in not_due.skip_message
        [first] = schedule_at(instance, MONDAY_3AM)
        assert first.partition_key == tiny_task and "no held-out split" in first.tags["ftpipe/reason"]

        dg.materialize(assets, instance=instance, partition_key=tiny_task, resources=default_resources())
        unchanged = schedule_at(instance, MONDAY_3AM)
        assert isinstance(unchanged, dg.SkipReason) and "unchanged since the last adapter" in unchanged.skip_message

        append_rows(folder, "more.jsonl", 20, seed=11)
        dg.materialize(assets[:3], instance=instance, partition_key=tiny_task)
        [changed] = schedule_at(instance, MONDAY_3AM)
        assert changed.tags["ftpipe/retrain"] == "schedule" and "->" in changed.tags["ftpipe/reason"]

        off = on_data_change(instance)
        assert isinstance(off, dg.SkipReason) and "on_data_change" in off.skip_message
        (folder / "task.yaml").write_text(config % ", on_data_change: true")
        [request] = on_data_change(instance)
        assert request.partition_key == tiny_task and request.tags["ftpipe/retrain"] == "data_change"
