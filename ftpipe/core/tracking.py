"""MLflow tracking: where runs are stored, one run per training that always ends in a true state
(FINISHED / FAILED / KILLED), a sweep for runs whose process died without saying so, and an evaluation's
results logged to the training run it judged."""

from __future__ import annotations

import os
import signal
import socket
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit, urlunsplit

from ftpipe.core.launch import heeded_stop_signals
from ftpipe.core.readable import rounded
from ftpipe.core.layout import mlartifacts_dir, mlflow_db
from ftpipe.core.storage import process_alive

PID_TAG = "ftpipe.pid"
HOST_TAG = "ftpipe.host"
LAUNCHED_BY_TAG = "dagster_run_id"  # the Dagster run that launched a training
REMOTE_SCHEMES = ("http", "https", "databricks")
# MLflow 3's experiment kind: training runs, not GenAI traces.
EXPERIMENT_KIND = {"mlflow.experimentKind": "custom_model_development"}
ML_VIEW = "workflowType=machine_learning"  # the MLflow UI's model-training view of a page


class RunInterrupted(BaseException):
    """SIGTERM/SIGINT arrived during a tracked run (a BaseException, so library `except Exception` can't eat it)."""

    def __init__(self, signum: int):
        super().__init__(f"interrupted by {signal.Signals(signum).name}")
        self.signum = signum


def tracking_uri() -> str:
    """`MLFLOW_TRACKING_URI`, else `sqlite:///$FTPIPE_HOME/mlflow.db`."""
    if os.environ.get("MLFLOW_TRACKING_URI"):
        return os.environ["MLFLOW_TRACKING_URI"]
    database = mlflow_db()
    database.parent.mkdir(parents=True, exist_ok=True)
    return f"sqlite:///{database}"


def artifact_root() -> Path:
    """Artifact root for local (non-server) tracking stores: `$FTPIPE_HOME/mlartifacts`."""
    return mlartifacts_dir()


def redact_uri(uri: str) -> str:
    """`uri` with any password replaced by `***` (safe to log)."""
    parts = urlsplit(uri)
    if parts.password is None:
        return uri
    netloc = f"{parts.username or ''}:***@{parts.hostname or ''}" + (f":{parts.port}" if parts.port else "")
    return urlunsplit(parts._replace(netloc=netloc))


def without_credentials(uri: str) -> str:
    """`uri` without its `user:password@` part (a link a browser can open and anyone can read)."""
    parts = urlsplit(uri)
    return urlunsplit(parts._replace(netloc=parts.netloc.rpartition("@")[2]))


def mlflow_client(uri: str | None = None):
    """An MLflow client on `uri` (default: `tracking_uri()`)."""
    from mlflow import MlflowClient

    return MlflowClient(tracking_uri=uri or tracking_uri())


def ensure_experiment(client, name: str) -> str:
    """Id of experiment `name`, created on first use as an experiment of training runs (artifacts under
    `artifact_root()` for local stores)."""
    experiment = client.get_experiment_by_name(name)
    if experiment is not None:
        return experiment.experiment_id
    location = None
    if not client.tracking_uri.startswith(REMOTE_SCHEMES):
        location = (artifact_root() / name).as_uri()
    return client.create_experiment(name, artifact_location=location, tags=EXPERIMENT_KIND)


def run_page(ui_url: str, run_id: str, uri: str | None = None) -> str:
    """The page of run `run_id` in the MLflow UI at `ui_url`, in its model-training view."""
    from mlflow.exceptions import MlflowException

    try:
        route = f"experiments/{mlflow_client(uri).get_run(run_id).info.experiment_id}/runs/{run_id}"
    except MlflowException:
        route = f"runs/{run_id}"  # not in this store (it changed since the run): the UI's route by run id alone
    return f"{ui_url.rstrip('/')}/#/{route}?{ML_VIEW}"


