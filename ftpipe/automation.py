"""Jobs, schedules and sensors."""


import dagster as dg

from ftpipe.core.tasks import discover_tasks
from ftpipe.partitions import task_partitions

TRAINING_MAX_RUNTIME_SECONDS = 6 * 3600

finetune_job = dg.define_asset_job(
    "finetune_job", selection=dg.AssetSelection.all(),
    tags={"dagster/max_runtime": str(TRAINING_MAX_RUNTIME_SECONDS)},
    description="The whole graph for one task: data, training, evaluation, merge. Backfill it over all tasks to retrain every task.",
)

data_job = dg.define_asset_job(
    "data_job", selection=dg.AssetSelection.groups("data"),
    description="Read, clean, deduplicate and split one task's data.",
)


@dg.sensor(default_status=dg.DefaultSensorStatus.RUNNING, minimum_interval_seconds=30)
def task_discovery_sensor(context: dg.SensorEvaluationContext) -> dg.SensorResult | dg.SkipReason:
    """Adds a `task` partition for every new task folder; refuses folders with invalid names."""
    found = discover_tasks()
    for folder, reason in found.refused.items():
        context.log.warning(reason)
    known = set(context.instance.get_dynamic_partitions(task_partitions.name))
    new = [task for task in found.tasks if task not in known]
    if not new:
        return dg.SkipReason(f"no new task folders ({len(found.tasks)} known, {len(found.refused)} refused)")
    context.log.info(f"adding task partitions: {', '.join(new)}")
    return dg.SensorResult(dynamic_partitions_requests=[task_partitions.build_add_request(new)])
