"""The ftpipe code location: assembly only."""

import dagster as dg

from ftpipe.assets import data, evaluation, serving, training
from ftpipe.automation import data_job, finetune_job, task_discovery_sensor
from ftpipe.checks import eval_report_gate, heldout_split_no_leakage
from ftpipe.resources import default_resources

defs = dg.Definitions(
    assets=dg.load_assets_from_modules([data, training, evaluation, serving]),
    asset_checks=[heldout_split_no_leakage, eval_report_gate],
    jobs=[finetune_job, data_job],
    sensors=[task_discovery_sensor],
    resources=default_resources(),
)
