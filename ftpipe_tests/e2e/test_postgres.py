"""Dagster and MLflow on a real PostgreSQL server (started here on 127.0.0.1): two tasks run at the same time."""

import os
import shutil
import socket
import subprocess
import sys
import tempfile
from pathlib import Path

import dagster as dg
import pytest
from mlflow.tracking import MlflowClient

from ftpipe.core.storage import REPO_ROOT
from ftpipe_tests.assets_tests.test_training_assets import TRAINING
from ftpipe_tests.conftest import make_task
from ftpipe_tests.tiny_model import build_tiny_model, toy_rows

TASKS = ["apples", "plums"]


def postgres_bin(name: str) -> Path:
    found = sorted(Path("/usr/lib/postgresql").glob(f"*/bin/{name}"))
    assert found, "PostgreSQL server binaries are missing: install Debian's postgresql package (.ci/run does)"
    return found[-1]


def as_postgres_user(command: list) -> list:
    """initdb and postgres refuse to run as root; run them as the `postgres` system user then."""
    return ["runuser", "-u", "postgres", "--", *map(str, command)] if os.geteuid() == 0 else list(map(str, command))


def run_checked(command: list, **kwargs) -> None:
    done = subprocess.run(command, capture_output=True, text=True, **kwargs)
    assert done.returncode == 0, f"{command}: {done.stdout}{done.stderr}"


@pytest.fixture
def postgres():
    """A throwaway PostgreSQL cluster on 127.0.0.1 with `dagster` and `mlflow` databases; stopped afterwards."""
    folder = Path(tempfile.mkdtemp(prefix="ftpipe-pg-"))  # outside pytest's private tmp, readable by `postgres`
    if os.geteuid() == 0:
        shutil.chown(folder, "postgres")
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    data = folder / "data"
    run_checked(as_postgres_user([postgres_bin("initdb"), "-D", data, "-U", "postgres", "--auth=trust"]))
    options = f"-p {port} -c listen_addresses=127.0.0.1 -c unix_socket_directories={folder} -c max_connections=200"
    run_checked(as_postgres_user([postgres_bin("pg_ctl"), "-D", data, "-l", folder / "log", "-o", options, "-w", "start"]))
    try:
        for database in ("dagster", "mlflow"):
            run_checked(as_postgres_user([postgres_bin("createdb"), "-h", "127.0.0.1", "-p", port, "-U", "postgres", database]))
        yield port
    finally:
        subprocess.run(as_postgres_user([postgres_bin("pg_ctl"), "-D", data, "-m", "fast", "-w", "stop"]), capture_output=True)
        shutil.rmtree(folder, ignore_errors=True)


def test_two_tasks_at_once_with_dagster_and_mlflow_on_postgres(postgres: int, ftpipe_env: Path, tmp_path: Path) -> None:
    model = build_tiny_model(tmp_path / "tiny")
    rows = [{"messages": r["messages"]} for r in toy_rows(60, seed=3)]
    for task in TASKS:
        make_task(ftpipe_env, task, {"rows.jsonl": rows},
                  f"base_model: {model}\nsplit: {{eval_fraction: 0.2}}\n{TRAINING}evaluation: {{min_improvement: -1.0, max_forgetting: 1.0}}\n")
    home = tmp_path / "dagster_home"
    home.mkdir()
    shutil.copy(REPO_ROOT / "deploy" / "dagster.postgres.yaml", home / "dagster.yaml")
    mlflow_uri = f"postgresql://postgres@127.0.0.1:{postgres}/mlflow"
    env = {**os.environ, "DAGSTER_HOME": str(home), "MLFLOW_TRACKING_URI": mlflow_uri, "DAGSTER_PG_HOST": "127.0.0.1",
           "DAGSTER_PG_PORT": str(postgres), "DAGSTER_PG_DB": "dagster", "DAGSTER_PG_USER": "postgres", "DAGSTER_PG_PASSWORD": ""}
    run_checked([sys.executable, "-m", "ftpipe", "tasks", "sync"], env=env, cwd=home)

    runs = [subprocess.Popen([sys.executable, "-m", "ftpipe", "run", task], env=env, cwd=home, text=True,
                             stdout=subprocess.PIPE, stderr=subprocess.STDOUT) for task in TASKS]
    outputs = [run.communicate(timeout=900)[0] for run in runs]
    for run, output in zip(runs, outputs):
        assert run.returncode == 0, output[-3000:]
        assert "database is locked" not in output

    os.environ.update({key: env[key] for key in env if key.startswith("DAGSTER_PG_")})
    with dg.DagsterInstance.from_config(str(home)) as instance:
        assert type(instance.run_storage).__name__ == "PostgresRunStorage"
        for task in TASKS:
            [record] = instance.fetch_materializations(
                dg.AssetRecordsFilter(asset_key=dg.AssetKey("merged_model"), asset_partitions=[task]), limit=1).records
            assert record.asset_materialization.metadata["registered_model"].value == f"ftpipe-{task}"
        heavy = sorted((step.start_time, step.end_time) for run in instance.get_runs()
                       for step in instance.get_run_step_stats(run.run_id) if step.step_key in ("lora_adapter", "eval_report"))
        assert len(heavy) == 4
        assert all(later[0] >= earlier[1] for earlier, later in zip(heavy, heavy[1:])), "the gpu pool ran heavy steps at once"
    client = MlflowClient(mlflow_uri)
    for task in TASKS:
        experiment = client.get_experiment_by_name(f"ftpipe-{task}")
        assert [run.info.status for run in client.search_runs([experiment.experiment_id])] == ["FINISHED"]
        assert str(client.get_registered_model(f"ftpipe-{task}").aliases["candidate"]) == "1"


def test_postgres_instance_differs_from_the_local_one_only_in_storage() -> None:
    import yaml

    local = yaml.safe_load((REPO_ROOT / "dagster.yaml").read_text())
    postgres = yaml.safe_load((REPO_ROOT / "deploy" / "dagster.postgres.yaml").read_text())
    assert set(postgres.pop("storage")) == {"postgres"} and set(local.pop("storage")) == {"sqlite"}
    assert postgres == local
