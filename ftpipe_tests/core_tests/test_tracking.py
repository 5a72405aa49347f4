"""MLflow tracking: default store location, run end states, stale-run sweep, URI redaction, evaluation logging."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys

import pytest

from ftpipe.core import tracking
from ftpipe.core.evaluation.chart import CHART


@pytest.fixture(autouse=True)
def stop_handlers_restored():
    """A stopped tracked run leaves further stop signals ignored for the rest of its process: not this test process."""
    from ftpipe.core.launch import STOP_SIGNALS

    before = {sig: signal.getsignal(sig) for sig in STOP_SIGNALS}
    yield
    for sig, handler in before.items():
        signal.signal(sig, handler)


@pytest.fixture()
def store(tmp_path, monkeypatch):
    monkeypatch.setenv("FTPIPE_HOME", str(tmp_path / "home"))
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    return tracking.tracking_uri()


def test_default_tracking_uri_is_sqlite_under_ftpipe_home(tmp_path, monkeypatch):
    monkeypatch.setenv("FTPIPE_HOME", str(tmp_path / "home"))
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    assert tracking.tracking_uri() == f"sqlite:///{tmp_path / 'home' / 'mlflow.db'}"
    assert tracking.artifact_root() == tmp_path / "home" / "mlartifacts"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://127.0.0.1:5000")
    assert tracking.tracking_uri() == "http://127.0.0.1:5000"


def test_redact_uri_hides_passwords_only():
    assert tracking.redact_uri("postgresql://bob:s3cret@db:5432/mlflow") == "postgresql://bob:***@db:5432/mlflow"
    assert tracking.redact_uri("sqlite:////tmp/x.db") == "sqlite:////tmp/x.db"
    assert tracking.without_credentials("https://bob:s3cret@mlflow.example:8443/x") == "https://mlflow.example:8443/x"
    assert tracking.without_credentials("http://127.0.0.1:5000") == "http://127.0.0.1:5000"


def test_experiments_are_created_as_model_training_experiments(store):
    """An experiment without a kind is taken for a GenAI one (traces); ftpipe's say they hold training runs."""
    from mlflow import MlflowClient

    client = MlflowClient(store)
    experiment = client.get_experiment(tracking.ensure_experiment(client, "kind"))
    assert experiment.tags["mlflow.experimentKind"] == "custom_model_development"
    assert tracking.ensure_experiment(client, "kind") == experiment.experiment_id


def _dead_pid() -> int:
    process = subprocess.Popen([sys.executable, "-c", "pass"])
    process.wait()
    return process.pid


def test_sweep_marks_running_runs_of_dead_processes_killed(store, tmp_path):
    from mlflow import MlflowClient

    client = MlflowClient(store)
    experiment_id = tracking.ensure_experiment(client, "sweep")
    assert client.get_experiment(experiment_id).artifact_location == (tmp_path / "home/mlartifacts/sweep").as_uri()
    host = socket.gethostname()

    def running(pid: int, hostname: str) -> str:
        tags = {tracking.PID_TAG: str(pid), tracking.HOST_TAG: hostname}
        return client.create_run(experiment_id, tags=tags).info.run_id

    dead, alive, elsewhere = running(_dead_pid(), host), running(os.getpid(), host), running(1, "other-host")
    assert tracking.sweep_stale_runs("sweep", store) == [dead]
    statuses = {run_id: client.get_run(run_id).info.status for run_id in (dead, alive, elsewhere)}
    assert statuses == {dead: "KILLED", alive: "RUNNING", elsewhere: "RUNNING"}


def test_tracked_run_ends_finished_failed_or_killed(store):
    from mlflow import MlflowClient

    client = MlflowClient(store)
    handler_before = signal.getsignal(signal.SIGTERM)
    with tracking.tracked_run("states", run_name="ok", tags={"uri": "https://u:pw@host/x"}) as run:
        run.log_params({"lr": 0.1})
        run.log_metrics({"loss": 1.0}, step=1)
        assert client.get_run(run.run_id).info.status == "RUNNING"
    finished = client.get_run(run.run_id)
    assert finished.info.status == "FINISHED" and finished.data.params == {"lr": "0.1"}
    assert finished.data.tags["uri"] == "https://u:***@host/x"

    with pytest.raises(RuntimeError), tracking.tracked_run("states", run_name="boom") as failing:
        raise RuntimeError("boom")
    assert client.get_run(failing.run_id).info.status == "FAILED"
    assert signal.getsignal(signal.SIGTERM) == handler_before, "no stop came: the handlers are given back"

    with pytest.raises(tracking.RunInterrupted), tracking.tracked_run("states", run_name="term") as killed:
        os.kill(os.getpid(), signal.SIGTERM)
    assert client.get_run(killed.run_id).info.status == "KILLED"
    assert signal.getsignal(signal.SIGINT) == signal.SIG_IGN, (
        "a stop came: the run worker's forwarded Ctrl-C must not interrupt the program's exit")


