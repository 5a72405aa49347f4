"""What the end-to-end tests share: two tiny tasks run as separate processes against one instance."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import dagster as dg

from ftpipe_tests.builders import LENIENT_GATE, toy_task

TASKS = ["apples", "plums"]
HEAVY_STEPS = ("lora_adapter", "eval_report", "merged_model")


def run_checked(command: list, **kwargs) -> None:
    done = subprocess.run(command, capture_output=True, text=True, **kwargs)
    assert done.returncode == 0, f"{command}: {done.stdout}{done.stderr}"


def two_tiny_tasks(data_dir: Path, model: Path, tmp_path: Path, dagster_yaml: Path) -> Path:
    """The tasks in TASKS on the tiny `model` (their gates always pass, so every asset materializes), and a Dagster
    home holding `dagster_yaml`; returns the home."""
    for task in TASKS:
        toy_task(data_dir, task, model, LENIENT_GATE)
    home = tmp_path / "dagster_home"
    home.mkdir()
    shutil.copy(dagster_yaml, home / "dagster.yaml")
    return home


def run_at_once(commands: list[list[str]], env: dict, home: Path) -> list[str]:
    """Start `commands` together in `home`; every one must succeed, none may meet a locked database."""
    processes = [subprocess.Popen(command, env=env, cwd=home, text=True, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
                 for command in commands]
    outputs = [process.communicate(timeout=900)[0] for process in processes]
    for process, output in zip(processes, outputs):
        assert process.returncode == 0, output[-3000:]
        assert "database is locked" not in output
    return outputs


def assert_heavy_steps_one_at_a_time(instance: dg.DagsterInstance) -> None:
    """The `gpu` pool ran the two runs' training, evaluation and merge steps one after another, never together."""
    heavy = sorted((step.start_time, step.end_time) for run in instance.get_runs()
                   for step in instance.get_run_step_stats(run.run_id) if step.step_key in HEAVY_STEPS)
    assert len(heavy) == len(HEAVY_STEPS) * len(TASKS)
    assert all(later[0] >= earlier[1] for earlier, later in zip(heavy, heavy[1:])), "the gpu pool ran heavy steps at once"


def multiprocess_finetune_job() -> dg.JobDefinition:
    """`finetune_job` with every step in its own process, forked from a server that imported the libraries once."""
    from ftpipe.definitions import defs

    preload = ["ftpipe.definitions", "torch", "transformers", "peft", "mlflow"]
    executor = dg.multiprocess_executor.configured({"start_method": {"forkserver": {"preload_modules": preload}}})
    return defs.resolve_job_def("finetune_job").with_executor_def(executor)
