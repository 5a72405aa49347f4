"""Training tracked by a real `mlflow server` process on 127.0.0.1."""

import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from urllib.parse import urlsplit

import pytest

from ftpipe_tests.training_program import output_result, run_to_end, toy_workspace, write_spec


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@contextmanager
def mlflow_ui(backend_store_uri: str, folder: Path) -> Iterator[str]:
    """A real MLflow server (UI + REST API) on `backend_store_uri`, on a free port of 127.0.0.1, with one worker and
    no GenAI job runners like `make mlflow-ui`; yields its URL and stops its processes when done."""
    port = free_port()
    command = [sys.executable, "-m", "mlflow", "server", "--host", "127.0.0.1", "--port", str(port),
               "--backend-store-uri", backend_store_uri, "--artifacts-destination", str(folder / "server-artifacts"),
               "--workers", "1"]
    log = (folder / "server.log").open("w")
    env = {**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}
    process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, start_new_session=True, env=env)
    url = f"http://127.0.0.1:{port}"
    try:
        for _ in range(120):
            try:
                urllib.request.urlopen(f"{url}/health", timeout=1)
                break
            except OSError:
                assert process.poll() is None, (folder / "server.log").read_text()[-2000:]
                time.sleep(0.5)
        yield url
    finally:
        os.killpg(process.pid, signal.SIGTERM)  # the server and its workers: a session of their own
        process.wait(timeout=30)


@pytest.fixture
def mlflow_server(tmp_path: Path) -> Iterator[str]:
    with mlflow_ui(f"sqlite:///{tmp_path / 'server.db'}", tmp_path) as url:
        yield url


@pytest.mark.slow
def test_training_is_tracked_on_an_mlflow_server(tmp_path: Path, tiny_model_dir: Path, mlflow_server: str) -> None:
    from mlflow import MlflowClient

    workspace = toy_workspace(tmp_path / "workspace", tiny_model_dir)
    spec = write_spec(workspace, "served", tracking_uri=mlflow_server, max_steps=4, eval_steps=2)
    run_to_end(workspace, spec)
    client = MlflowClient(mlflow_server)
    run = client.get_run(output_result(spec).metadata["mlflow_run_id"])
    assert run.info.status == "FINISHED"
    assert [m.step for m in client.get_metric_history(run.info.run_id, "train_loss")] == [2, 4]
    artifacts = {a.path for a in client.list_artifacts(run.info.run_id)}
    assert "adapter" in artifacts
    assert not (workspace / "home" / "mlflow.db").exists(), "nothing went to the local default store"


def shown_run(link: str, ui: str) -> dict:
    """The run that the MLflow UI route in `link` names, as the UI's REST API returns it; checks the route names that
    run's experiment and asks for the model-training view."""
    page, _, fragment = link.partition("/#/")
    assert page == ui, link
    route = urlsplit(fragment)
    assert route.query == "workflowType=machine_learning", link
    experiment_id, run_id = re.fullmatch(r"experiments/(\w+)/runs/(\w+)", route.path).groups()
    with urllib.request.urlopen(f"{ui}/api/2.0/mlflow/runs/get?run_id={run_id}", timeout=30) as response:
        run = json.load(response)["run"]
    assert run["info"]["experiment_id"] == experiment_id
    return run


def test_run_links_open_the_run_in_the_mlflow_ui(tmp_path: Path) -> None:
    """The link Dagster shows: into `make mlflow-ui` for a local store, into the server itself for a tracking server
    (without the credentials of its URI)."""
    from ftpipe.core import tracking
    from ftpipe.resources import MlflowTracking

    store = tracking.tracking_uri()
    with tracking.tracked_run("ftpipe-toy", run_name="sft") as run:
        pass
    with mlflow_ui(store, tmp_path) as ui:
        with urllib.request.urlopen(ui, timeout=30) as response:
            assert "<html" in response.read().decode().lower()
        local = MlflowTracking(ui_url=ui).run_url(run.run_id)
        assert shown_run(local, ui)["info"]["run_name"] == "sft"
        served = MlflowTracking(tracking_uri=ui.replace("http://", "http://bob:s3cret@")).run_url(run.run_id)
        assert served == local and "s3cret" not in served
        assert MlflowTracking(ui_url=ui).run_url("0" * 32) == f"{ui}/#/runs/{'0' * 32}?workflowType=machine_learning"


@pytest.mark.slow
def test_a_model_registered_through_a_tracking_server_loads_back(tmp_path: Path, tiny_model_dir: Path,
                                                                 mlflow_server: str, monkeypatch) -> None:
    """Through a server the MLflow model is uploaded (its store is no local folder), then found by its alias."""
    import shutil

    import mlflow
    import torch
    from transformers import AutoModelForCausalLM

    from ftpipe.core import tracking
    from ftpipe.resources import MlflowTracking

    folder = tmp_path / "merged"
    shutil.copytree(tiny_model_dir, folder)
    (folder / "README.md").write_text("# ftpipe-toy\n\nA tiny model.\n")
    client = tracking.mlflow_client(mlflow_server)
    run_id = client.create_run(tracking.ensure_experiment(client, "ftpipe-toy")).info.run_id
    registered = MlflowTracking(tracking_uri=mlflow_server).register_model(
        task="toy", model_path=folder, run_id=run_id, eval_score=0.5, eval_version="split-1",
        scores={"metric": "accuracy", "rows": {"r1": 0.5}})
    assert registered["champion"] and registered["registered_version"] == 1
    assert client.get_model_version("ftpipe-toy", "1").source.startswith("mlflow-artifacts:")
    monkeypatch.setenv("MLFLOW_TRACKING_URI", mlflow_server)
    loaded = mlflow.transformers.load_model("models:/ftpipe-toy@champion").model.state_dict()
    stored = AutoModelForCausalLM.from_pretrained(folder, dtype="auto").state_dict()
    assert loaded.keys() == stored.keys() and all(torch.equal(loaded[name], stored[name]) for name in stored)