def _is_stale(tags: dict[str, str]) -> bool:
    if tags.get(HOST_TAG) != socket.gethostname() or not tags.get(PID_TAG, "").isdigit():
        return False  # another machine's run (or not ours): we cannot tell if it is alive
    return not process_alive(int(tags[PID_TAG]))


def end_runs_left_running(experiment: str, ended: Callable[[dict[str, str]], bool],
                          uri: str | None = None) -> list[str]:
    """Mark KILLED the RUNNING runs of `experiment` whose tags `ended` says belong to a training that is over; return
    their ids."""
    client = mlflow_client(uri)
    found = client.get_experiment_by_name(experiment)
    if found is None:
        return []
    running = client.search_runs([found.experiment_id], filter_string="attributes.status = 'RUNNING'")
    over = [run.info.run_id for run in running if ended(run.data.tags)]
    for run_id in over:
        client.set_terminated(run_id, status="KILLED")
    return over


def sweep_stale_runs(experiment: str, uri: str | None = None) -> list[str]:
    """Mark KILLED the RUNNING runs of `experiment` whose process (pid + host tags) is gone; return their ids."""
    return end_runs_left_running(experiment, _is_stale, uri)


class RunLogger:
    """Thin logging handle on one MLflow run (client API, so nothing depends on global MLflow state).

    Without a client (torchrun ranks other than 0) it logs nothing."""

    def __init__(self, client, run_id: str):
        self.client = client
        self.run_id = run_id

    def log_params(self, params: dict[str, Any]) -> None:
        from mlflow.entities import Param

        if self.client is None:
            return
        self._log_batch(params=[Param(key, str(value)) for key, value in params.items()])

    def log_metrics(self, metrics: dict[str, float], step: int) -> None:
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        batch = [Metric(key, float(value), now, step) for key, value in metrics.items()]
        if batch and self.client is not None:
            self._log_batch(metrics=batch)

    def set_tags(self, tags: dict[str, Any]) -> None:
        from mlflow.entities import RunTag

        if tags and self.client is not None:
            self._log_batch(tags=[RunTag(key, str(value)) for key, value in tags.items()])

    def _log_batch(self, **batch) -> None:
        with _whole_write():
            self.client.log_batch(self.run_id, **batch)

    def log_artifact(self, path: Path, artifact_path: str | None = None) -> None:
        if self.client is None:
            return
        with _whole_write():
            if path.is_dir():
                self.client.log_artifacts(self.run_id, str(path), artifact_path)
            else:
                self.client.log_artifact(self.run_id, str(path), artifact_path)


_stop = {"writing": 0, "deferred": None}  # writes to the store in progress; a stop request that arrived during one


@contextmanager
def _whole_write() -> Iterator[None]:
    """A write to the tracking store that a stop request does not cut in half (a SQLite commit cut short leaves the
    database locked, and the run could not be ended KILLED): the request is raised right after it."""
    _stop["writing"] += 1
    try:
        yield
    finally:
        _stop["writing"] -= 1
    if not _stop["writing"] and _stop["deferred"] is not None:
        signum, _stop["deferred"] = _stop["deferred"], None
        raise RunInterrupted(signum)


@contextmanager
def _signals_raise_interrupted() -> Iterator[None]:
    def handler(signum, _frame):
        # One stop request is enough: a second one (Ctrl-C reaches the whole process group, and the run worker forwards
        # it too) is ignored until the process ends, so it cannot cut short the cleanup that ends the MLflow run KILLED,
        # nor the interpreter's exit after it.
        for sig in previous:
            signal.signal(sig, signal.SIG_IGN)
        if _stop["writing"]:
            _stop["deferred"] = signum
            return
        raise RunInterrupted(signum)

    _stop["deferred"] = None
    previous = {sig: signal.signal(sig, handler) for sig in heeded_stop_signals()}
    try:
        yield
    finally:
        for sig, old in previous.items():
            if signal.getsignal(sig) is handler:  # no stop request came
                signal.signal(sig, old)


def _run_exists(client, run_id: str) -> bool:
    from mlflow.exceptions import MlflowException

    try:
        client.get_run(run_id)
    except MlflowException:
        return False
    return True


