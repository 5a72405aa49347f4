"""Training tracked by a real `mlflow server` process on 127.0.0.1."""

import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

from ftpipe_tests.training_program import output_result, run_to_end, toy_workspace, write_spec


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture
def mlflow_server(tmp_path: Path):
    port = free_port()
    command = [sys.executable, "-m", "mlflow", "server", "--host", "127.0.0.1", "--port", str(port),
               "--backend-store-uri", f"sqlite:///{tmp_path / 'server.db'}",
               "--artifacts-destination", str(tmp_path / "server-artifacts"), "--workers", "1"]
    log = (tmp_path / "server.log").open("w")
    process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    try:
        for _ in range(120):
            try:
                urllib.request.urlopen(f"{url}/health", timeout=1)
                break
            except OSError:
                assert process.poll() is None, (tmp_path / "server.log").read_text()[-2000:]
                time.sleep(0.5)
        yield url
    finally:
        process.terminate()
        process.wait(timeout=30)


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
