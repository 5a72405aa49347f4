"""Jobs, schedules and sensors: task discovery, data-change detection, the retraining policy, and closing the MLflow
runs of trainings whose run stopped."""

import inspect
import os
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime, timedelta

import dagster as dg

from ftpipe.config import RetrainConfig, TaskConfig, TaskConfigError
from ftpipe.assets.common import table
from ftpipe.core import readable
from ftpipe.core.layout import TaskLayout
from ftpipe.core.results import read_result
from ftpipe.core.storage import task_dir
from ftpipe.core.tasks import (
    discover_tasks, reviews_dir, reviews_version, task_config, task_files, task_files_version, training_asset,
    training_inputs,
)
from ftpipe.partitions import task_partitions
from ftpipe.resources import MlflowTracking

TRAINING_MAX_RUNTIME_SECONDS = 6 * 3600
POLL_SECONDS = int(os.environ.get("FTPIPE_POLL_SECONDS", "30"))
RETRAIN_CRON, RETRAIN_INTERVAL = "*/15 * * * *", timedelta(minutes=15)
DATA_VERSION_TAG = "dagster/data_version"
TASK_FILES, REVIEW_VERDICTS = dg.AssetKey("task_files"), dg.AssetKey("review_verdicts")
PRODUCTION_REQUESTS = dg.AssetKey("production_requests")
IN_PROGRESS = [dg.DagsterRunStatus.QUEUED, dg.DagsterRunStatus.NOT_STARTED, dg.DagsterRunStatus.STARTING,
               dg.DagsterRunStatus.STARTED]
STOPPED = {dg.DagsterRunStatus.FAILURE, dg.DagsterRunStatus.CANCELED}

finetune_job = dg.define_asset_job(
    "finetune_job", selection=dg.AssetSelection.all() - dg.AssetSelection.groups("monitoring"),
    tags={"dagster/max_runtime": str(TRAINING_MAX_RUNTIME_SECONDS)},
    description="The whole graph for one task, monitoring aside: data, training, evaluation, merge. Backfill it over all tasks to retrain every task.",
)

data_job = dg.define_asset_job(
    "data_job", selection=dg.AssetSelection.groups("data"),
    description="Read, clean, deduplicate and split one task's data.",
)

monitoring_job = dg.define_asset_job(
    "monitoring_job", selection=dg.AssetSelection.groups("monitoring"),
    description="The production report of one task's served requests, and its health and drift checks.",
)

automation_sensor = dg.AutomationConditionSensorDefinition(
    "automation_sensor", target=dg.AssetSelection.all(), default_status=dg.DefaultSensorStatus.RUNNING,
    minimum_interval_seconds=POLL_SECONDS,
    description="Refreshes the data assets when task files change; evaluates new adapters; merges what passed the gate.",
)


def described(decorator: Callable, **settings) -> Callable:
    """`decorator(**settings)` with the function's docstring as the description the UI shows."""
    return lambda fn: decorator(description=inspect.cleandoc(fn.__doc__ or ""), **settings)(fn)


def sensor(**settings) -> Callable:
    """A sensor that runs by default every POLL_SECONDS, described by its docstring."""
    return described(dg.sensor, default_status=dg.DefaultSensorStatus.RUNNING,
                     minimum_interval_seconds=POLL_SECONDS, **settings)


@dataclass
class TaskChanges:
    """Task folders not yet partitions; tasks whose files changed or were never observed (new version); refused folders;
    partitions whose task folder is gone."""

    new: list[str] = field(default_factory=list)
    changed: dict[str, str] = field(default_factory=dict)
    refused: dict[str, str] = field(default_factory=dict)
    gone: list[str] = field(default_factory=list)

    def observations(self, *, of_new: bool) -> list[dg.AssetObservation]:
        """Observations of the changed tasks; of the new ones too when their partitions exist already."""
        return [dg.AssetObservation(asset_key=TASK_FILES, partition=task, tags={DATA_VERSION_TAG: version},
                                    metadata=task_files_metadata(task, version))
                for task, version in self.changed.items() if of_new or task not in self.new]


def task_files_metadata(task: str, version: str) -> dict[str, dg.MetadataValue]:
    """What an observation of `task_files` shows: the content hash and each file with its size."""
    folder = task_dir(task)
    rows = [{"file": path.relative_to(folder).as_posix(), "size": readable.size(path.stat().st_size)}
            for path in task_files(task)]
    return {"content_hash": dg.MetadataValue.text(version), "files": table(rows, ["file", "size"])}


