"""Thin Dagster wiring around ftpipe.core, one module per asset group."""

import warnings

import dagster as dg

DAGSTER_PREVIEWS_USED = (  # Dagster APIs ftpipe uses on purpose; their preview/beta notices tell a user nothing
    (dg.PreviewWarning, "Specifying a partitions_def on an AssetCheckSpec"),
    (dg.BetaWarning, "Function `observable_source_asset`"),
    (dg.PreviewWarning, "Function `PipesMessageReader.expected_writer_count`"),  # every training through Pipes
)

for _category, _message in DAGSTER_PREVIEWS_USED:  # before the asset modules use them: in the CLI, `make ui`, run workers
    warnings.filterwarnings("ignore", message=_message, category=_category, module=r"dagster\.")
