"""Dagster and MLflow on a real PostgreSQL server (started here on 127.0.0.1, with a password): two tasks run at
the same time, and none of the secrets in their environment ends up in a log, a metadata value, MLflow or a file."""

import os
import shutil
import socket
import subprocess
import sys
import tempfile
import uuid
from pathlib import Path

import dagster as dg
import pytest
from mlflow.tracking import MlflowClient

from ftpipe.core.storage import REPO_ROOT
from ftpipe_tests.e2e.helpers import TASKS, assert_heavy_steps_one_at_a_time, run_at_once, run_checked, two_tiny_tasks

pytestmark = [pytest.mark.e2e, pytest.mark.slow]
SECRET = uuid.uuid4().hex[:12]
PG_PASSWORD = f"pg-pw-{SECRET}"
PLANTED = {"HF_TOKEN": f"hf_planted{SECRET}", "OPENAI_API_KEY": f"sk-planted-{SECRET}",
           "AWS_SECRET_ACCESS_KEY": f"aws/planted/{SECRET}", "DAGSTER_PG_PASSWORD": PG_PASSWORD}


def postgres_bin(name: str) -> Path:
    found = sorted(Path("/usr/lib/postgresql").glob(f"*/bin/{name}"))
    assert found, "PostgreSQL server binaries are missing: install Debian's postgresql package (.ci/run does)"
    return found[-1]


def as_postgres_user(command: list) -> list:
    """initdb and postgres refuse to run as root; run them as the `postgres` system user then."""
    return ["runuser", "-u", "postgres", "--", *map(str, command)] if os.geteuid() == 0 else list(map(str, command))


@pytest.fixture
def postgres():
    """A throwaway PostgreSQL cluster on 127.0.0.1 (password needed over TCP) with `dagster` and `mlflow`
    databases; stopped afterwards."""
    folder = Path(tempfile.mkdtemp(prefix="ftpipe-pg-"))  # outside pytest's private tmp, readable by `postgres`
    if os.geteuid() == 0:
        shutil.chown(folder, "postgres")
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    data = folder / "data"
    (folder / "pwfile").write_text(PG_PASSWORD)
    run_checked(as_postgres_user([postgres_bin("initdb"), "-D", data, "-U", "postgres", "--auth-local=trust",
                                  "--auth-host=scram-sha-256", f"--pwfile={folder / 'pwfile'}"]))
    options = f"-p {port} -c listen_addresses=127.0.0.1 -c unix_socket_directories={folder} -c max_connections=200"
    run_checked(as_postgres_user([postgres_bin("pg_ctl"), "-D", data, "-l", folder / "log", "-o", options, "-w", "start"]))
    try:
        for database in ("dagster", "mlflow"):
            run_checked(as_postgres_user([postgres_bin("createdb"), "-h", folder, "-p", port, "-U", "postgres", database]))
        yield port
    finally:
        subprocess.run(as_postgres_user([postgres_bin("pg_ctl"), "-D", data, "-m", "fast", "-w", "stop"]), capture_output=True)
        shutil.rmtree(folder, ignore_errors=True)