def test_a_second_stop_request_does_not_cut_the_first_ones_cleanup_short(store, monkeypatch):
    """Ctrl-C reaches the training program twice: from the terminal, and forwarded by the run worker."""
    from mlflow import MlflowClient

    client = MlflowClient(store)
    terminated = client.set_terminated

    def set_terminated_during_another_sigint(run_id, status):
        os.kill(os.getpid(), signal.SIGINT)
        terminated(run_id, status=status)

    monkeypatch.setattr(tracking, "mlflow_client", lambda uri=None: client)
    monkeypatch.setattr(client, "set_terminated", set_terminated_during_another_sigint)
    with pytest.raises(tracking.RunInterrupted), tracking.tracked_run("states", run_name="twice") as stopped:
        os.kill(os.getpid(), signal.SIGINT)
    assert client.get_run(stopped.run_id).info.status == "KILLED"


def test_a_stop_request_during_a_write_to_the_store_waits_for_the_write(store, monkeypatch):
    """SIGTERM arriving inside an MLflow write: the write completes, then the run stops and ends KILLED."""
    from mlflow import MlflowClient

    client = MlflowClient(store)
    log_batch = client.log_batch

    def log_batch_during_a_sigterm(run_id, **batch):
        os.kill(os.getpid(), signal.SIGTERM)  # handled at the next bytecode, inside this write
        log_batch(run_id, **batch)

    monkeypatch.setattr(tracking, "mlflow_client", lambda uri=None: client)
    with pytest.raises(tracking.RunInterrupted), tracking.tracked_run("states", run_name="mid-write") as stopped:
        monkeypatch.setattr(client, "log_batch", log_batch_during_a_sigterm)
        stopped.log_metrics({"loss": 0.5}, step=3)
        raise AssertionError("the stop request was not raised after the write")
    run = client.get_run(stopped.run_id)
    assert run.info.status == "KILLED" and run.data.metrics == {"loss": 0.5}


def test_runs_left_running_by_a_training_that_is_over_are_killed(store):
    from mlflow import MlflowClient

    client = MlflowClient(store)
    experiment_id = tracking.ensure_experiment(client, "left")
    over, going = (client.create_run(experiment_id, tags={tracking.LAUNCHED_BY_TAG: run}).info.run_id
                   for run in ("canceled-run", "started-run"))
    assert tracking.end_runs_left_running("left", lambda tags: tags[tracking.LAUNCHED_BY_TAG] == "canceled-run",
                                          store) == [over]
    assert [client.get_run(run_id).info.status for run_id in (over, going)] == ["KILLED", "RUNNING"]
    assert tracking.end_runs_left_running("none-such", lambda tags: True, store) == []


def test_resumed_run_continues_the_same_run(store):
    from mlflow import MlflowClient

    with tracking.tracked_run("resume", run_name="first") as first:
        pass
    with tracking.tracked_run("resume", run_name="again", resume_run_id=first.run_id) as again:
        assert MlflowClient(store).get_run(again.run_id).info.status == "RUNNING"
    assert again.run_id == first.run_id
    with tracking.tracked_run("resume", run_name="gone", resume_run_id="0" * 32) as fresh:
        pass
    assert fresh.run_id != first.run_id


def test_log_evaluation_adds_metrics_tag_report_and_table_to_the_training_run(store, tmp_path):
    import pandas as pd
    from mlflow import MlflowClient

    client = MlflowClient(store)
    run_id = client.create_run(tracking.ensure_experiment(client, "toy")).info.run_id
    predictions = tmp_path / "predictions.parquet"
    pd.DataFrame({"id": ["a", "b"], "delta": [0.0, -1.0]}).to_parquet(predictions)
    result = {"primary_metric": "accuracy", "delta": -0.5, "rows": 2, "passed": False, "fewshot_score": None,
              "metrics": {"base": {"macro_f1": 0.75, "field_accuracy_by_field": {"x": 1.0}}, "finetuned": {"macro_f1": 0.25}},
              "report_markdown": "# Evaluation", "predictions_path": str(predictions),
              "report_path": str(tmp_path / "report.md")}
    (tmp_path / CHART).write_bytes(b"\x89PNG\r\n")  # what the evaluation writes beside its report
    result["metrics"]["finetuned"]["accuracy"] = 0.26326375007629393
    result["failed_conditions"] = ["delta_ci_low -0.600 <= min_improvement -0.050"]
    tracking.log_evaluation(run_id, result, store, gate={"min_improvement": -0.05, "max_forgetting": 0.1})
    run = client.get_run(run_id)
    assert run.data.metrics == {}, "single results stay out of the metric charts, which are the training curves"
    assert {key: value for key, value in run.data.tags.items() if key.startswith("eval_")} == {
        "eval_delta": "-0.5", "eval_rows": "2", "eval_passed": "false", "eval_base_macro_f1": "0.75",
        "eval_finetuned_macro_f1": "0.25", "eval_finetuned_accuracy": "0.2633", "eval_gate_min_improvement": "-0.05",
        "eval_gate_max_forgetting": "0.1", "eval_failed_conditions": "delta_ci_low -0.600 <= min_improvement -0.050"}
    logged = {item.path for item in client.list_artifacts(run_id, "evaluation")}
    assert logged == {"evaluation/report.md", f"evaluation/{CHART}", "evaluation/predictions.json"}