def last_observed_version(instance: dg.DagsterInstance, task: str, asset: dg.AssetKey = TASK_FILES) -> str | None:
    records = instance.fetch_observations(
        dg.AssetRecordsFilter(asset_key=asset, asset_partitions=[task]), limit=1
    ).records
    return records[0].asset_observation.tags.get(DATA_VERSION_TAG) if records else None


def show_automation_running(instance: dg.DagsterInstance) -> None:
    """Automation conditions are evaluated by `automation_sensor`. The UI's "Auto-materialize" tag reads the
    instance's older global switch instead, which starts paused although nothing reads it when sensors evaluate
    the conditions: switch it on so the tag agrees with what runs."""
    from dagster._daemon.asset_daemon import get_auto_materialize_paused, set_auto_materialize_paused

    if instance.auto_materialize_use_sensors and get_auto_materialize_paused(instance):
        set_auto_materialize_paused(instance, False)


def task_changes(instance: dg.DagsterInstance) -> TaskChanges:
    """What changed in the task folders since the instance last looked (a new folder counts as changed)."""
    found = discover_tasks()
    known = set(instance.get_dynamic_partitions(task_partitions.name))
    changes = TaskChanges(new=[t for t in found.tasks if t not in known], refused=found.refused,
                          gone=sorted(known - set(found.tasks) - set(found.refused)))
    for task in found.tasks:
        version = task_files_version(task)
        if version != last_observed_version(instance, task):
            changes.changed[task] = version
    return changes


@sensor()
def task_files_sensor(context: dg.SensorEvaluationContext) -> dg.SensorResult | dg.SkipReason:
    """Adds a `task` partition for every new task folder and observes `task_files` when a folder's files change."""
    show_automation_running(context.instance)
    changes = task_changes(context.instance)
    for reason in changes.refused.values():
        context.log.warning(reason)
    if not changes.changed:
        return dg.SkipReason(f"no new or changed task folders ({len(changes.refused)} refused)")
    if changes.new:
        context.log.info(f"adding task partitions: {', '.join(changes.new)}")
    observations = changes.observations(of_new=False)  # the daemon adds partitions after it records events
    if observations:
        context.log.info("task files changed: " + ", ".join(f"{o.partition} -> {o.tags[DATA_VERSION_TAG]}" for o in observations))
    return dg.SensorResult(
        dynamic_partitions_requests=[task_partitions.build_add_request(changes.new)] if changes.new else [],
        asset_events=observations,
    )


@sensor()
def review_verdicts_sensor(context: dg.SensorEvaluationContext) -> dg.SensorResult | dg.SkipReason:
    """Observes `review_verdicts` when the review files in a task's `reviews/` folder change, so `human_review` counts
    the new verdicts and a merge waiting for them can go ahead."""
    observations = []
    for task in context.instance.get_dynamic_partitions(task_partitions.name):
        version = reviews_version(task)
        if reviews_dir(task).is_dir() and version != last_observed_version(context.instance, task, REVIEW_VERDICTS):
            observations.append(dg.AssetObservation(asset_key=REVIEW_VERDICTS, partition=task,
                                                    tags={DATA_VERSION_TAG: version}))
    if not observations:
        return dg.SkipReason("no new review files")
    context.log.info("review files changed: " + ", ".join(o.partition for o in observations))
    return dg.SensorResult(asset_events=observations)


@sensor()
def production_requests_sensor(context: dg.SensorEvaluationContext) -> dg.SensorResult | dg.SkipReason:
    """Observes `production_requests` when a task's request log gets a new segment or grows, so the production report
    is refreshed."""
    from ftpipe.core.monitoring import requests_version
    from ftpipe.core.server.request_log import segments

    observations = []
    for task in context.instance.get_dynamic_partitions(task_partitions.name):
        version = requests_version(task)
        if segments(task) and version != last_observed_version(context.instance, task, PRODUCTION_REQUESTS):
            observations.append(dg.AssetObservation(asset_key=PRODUCTION_REQUESTS, partition=task,
                                                    tags={DATA_VERSION_TAG: version}))
    if not observations:
        return dg.SkipReason("no new requests")
    return dg.SensorResult(asset_events=observations)


def training_due(instance: dg.DagsterInstance, task: str, config: TaskConfig) -> tuple[bool, str]:
    """Whether retraining the task would train anything new, and why (run in progress, fingerprints unchanged...)."""
    if instance.get_run_records(dg.RunsFilter(tags={"dagster/partition": task}, statuses=IN_PROGRESS), limit=1):
        return False, f"{task}: a run is in progress"
    for stage in config.training.stages:
        try:
            fingerprint = training_inputs(task, config.training.for_stage(stage), config.retrain).fingerprint
        except FileNotFoundError:
            return True, f"{task}: no held-out split or base model yet"
        asset = training_asset(stage)
        adapter = read_result(TaskLayout(task).output(asset), asset)
        last = adapter.reuse_key if adapter else None
        if fingerprint != last:
            named = "" if stage == "sft" else f"{stage} "
            return True, f"{task}: {named}training fingerprint {last or 'none'} -> {fingerprint}"
    return False, f"{task}: training fingerprint {fingerprint} unchanged since the last adapter"


