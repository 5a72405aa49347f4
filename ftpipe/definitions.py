"""The ftpipe code location: assembly only."""

import dagster as dg

from ftpipe.assets import data, training
from ftpipe.automation import data_job, task_discovery_sensor
from ftpipe.checks import heldout_split_no_leakage
from ftpipe.resources import default_resources

defs = dg.Definitions(
    assets=dg.load_assets_from_modules([data, training]),
    asset_checks=[heldout_split_no_leakage],
    jobs=[data_job],
    sensors=[task_discovery_sensor],
    resources=default_resources(),
)
