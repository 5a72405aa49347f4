"""Runs whose worker process died: the launcher's health check and terminate, and the sweep `python -m ftpipe run`
does before it waits for anything (the whole story against a real stack: e2e/test_operator.py)."""

import os
import socket
import subprocess
import sys

import dagster as dg
import pytest
from dagster._core.events import EngineEventData
from dagster._core.launcher import WorkerStatus

from ftpipe.core.tracking import HOST_TAG
from ftpipe.launcher import release_dead_runs, worker_alive
from ftpipe_tests.builders import pool_holding_job

LAUNCHER = {"run_launcher": {"module": "ftpipe.launcher", "class": "LocalRunLauncher"}}


@pytest.fixture
def instance():
    with dg.instance_for_test(overrides=LAUNCHER) as instance:
        instance.event_log_storage.set_concurrency_slots("gpu", 10)
        yield instance


@pytest.fixture(scope="module")
def gone_pid() -> int:
    gone = subprocess.Popen([sys.executable, "-c", "pass"])
    gone.wait()
    return gone.pid


def run_on(instance: dg.DagsterInstance, pid: int | None, host: str = socket.gethostname(),
           status: dg.DagsterRunStatus = dg.DagsterRunStatus.STARTED) -> dg.DagsterRun:
    """A run of this (or another) host holding a `gpu` slot, whose worker process is `pid` (None: not started)."""
    run = instance.create_run_for_job(pool_holding_job, tags={HOST_TAG: host}, status=status)
    if pid is not None:
        instance.report_engine_event(f"Started process for run (pid: {pid}).", run, EngineEventData.in_process(pid))
    instance.event_log_storage.claim_concurrency_slot("gpu", run.run_id, "lora_adapter")
    return run


def holders(instance: dg.DagsterInstance) -> set[str]:
    return {slot.run_id for slot in instance.event_log_storage.get_concurrency_info("gpu").claimed_slots}


def test_the_worker_is_alive_gone_or_unknown(instance: dg.DagsterInstance, gone_pid: int) -> None:
    assert worker_alive(instance, run_on(instance, os.getpid())) is True
    assert worker_alive(instance, run_on(instance, gone_pid)) is False
    assert worker_alive(instance, run_on(instance, None)) is None, "not started yet"
    assert worker_alive(instance, run_on(instance, gone_pid, host="elsewhere")) is None, "another machine's run"


def test_the_sweep_ends_runs_whose_worker_is_gone_and_frees_the_slots_of_ended_runs(instance, gone_pid) -> None:
    alive, dead, unknown = run_on(instance, os.getpid()), run_on(instance, gone_pid), run_on(instance, None)
    canceling = run_on(instance, gone_pid, status=dg.DagsterRunStatus.CANCELING)
    ended = run_on(instance, None, host="elsewhere", status=dg.DagsterRunStatus.CANCELED)
    ended_running = run_on(instance, os.getpid(), status=dg.DagsterRunStatus.CANCELED)

    assert len(release_dead_runs(instance)) == 5

    status = {run.run_id: instance.get_run_by_id(run.run_id).status for run in (alive, dead, unknown, canceling)}
    assert status == {alive.run_id: dg.DagsterRunStatus.STARTED, dead.run_id: dg.DagsterRunStatus.FAILURE,
                      unknown.run_id: dg.DagsterRunStatus.STARTED, canceling.run_id: dg.DagsterRunStatus.CANCELED}
    assert holders(instance) == {alive.run_id, unknown.run_id, ended_running.run_id}, "a live worker may still use it"
    assert ended.run_id not in holders(instance)
    assert release_dead_runs(instance) == []


def test_run_monitoring_is_told_a_dead_worker_failed(instance, gone_pid) -> None:
    launcher = instance.run_launcher
    assert launcher.supports_check_run_worker_health
    assert launcher.check_run_worker_health(run_on(instance, gone_pid)).status == WorkerStatus.FAILED
    assert launcher.check_run_worker_health(run_on(instance, os.getpid())).status == WorkerStatus.RUNNING
    assert launcher.check_run_worker_health(run_on(instance, None)).status == WorkerStatus.RUNNING


def test_terminating_a_run_whose_worker_is_gone_cancels_it_at_once(instance, gone_pid) -> None:
    """Its code server may be gone too (a restart after a crash), so nobody would answer the usual request."""
    run = run_on(instance, gone_pid)
    assert instance.run_launcher.terminate(run.run_id)
    assert instance.get_run_by_id(run.run_id).status == dg.DagsterRunStatus.CANCELED