def retrain_requests(instance: dg.DagsterInstance, tasks: dict[str, TaskConfig],
                     trigger: str) -> tuple[list[dg.RunRequest], list[str]]:
    """A `finetune_job` run for each task whose training would change; the reasons for the others."""
    requests, skipped = [], []
    for task, config in tasks.items():
        due, reason = training_due(instance, task, config)
        if due:
            requests.append(dg.RunRequest(partition_key=task, tags={"ftpipe/retrain": trigger, "ftpipe/reason": reason}))
        else:
            skipped.append(reason)
    return requests, skipped


def tasks_by_policy(instance: dg.DagsterInstance,
                    wanted: Callable[[RetrainConfig], bool]) -> tuple[dict[str, TaskConfig], list[str]]:
    """The tasks (and their configs) whose retrain policy wants a run now; the reasons for broken task.yaml files."""
    tasks, broken = {}, []
    for task in instance.get_dynamic_partitions(task_partitions.name):
        try:
            config = task_config(task)
        except TaskConfigError as error:
            broken.append(f"{task}: {error}")
            continue
        if wanted(config.retrain):
            tasks[task] = config
    return tasks, broken


def _result(context, requests: list[dg.RunRequest], skipped: list[str], idle: str):
    for reason in skipped:
        context.log.info(reason)
    return requests or dg.SkipReason("; ".join(skipped) or idle)


@sensor(job=finetune_job)
def retrain_on_data_change_sensor(context: dg.SensorEvaluationContext) -> list[dg.RunRequest] | dg.SkipReason:
    """Retrains tasks with `retrain.on_data_change: true` as soon as their training fingerprint changes."""
    tasks, skipped = tasks_by_policy(context.instance, lambda policy: policy.on_data_change)
    waiting = [task for task in tasks if not all(path.exists() for path in TaskLayout(task).split_files)]
    skipped += [f"{task}: waiting for the data assets to build the held-out split" for task in waiting]
    ready = {task: config for task, config in tasks.items() if task not in waiting}
    requests, unchanged = retrain_requests(context.instance, ready, "data_change")
    return _result(context, requests, skipped + unchanged, "no task has retrain.on_data_change: true")


def cron_fired(cron: str, after: datetime, until: datetime) -> bool:
    """Whether `cron` has a tick in (after, until]."""
    from croniter import croniter

    return croniter(cron, after).get_next(datetime) <= until


@described(dg.schedule, cron_schedule=RETRAIN_CRON, job=finetune_job, execution_timezone="UTC",
           default_status=dg.DefaultScheduleStatus.RUNNING)
def retrain_schedule(context: dg.ScheduleEvaluationContext) -> list[dg.RunRequest] | dg.SkipReason:
    """Every 15 minutes: a run for each task whose `retrain.schedule` (cron, UTC) fell due, unless nothing changed."""
    now = context.scheduled_execution_time
    since = now - RETRAIN_INTERVAL

    def due(policy: RetrainConfig) -> bool:
        return policy.schedule is not None and cron_fired(policy.schedule, since, now)

    tasks, skipped = tasks_by_policy(context.instance, due)
    requests, unchanged = retrain_requests(context.instance, tasks, "schedule")
    return _result(context, requests, skipped + unchanged, "no task's retrain.schedule fell due")


@sensor()
def stopped_training_sensor(context: dg.SensorEvaluationContext, mlflow: MlflowTracking) -> dg.SkipReason:
    """Marks KILLED the MLflow runs left RUNNING by trainings whose run failed or was canceled: a training killed with
    its run worker (a crash, an OOM kill, `kill -9`) could not end its own."""
    from ftpipe.core.tracking import LAUNCHED_BY_TAG, end_runs_left_running

    def stopped(tags: dict[str, str]) -> bool:
        run = context.instance.get_run_by_id(tags[LAUNCHED_BY_TAG]) if tags.get(LAUNCHED_BY_TAG) else None
        return run is not None and run.status in STOPPED

    ended = [run_id for task in context.instance.get_dynamic_partitions(task_partitions.name)
             for run_id in end_runs_left_running(mlflow.experiment(task), stopped, mlflow.uri())]
    return dg.SkipReason(f"marked KILLED: {', '.join(ended)}" if ended else "no training left running by a stopped run")
