"""The command line's own bookkeeping (runs left behind by a `python -m ftpipe run` whose process died) and the servers `make` starts."""

import os
import subprocess
import sys

import dagster as dg

from ftpipe.__main__ import PID_TAG, release_dead_runs


@dg.op
def noop() -> None:
    pass


@dg.job
def tiny_job() -> None:
    noop()


def started_run(instance: dg.DagsterInstance, pid: int) -> str:
    run = instance.create_run_for_job(tiny_job, tags={PID_TAG: str(pid)}, status=dg.DagsterRunStatus.STARTED)
    instance.event_log_storage.claim_concurrency_slot("gpu", run.run_id, "lora_adapter")
    return run.run_id


def test_runs_of_dead_processes_fail_and_free_their_gpu_slot() -> None:
    gone = subprocess.Popen([sys.executable, "-c", "pass"])
    gone.wait()
    with dg.instance_for_test() as instance:
        instance.event_log_storage.set_concurrency_slots("gpu", 2)
        dead, alive = started_run(instance, gone.pid), started_run(instance, os.getpid())
        assert instance.event_log_storage.get_concurrency_info("gpu").active_slot_count == 2

        release_dead_runs(instance)

        assert instance.get_run_by_id(dead).status == dg.DagsterRunStatus.FAILURE
        assert instance.get_run_by_id(alive).status == dg.DagsterRunStatus.STARTED
        assert instance.event_log_storage.get_concurrency_info("gpu").active_run_ids == {alive}


def test_the_servers_it_starts_listen_on_localhost_only() -> None:
    import re

    from ftpipe.core.storage import REPO_ROOT

    makefile = (REPO_ROOT / "Makefile").read_text()
    commands = [line for line in makefile.splitlines() if re.search(r"dagster dev|dagster-webserver|mlflow (ui|server)", line)]
    assert len(commands) == 2
    assert all(re.search(r"(-h|--host) 127\.0\.0\.1 ", line) for line in commands), commands
