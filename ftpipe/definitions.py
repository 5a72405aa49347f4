"""The ftpipe code location: assembly only."""

import dagster as dg

from ftpipe import checks, console, pool
from ftpipe.assets import data, evaluation, monitoring, serving, training
from ftpipe.automation import (
    automation_sensor, data_job, finetune_job, monitoring_job, production_requests_sensor, retrain_on_data_change_sensor,
    retrain_schedule, review_verdicts_sensor, stopped_training_sensor, task_files_sensor,
)
from ftpipe.resources import default_resources

pool.install()  # how runs wait for the gpu pool (see ftpipe/pool.py): here, so every run worker and the CLI have it
console.quiet_progress_bars()  # before any step imports transformers or MLflow

defs = dg.Definitions(
    assets=dg.load_assets_from_modules([data, training, evaluation, serving, monitoring]),
    asset_checks=dg.load_asset_checks_from_modules([checks]),
    jobs=[finetune_job, data_job, monitoring_job],
    schedules=[retrain_schedule],
    sensors=[task_files_sensor, review_verdicts_sensor, retrain_on_data_change_sensor, automation_sensor,
             stopped_training_sensor, production_requests_sensor],
    resources=default_resources(),
    executor=dg.in_process_executor,
    loggers={"console": console.console},
)
