"""The command line: what a failed run says, its own bookkeeping (runs left behind by a `python -m ftpipe run` whose
process died) and the servers `make` starts."""

import os
import shutil
import subprocess
import sys
from pathlib import Path

import dagster as dg

from ftpipe.__main__ import release_dead_runs
from ftpipe.core.storage import REPO_ROOT
from ftpipe.core.tracking import PID_TAG
from ftpipe_tests.builders import chat, make_task


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


def ftpipe_run(task: str, tmp_path: Path) -> tuple[str, int]:
    """What `python -m ftpipe run TASK` prints (stdout and stderr, as a terminal shows them) with the project's
    instance settings in a fresh Dagster home; and its exit status."""
    home = tmp_path / "dagster_home"
    home.mkdir()
    shutil.copy(REPO_ROOT / "dagster.yaml", home / "dagster.yaml")
    env = {**os.environ, "DAGSTER_HOME": str(home)}
    done = subprocess.run([sys.executable, "-m", "ftpipe", "run", task], stdout=subprocess.PIPE,
                          stderr=subprocess.STDOUT, text=True, env=env, cwd=home, timeout=600)
    return done.stdout, done.returncode


def test_a_config_error_is_told_once_in_one_line_before_any_run(ftpipe_env: Path, tmp_path: Path) -> None:
    make_task(ftpipe_env, "typo", {"a.jsonl": [chat("hi", "hello")]}, "training:\n  max_step: 3\n")
    output, status = ftpipe_run("typo", tmp_path)
    assert status == 2
    assert output.count("training.max_step:") == 1 and "Traceback" not in output and "Stack Trace" not in output
    last = output.strip().splitlines()[-1]
    assert "FAILED" in last and "task.yaml" in last and "training.max_step" in last and "unknown key" in last


def test_a_failed_run_ends_with_the_first_failed_steps_reason(ftpipe_env: Path, tiny_model_dir: Path,
                                                              tmp_path: Path) -> None:
    make_task(ftpipe_env, "empty", {"a.jsonl": [{"nothing": 1}]}, f"base_model: {tiny_model_dir}\n")
    output, status = ftpipe_run("empty", tmp_path)
    assert status == 1
    last = output.strip().splitlines()[-1]
    assert last.startswith("FAILED: raw_examples: ") and "no usable rows" in last


def test_the_servers_it_starts_listen_on_localhost_only() -> None:
    import re

    makefile = (REPO_ROOT / "Makefile").read_text()
    commands = [line for line in makefile.splitlines() if re.search(r"dagster dev|dagster-webserver|mlflow (ui|server)", line)]
    assert len(commands) == 2
    assert all(re.search(r"(-h|--host) 127\.0\.0\.1 ", line) for line in commands), commands
