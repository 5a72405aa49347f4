"""The console logger of ftpipe's jobs: Dagster's coloured lines, with a failure said once.

A failed step and a failed or stopped run keep the first line of their message (`Execution of step "raw_examples"
failed.`) and leave the error and its stack trace to the run's event log (the Dagster UI); `ftpipe run` ends with the
reason in one line. The steps a failure left unrun get no line each. Progress bars of loading and saving models
(Hugging Face) and of MLflow artifacts stay off (`quiet_progress_bars`): between log lines they are noise; set their
variables to turn them on.
"""

import logging
import os

import dagster as dg

ABANDONED = "Dependencies for step "  # how Dagster begins its line for each step a failure left unrun


PROGRESS_BAR_SWITCHES = {"HF_HUB_DISABLE_PROGRESS_BARS": "1", "MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR": "false"}


def quiet_progress_bars() -> None:
    """Switch progress bars off in this process and those it starts, unless the environment sets them (read when
    the libraries are imported, so before any model is loaded)."""
    for name, value in PROGRESS_BAR_SWITCHES.items():
        os.environ.setdefault(name, value)


class FailuresOnce(logging.Filter):
    """Drops the lines of steps left unrun and cuts a failure's or a stop's line to its first line."""

    def filter(self, record: logging.LogRecord) -> bool:
        meta = getattr(record, "dagster_meta", None) or {}
        if str(meta.get("orig_message", "")).startswith(ABANDONED):
            return False
        event = meta.get("dagster_event")
        if event is not None and (event.is_step_failure or event.is_run_failure
                                  or event.event_type == dg.DagsterEventType.RUN_CANCELED):
            record.msg, record.args = record.getMessage().split("\n", 1)[0], ()
        return True


@dg.logger(config_schema=dg.colored_console_logger.config_schema.config_type,
           description="Dagster's coloured console lines; a failure in one line, its stack trace in the event log.")
def console(init_context: dg.InitLoggerContext) -> logging.Logger:
    logger = dg.colored_console_logger.logger_fn(init_context)
    logger.addFilter(FailuresOnce())
    return logger