def _open_run(client, experiment_id: str, run_name: str, tags: dict[str, str], resume_run_id: str | None) -> str:
    owner = {PID_TAG: str(os.getpid()), HOST_TAG: socket.gethostname()}
    if resume_run_id and _run_exists(client, resume_run_id):
        client.update_run(resume_run_id, status="RUNNING")
        for key, value in {**tags, **owner}.items():
            client.set_tag(resume_run_id, key, value)
        return resume_run_id
    return client.create_run(experiment_id, run_name=run_name, tags={**tags, **owner}).info.run_id


@contextmanager
def tracked_run(
    experiment: str,
    *,
    run_name: str,
    tags: dict[str, str] | None = None,
    resume_run_id: str | None = None,
    uri: str | None = None,
    discard_on: tuple[type[BaseException], ...] = (),
) -> Iterator[RunLogger]:
    """One MLflow run (new, or `resume_run_id` continued) that ends FINISHED, FAILED, or KILLED on SIGTERM/SIGINT; a
    new one that ends on an exception of `discard_on` (a spec refused before training) is deleted instead.

    Stale runs of the experiment are swept first. While inside, the first SIGTERM/SIGINT raises `RunInterrupted`.
    """
    client = mlflow_client(uri)
    experiment_id = ensure_experiment(client, experiment)
    sweep_stale_runs(experiment, client.tracking_uri)
    safe_tags = {key: redact_uri(str(value)) for key, value in (tags or {}).items()}
    run_id = _open_run(client, experiment_id, run_name, safe_tags, resume_run_id)
    status, discard = "FAILED", False
    with _signals_raise_interrupted():
        try:
            yield RunLogger(client, run_id)
            status = "FINISHED"
        except (RunInterrupted, KeyboardInterrupt):
            status = "KILLED"
            raise
        except discard_on:
            discard = resume_run_id is None
            raise
        finally:
            client.set_terminated(run_id, status=status)
            if discard:
                client.delete_run(run_id)


def log_evaluation(run_id: str, result: dict[str, Any], uri: str | None = None,
                   gate: dict[str, Any] | None = None) -> None:
    """Log an evaluation (`run_evaluation`'s result) to the training run it judged: its numbers as `eval_<name>` tags
    (each model's metrics as `eval_<model>_<metric>`; single results, so the run's metric charts are the training
    curves), the gate as the `eval_passed` tag with the thresholds it was decided with (`gate`: `eval_gate_<name>`)
    and the conditions that failed, the report, its chart and the predictions table as artifacts under `evaluation/`."""
    import pandas as pd
    from mlflow.entities import RunTag

    from ftpipe.core.evaluation.chart import CHART

    client = mlflow_client(uri)
    numbers = {f"eval_{key}": value for key, value in result.items()
               if isinstance(value, (int, float)) and not isinstance(value, bool)}
    for side, summary in result["metrics"].items():
        numbers.update({f"eval_{side}_{name}": value for name, value in summary.items() if isinstance(value, float)})
    tags = {**{key: _shown(value) for key, value in numbers.items()}, "eval_passed": str(result["passed"]).lower(),
            **{f"eval_gate_{name}": str(value) for name, value in (gate or {}).items()}}
    if gate is not None:
        tags["eval_failed_conditions"] = "; ".join(result.get("failed_conditions", [])) or "none"
    client.log_batch(run_id, tags=[RunTag(key, value) for key, value in tags.items()])
    client.log_text(run_id, result["report_markdown"], "evaluation/report.md")
    client.log_artifact(run_id, str(Path(result["report_path"]).parent / CHART), "evaluation")
    client.log_table(run_id, data=pd.read_parquet(result["predictions_path"]),
                     artifact_file="evaluation/predictions.json")


def _shown(value: int | float) -> str:
    """A result as a tag: an integer as it is, another number to 4 significant digits (the evaluation's files keep
    the exact values)."""
    return str(value) if isinstance(value, int) else str(rounded(value))
