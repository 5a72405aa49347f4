"""Two task partitions at once on the default local stores: the multiprocess executor, a SQLite Dagster instance
and a SQLite MLflow store. Both runs succeed, the `gpu` pool runs one heavy step at a time, nothing is locked."""

import os
import sys
from pathlib import Path

import dagster as dg
import pytest
from mlflow.tracking import MlflowClient

from ftpipe.core.storage import REPO_ROOT
from ftpipe_tests.e2e.helpers import TASKS, assert_heavy_steps_one_at_a_time, run_at_once, run_checked, two_tiny_tasks

pytestmark = [pytest.mark.e2e, pytest.mark.slow]
RUN_ONE = """
import sys
import dagster as dg
from ftpipe_tests.e2e.helpers import multiprocess_finetune_job
with dg.execute_job(dg.reconstructable(multiprocess_finetune_job), instance=dg.DagsterInstance.get(),
                    tags={"dagster/partition": sys.argv[1]}) as result:
    sys.exit(0 if result.success else 1)
"""


def test_two_partitions_at_once_with_the_multiprocess_executor_on_sqlite(
    ftpipe_env: Path, tiny_model_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    home = two_tiny_tasks(ftpipe_env, tiny_model_dir, tmp_path, REPO_ROOT / "dagster.yaml")
    env = {**os.environ, "DAGSTER_HOME": str(home), "PYTHONPATH": str(REPO_ROOT)}
    env.pop("MLFLOW_TRACKING_URI", None)
    run_checked([sys.executable, "-m", "ftpipe", "tasks", "sync"], env=env, cwd=home)
    run_at_once([[sys.executable, "-c", RUN_ONE, task] for task in TASKS], env, home)

    monkeypatch.chdir(home)  # dagster.yaml's storage folders are relative to it
    with dg.DagsterInstance.from_config(str(home)) as instance:
        assert type(instance.run_storage).__name__ == "SqliteRunStorage"
        runs = instance.get_runs()
        assert len(runs) == 2 and {run.status for run in runs} == {dg.DagsterRunStatus.SUCCESS}
        assert {run.tags["dagster/partition"] for run in runs} == set(TASKS)
        processes = {e.dagster_event.pid for run in runs for e in instance.all_logs(run.run_id) if e.step_key and e.dagster_event}
        assert len(processes) > 10, "every step ran in a process of its own"
        assert_heavy_steps_one_at_a_time(instance)
    client = MlflowClient(f"sqlite:///{Path(os.environ['FTPIPE_HOME']) / 'mlflow.db'}")
    for task in TASKS:
        experiment = client.get_experiment_by_name(f"ftpipe-{task}")
        assert [run.info.status for run in client.search_runs([experiment.experiment_id])] == ["FINISHED"]
        assert str(client.get_registered_model(f"ftpipe-{task}").aliases["candidate"]) == "1"