def test_two_tasks_at_once_on_postgres_and_no_secret_leaks(postgres: int, ftpipe_env: Path, tiny_model_dir: Path,
                                                            tmp_path: Path) -> None:
    home = two_tiny_tasks(ftpipe_env, tiny_model_dir, tmp_path, REPO_ROOT / "deploy" / "dagster.postgres.yaml")
    mlflow_uri = f"postgresql://postgres:{PG_PASSWORD}@127.0.0.1:{postgres}/mlflow"
    env = {**os.environ, **PLANTED, "DAGSTER_HOME": str(home), "MLFLOW_TRACKING_URI": mlflow_uri,
           "DAGSTER_PG_HOST": "127.0.0.1", "DAGSTER_PG_PORT": str(postgres), "DAGSTER_PG_DB": "dagster", "DAGSTER_PG_USER": "postgres"}
    run_checked([sys.executable, "-m", "ftpipe", "tasks", "sync"], env=env, cwd=home)
    relaxed = "evaluation.max_forgetting=0.5"  # over task.yaml's 1.0 (the lenient gate), for this run only
    outputs = run_at_once([[sys.executable, "-m", "ftpipe", "run", TASKS[0], "--set", relaxed],
                           [sys.executable, "-m", "ftpipe", "run", TASKS[1]]], env, home)
    verdicts = [[line for line in output.splitlines() if " gate PASSED" in line] for output in outputs]
    assert [[line.split("; gate ")[1] for line in lines] for lines in verdicts] == [
        [f"PASSED at min_improvement -2 (default 0), max_forgetting {limit} (default 0.1)"] for limit in ("0.5", "1")]

    os.environ.update({key: env[key] for key in env if key.startswith("DAGSTER_PG_")})
    with dg.DagsterInstance.from_config(str(home)) as instance:
        assert type(instance.run_storage).__name__ == "PostgresRunStorage"
        for task in TASKS:
            [record] = instance.fetch_materializations(
                dg.AssetRecordsFilter(asset_key=dg.AssetKey("merged_model"), asset_partitions=[task]), limit=1).records
            assert record.asset_materialization.metadata["registered_model"].value == f"ftpipe-{task}"
        assert_heavy_steps_one_at_a_time(instance)
        dagster_records = dagster_texts(instance)
    client = MlflowClient(mlflow_uri)
    for task in TASKS:
        experiment = client.get_experiment_by_name(f"ftpipe-{task}")
        assert [run.info.status for run in client.search_runs([experiment.experiment_id])] == ["FINISHED"]
        assert str(client.get_registered_model(f"ftpipe-{task}").aliases["candidate"]) == "1"

    places = {"ftpipe run output": "\n".join(outputs), **dagster_records, **mlflow_texts(client),
              **file_texts(home), **file_texts(Path(os.environ["FTPIPE_HOME"]))}
    assert len(places) > 50 and any("mlflow" in text for text in places.values())
    leaks = {place: name for place, text in places.items() for name, secret in PLANTED.items() if secret in text}
    assert not leaks, f"secrets found: {leaks}"


def dagster_texts(instance: dg.DagsterInstance) -> dict[str, str]:
    """Every run's config and tags and every event it logged (messages, metadata), serialised."""
    texts = {}
    for run in instance.get_runs():
        texts[f"dagster run {run.run_id}"] = dg.serialize_value(run)
        texts[f"dagster events {run.run_id}"] = "\n".join(dg.serialize_value(e) for e in instance.all_logs(run.run_id))
    return texts


def mlflow_texts(client: MlflowClient) -> dict[str, str]:
    """Every MLflow run's params, tags and metric names, and every registered model version."""
    texts = {}
    for experiment in client.search_experiments():
        for run in client.search_runs([experiment.experiment_id]):
            texts[f"mlflow run {run.info.run_id}"] = repr((run.data.params, run.data.tags, list(run.data.metrics)))
    for model in client.search_registered_models():
        for version in client.search_model_versions(f"name = '{model.name}'"):
            texts[f"model {model.name} v{version.version}"] = repr((version.source, version.tags, version.description))
    return texts


def file_texts(root: Path) -> dict[str, str]:
    """Every file under `root` (logs, compute logs, artifacts, specs, model cards), decoded leniently."""
    return {str(path): path.read_bytes().decode("utf-8", "replace") for path in root.rglob("*") if path.is_file()}


def test_postgres_instance_differs_from_the_local_one_only_in_storage() -> None:
    import yaml

    local = yaml.safe_load((REPO_ROOT / "dagster.yaml").read_text())
    postgres = yaml.safe_load((REPO_ROOT / "deploy" / "dagster.postgres.yaml").read_text())
    assert set(postgres.pop("storage")) == {"postgres"} and set(local.pop("storage")) == {"sqlite"}
    assert postgres == local
