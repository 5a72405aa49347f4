"""What an operator does to a running pipeline, against the real UI stack (dagster-webserver and dagster-daemon on
127.0.0.1) through the GraphQL calls the UI's buttons send, and against `python -m ftpipe run`: terminate a training,
kill it, kill the whole stack and start it again, launch one partition twice, force a retraining, wait for the
`gpu` pool and stop the wait, stop an evaluation. Each asserts the run's status, the MLflow run's status, the pool's
slots, the processes left and what the next run recovers.

The stack polls every POLL seconds here (run monitoring, freeing slots, sensors) instead of dagster.yaml's 15/10/30 s.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import dagster as dg
import psutil
import pytest

from ftpipe.core.layout import TaskLayout
from ftpipe.core.storage import process_alive
from ftpipe.core.tracking import mlflow_client
from ftpipe.core.training.checkpoints import RUN_ID_FILE, checkpoint_step, is_complete_checkpoint
from ftpipe.launcher import worker
from ftpipe_tests.builders import TRAINING as SHORT_TRAINING, LENIENT_GATE, make_task, pool_holding_job, toy_task
from ftpipe_tests.e2e.helpers import (Stack, as_a_terminal_starts_it, dagster_home, launch, run_checked, wait_for,
                                     wait_for_run)
from ftpipe_tests.tiny_model import toy_rows

pytestmark = [pytest.mark.e2e, pytest.mark.slow]
TRAINING = ("training: {method: lora, max_steps: 300, batch_size: 8, eval_steps: 10, logging_steps: 10, "
            "learning_rate: 0.01, max_length: 64, warmup_ratio: 0.0, early_stopping_patience: 1000}\n")
TASKS = ("waiter", "halted", "crashed", "twins", "phoenix")
POLL = 2
AUTOMATION = ("task_files_sensor", "review_verdicts_sensor", "automation_sensor", "retrain_on_data_change_sensor")
FINETUNE = {"pipelineName": "finetune_job"}
ADAPTER = {"pipelineName": "__ASSET_JOB", "assetSelection": [{"path": ["lora_adapter"]}]}
TERMINATE = """
mutation Terminate($ids: [String!]!) {
  terminateRuns(runIds: $ids, terminatePolicy: SAFE_TERMINATE) {
    ... on TerminateRunsResult { terminateRunResults { __typename } }
  }
}"""


@pytest.fixture(scope="module")
def module_stack(tmp_path_factory: pytest.TempPathFactory, tiny_model_dir: Path):
    """One stack for the module, with a task per test, polling every POLL seconds; automation sensors off, so only the
    tests launch runs."""
    root = tmp_path_factory.mktemp("operator")
    for task in TASKS:
        toy_task(root / "data", task, tiny_model_dir, LENIENT_GATE, training=TRAINING)
    (root / "data" / "general").mkdir()  # no probe: the tests here time trainings, not evaluations
    home = dagster_home(root, run_monitoring={"poll_interval_seconds": POLL, "free_slots_after_run_end_seconds": 1})
    env = {**os.environ, "DAGSTER_HOME": str(home), "FTPIPE_DATA_DIR": str(root / "data"),
           "FTPIPE_HOME": str(root / "home"), "FTPIPE_MODEL_DIRS": str(tmp_path_factory.getbasetemp()),
           "FTPIPE_POLL_SECONDS": str(POLL)}
    env.pop("MLFLOW_TRACKING_URI", None)
    run_checked([sys.executable, "-m", "ftpipe", "tasks", "sync"], env=env, cwd=home)
    with pytest.MonkeyPatch.context() as patch:
        patch.chdir(home)  # dagster.yaml's storage folder is relative to the working directory
        running = Stack(env, home, stopped_sensors=AUTOMATION)
        try:
            with dg.DagsterInstance.from_config(str(home)) as instance:
                running.instance = instance
                yield running
        finally:
            running.stop()


@pytest.fixture
def stack(module_stack: Stack, monkeypatch: pytest.MonkeyPatch) -> Stack:
    """The module's stack, with this test process looking at the same data dir and artifact home."""
    for name in ("FTPIPE_DATA_DIR", "FTPIPE_HOME"):
        monkeypatch.setenv(name, module_stack.env[name])
    return module_stack


def trainings(task: str, processes: list[psutil.Process]) -> list[psutil.Process]:
    """The training programs of `task` among `processes`."""
    spec = str(TaskLayout(task).spec_file())
    found = []
    for process in processes:
        try:
            if "ftpipe.core.training" in process.cmdline() and spec in process.cmdline():
                found.append(process)
        except psutil.NoSuchProcess:
            pass
    return found


def complete_checkpoints(task: str) -> list[int]:
    return sorted(checkpoint_step(path) for path in TaskLayout(task).path("checkpoints").glob("*/checkpoint-*")
                  if is_complete_checkpoint(path))


def training_past(task: str, owner, step: int = 0, other_than: int | None = None) -> psutil.Process:
    """`task`'s training process among `owner`'s (a Stack or a Cli), once it saved a checkpoint past `step`."""
    def ready():
        found = [p for p in trainings(task, owner.family()) if p.pid != other_than]
        return found[0] if found and complete_checkpoints(task) and complete_checkpoints(task)[-1] > step else None

    return wait_for(ready, 300, f"a checkpoint of {task} past step {step}", owner, every=0.2)


def mlflow_run_of(task: str) -> str:
    [found] = TaskLayout(task).path("checkpoints").glob(f"*/{RUN_ID_FILE}")
    return found.read_text()


def mlflow_status(run_id: str) -> str:
    return mlflow_client().get_run(run_id).info.status


def claimed(stack: Stack, run_id: str) -> list:
    return [slot for slot in stack.instance.event_log_storage.get_concurrency_info("gpu").claimed_slots
            if slot.run_id == run_id]


def events(instance: dg.DagsterInstance, run_id: str, kind: dg.DagsterEventType, step: str = "lora_adapter") -> list:
    return [e for e in instance.all_logs(run_id, of_type=kind) if e.step_key == step]


def adapter(stack: Stack, run_id: str) -> dict:
    """The metadata of `lora_adapter`'s materialization in `run_id`."""
    [event] = events(stack.instance, run_id, dg.DagsterEventType.ASSET_MATERIALIZATION)
    return {key: value.value for key, value in event.asset_materialization.metadata.items()}


def logged_steps(run_id: str, metric: str) -> list[int]:
    return [m.step for m in mlflow_client().get_metric_history(run_id, metric)]


def hold_the_pool(instance: dg.DagsterInstance) -> tuple[dg.DagsterRun, str]:
    """A run of task `other` holding the `gpu` slot, and what a run waiting for it logs."""
    holder = instance.create_run_for_job(pool_holding_job, status=dg.DagsterRunStatus.STARTED,
                                         tags={"dagster/partition": "other"})
    instance.event_log_storage.initialize_concurrency_limit_to_default("gpu")
    assert instance.event_log_storage.claim_concurrency_slot("gpu", holder.run_id, "lora_adapter").is_claimed
    return holder, f"pool gpu: held by run {holder.run_id[:8]} (task other, step lora_adapter) since"


class Cli:
    """`python -m ftpipe run TASK` in its own process group, as a terminal runs it, its output in `logs`."""

    def __init__(self, task: str, env: dict, cwd: Path, name: str):
        self.logs = cwd / f"{name}.log"
        self.process = subprocess.Popen([sys.executable, "-m", "ftpipe", "run", task], env=env, cwd=cwd,
                                        stdout=self.logs.open("w"), stderr=subprocess.STDOUT, start_new_session=True,
                                        preexec_fn=as_a_terminal_starts_it)

    def family(self) -> list[psutil.Process]:
        return [psutil.Process(self.process.pid), *psutil.Process(self.process.pid).children(recursive=True)]

    def wait_for_line(self, text: str, timeout: float = 300) -> str:
        def found():
            return next((line for line in self.logs.read_text().splitlines() if text in line), None)

        return wait_for(found, timeout, f"a line with {text!r}", self, every=0.2)

    def cpu_seconds(self, over: float) -> float:
        """CPU time the command (and any process it started) used over the next `over` seconds."""
        def used() -> float:
            return sum(sum(process.cpu_times()[:2]) for process in self.family())

        before = used()
        time.sleep(over)
        return used() - before

    def stop(self, sig: int, timeout: float = 60) -> float:
        """Send `sig` to the command's process group (Ctrl-C reaches them all); seconds until it exited."""
        asked = time.monotonic()
        os.killpg(self.process.pid, sig)
        self.process.wait(timeout=timeout)
        return time.monotonic() - asked


def never_failed(instance: dg.DagsterInstance, run_id: str, cli: Cli) -> bool:
    """Whether run `run_id` of `cli` was canceled without a run failure in its events or in the command's output."""
    kinds = {record.event_log_entry.dagster_event.event_type for record in instance.get_records_for_run(run_id).records
             if record.event_log_entry.is_dagster_event}
    return dg.DagsterEventType.RUN_CANCELED in kinds and dg.DagsterEventType.RUN_FAILURE not in kinds and (
        "RUN_FAILURE" not in cli.logs.read_text())


def test_the_cli_waits_for_the_pool_without_cpu_names_the_holder_and_stops_on_sigterm_ctrl_c_and_a_hangup(
        ftpipe_env: Path, tiny_model_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    toy_task(ftpipe_env, "queued", tiny_model_dir, LENIENT_GATE, training=TRAINING)
    home = dagster_home(tmp_path)
    env = {**os.environ, "DAGSTER_HOME": str(home)}
    monkeypatch.chdir(home)
    with dg.DagsterInstance.from_config(str(home)) as instance:
        pool = instance.event_log_storage
        holder, holding = hold_the_pool(instance)

        waiting = Cli("queued", env, home, "waiting")
        waiting.wait_for_line(holding)
        cpu = waiting.cpu_seconds(over=10)
        print(f"CPU while waiting for the pool: {cpu:.2f}s in 10s")
        assert cpu < 0.5, "waiting costs no measurable CPU"
        assert waiting.stop(signal.SIGTERM) < 10 and waiting.process.returncode == 1
        [stopped] = instance.get_runs(dg.RunsFilter(tags={"dagster/partition": "queued"}))
        assert stopped.status == dg.DagsterRunStatus.CANCELED, "stopped by the operator, as Terminate does"
        assert stopped.tags.get("dagster/will_retry") != "true", "so the daemon does not run it again"
        assert never_failed(instance, stopped.run_id, waiting), "canceled at once: no failure recorded, none printed"
        assert {step.run_id for step in pool.get_concurrency_info("gpu").pending_steps} == {holder.run_id}

        training = Cli("queued", env, home, "training")
        training.wait_for_line(holding)
        [run] = instance.get_runs(dg.RunsFilter(tags={"dagster/partition": "queued"},
                                                statuses=[dg.DagsterRunStatus.STARTED]))
        freed = time.monotonic()
        pool.free_concurrency_slots_for_run(holder.run_id)
        wait_for(lambda: events(instance, run.run_id, dg.DagsterEventType.STEP_START), 60, "the training step to start",
                 training, every=0.2)
        print(f"the step started {time.monotonic() - freed:.1f}s after the slot came free")
        program = training_past("queued", training)
        exited = training.stop(signal.SIGINT)
        print(f"Ctrl-C: the command exited after {exited:.1f}s")
        assert exited < 30 and training.process.returncode == 1 and not program.is_running()
        said = training.logs.read_text()
        assert "ftpipe run of task 'queued': STOPPED" in said and said.rstrip().endswith(
            "STOPPED: lora_adapter: stopped by Ctrl-C or SIGTERM (the same command carries on: the finished steps are "
            "reused)") and "FAILED" not in said, "stopped by the operator, not failed"
        assert "Traceback" not in said, "Ctrl-C is said once, in the last line: no helper process prints a traceback"
        assert instance.get_run_by_id(run.run_id).status == dg.DagsterRunStatus.CANCELED
        assert never_failed(instance, run.run_id, training)
        assert mlflow_status(mlflow_run_of("queued")) == "KILLED"
        assert not pool.get_concurrency_info("gpu").claimed_slots and not pool.get_concurrency_info("gpu").pending_steps

        hung_up = Cli("queued", env, home, "hung-up")  # the terminal closed, an SSH session dropped: SIGHUP to them all
        program = training_past("queued", hung_up, step=complete_checkpoints("queued")[-1])
        assert hung_up.stop(signal.SIGHUP) < 30 and hung_up.process.returncode == 1 and not program.is_running()
        [last, *_] = instance.get_runs(dg.RunsFilter(tags={"dagster/partition": "queued"}), limit=1)
        assert last.status == dg.DagsterRunStatus.CANCELED and never_failed(instance, last.run_id, hung_up)
        assert "STOPPED: lora_adapter: stopped by" in hung_up.logs.read_text()
        assert mlflow_status(mlflow_run_of("queued")) == "KILLED", "the training stopped cleanly, not killed outright"
        assert not pool.get_concurrency_info("gpu").claimed_slots


def test_ctrl_c_in_the_evaluation_cancels_the_run_at_once_and_says_so_in_one_line(
        ftpipe_env: Path, tiny_model_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    rows = [{"messages": row["messages"]} for row in toy_rows(1000, seed=3)]  # 500 held-out rows: seconds of answers
    make_task(ftpipe_env, "judged", {"rows.jsonl": rows},
              f"base_model: {tiny_model_dir}\nsplit: {{eval_fraction: 0.5}}\n{SHORT_TRAINING}{LENIENT_GATE}")
    home = dagster_home(tmp_path)
    monkeypatch.chdir(home)
    judged = Cli("judged", {**os.environ, "DAGSTER_HOME": str(home)}, home, "judged")
    judged.wait_for_line("few-shot: answering")
    assert judged.stop(signal.SIGINT) < 30 and judged.process.returncode == 1
    said = judged.logs.read_text()
    assert said.rstrip().endswith("STOPPED: eval_report: stopped by Ctrl-C or SIGTERM (the same command carries on: "
                                  "the finished steps are reused)")
    assert "Stack Trace" not in said and "Traceback" not in said, "said once, in the last line"
    with dg.DagsterInstance.from_config(str(home)) as instance:
        [run] = instance.get_runs(dg.RunsFilter(tags={"dagster/partition": "judged"}))
        assert run.status == dg.DagsterRunStatus.CANCELED
        assert never_failed(instance, run.run_id, judged), "canceling before the step saw the stop: no failure"


def test_terminate_ends_a_wait_for_the_pool_at_once(stack: Stack) -> None:
    pool = stack.instance.event_log_storage
    holder, holding = hold_the_pool(stack.instance)
    run_id = launch(stack, FINETUNE, "waiter")
    wait_for(lambda: any(holding in e.message for e in stack.instance.all_logs(run_id)), 300,
             "the run to say who holds the pool", stack, every=0.5)
    asked = time.monotonic()
    stack.graphql(TERMINATE, ids=[run_id])
    assert wait_for_run(stack, run_id, 60) == "CANCELED"
    print(f"Terminate while waiting for the pool: CANCELED after {time.monotonic() - asked:.1f}s")
    assert time.monotonic() - asked < 15
    assert {step.run_id for step in pool.get_concurrency_info("gpu").pending_steps} == {holder.run_id}
    pool.free_concurrency_slots_for_run(holder.run_id)


def test_terminate_stops_the_training_at_once_and_the_next_launch_resumes_it(stack: Stack) -> None:
    run_id = launch(stack, FINETUNE, "halted")
    training = training_past("halted", stack)
    worker_pid, _ = worker(stack.instance, stack.instance.get_run_by_id(run_id))
    asked = time.monotonic()
    [result] = stack.graphql(TERMINATE, ids=[run_id])["terminateRuns"]["terminateRunResults"]
    assert result["__typename"] == "TerminateRunSuccess"
    psutil.wait_procs([training], timeout=60)
    stopped = time.monotonic() - asked
    assert wait_for_run(stack, run_id, 60) == "CANCELED"
    print(f"Terminate: training stopped after {stopped:.1f}s, run CANCELED after {time.monotonic() - asked:.1f}s")
    assert stopped < 15
    assert not events(stack.instance, run_id, dg.DagsterEventType.STEP_UP_FOR_RETRY), "a termination is not retried"
    [failure] = events(stack.instance, run_id, dg.DagsterEventType.STEP_FAILURE)
    said = failure.dagster_event.step_failure_data
    assert said.user_failure_data.description == "training stopped: the run was interrupted"
    assert said.error.cause is None, "one line for the operator, not the interruption's traceback beneath it"
    killed = mlflow_run_of("halted")
    assert mlflow_status(killed) == "KILLED"
    assert not claimed(stack, run_id)
    wait_for(lambda: not process_alive(worker_pid), 30, "the run worker to exit", stack)
    assert not trainings("halted", list(psutil.process_iter()))
    stopped_at = complete_checkpoints("halted")[-1]

    resumed = launch(stack, ADAPTER, "halted")
    assert wait_for_run(stack, resumed) == "SUCCESS"
    trained = adapter(stack, resumed)
    assert trained["mlflow_run_id"] == killed and trained["resumed_from_step"] == stopped_at
    said = [e.message for e in stack.instance.all_logs(resumed)]
    assert any(f"steps of 300 left, resuming at step {stopped_at}" in line for line in said), "sized for what is left"
    assert trained["estimated_steps"] == 300 - stopped_at and trained["estimate_ratio"] > 0
    assert mlflow_status(killed) == "FINISHED"
    assert logged_steps(killed, "train_loss") == list(range(10, 301, 10)), "one point per step after the resume"
    assert logged_steps(killed, "eval_loss") == list(range(10, 301, 10))


def test_a_killed_training_is_retried_once_and_a_second_kill_fails_the_run(stack: Stack) -> None:
    run_id = launch(stack, FINETUNE, "crashed")
    first = training_past("crashed", stack)
    first.kill()
    second = training_past("crashed", stack, step=complete_checkpoints("crashed")[-1], other_than=first.pid)
    second.kill()
    assert wait_for_run(stack, run_id) == "FAILURE"
    assert len(events(stack.instance, run_id, dg.DagsterEventType.STEP_UP_FOR_RETRY)) == 1
    assert len(events(stack.instance, run_id, dg.DagsterEventType.STEP_FAILURE)) == 1
    assert not claimed(stack, run_id)
    training_run = mlflow_run_of("crashed")
    wait_for(lambda: mlflow_status(training_run) == "KILLED", 30, "the MLflow run to be closed", stack)
    tags = wait_for(lambda: (run := stack.instance.get_run_by_id(run_id)).tags.get("dagster/will_retry") and run.tags,
                    60, "the retry daemon's decision", stack)
    assert tags["dagster/will_retry"] == "false", "a step that failed is not re-run as a whole run"
    assert not stack.instance.get_runs(dg.RunsFilter(tags={"dagster/parent_run_id": run_id}))


def test_two_launches_of_one_partition_take_turns_on_the_pool_and_share_the_work(stack: Stack) -> None:
    runs = [launch(stack, FINETUNE, "twins") for _ in range(2)]
    assert [wait_for_run(stack, run_id) for run_id in runs] == ["SUCCESS", "SUCCESS"]
    reused = [adapter(stack, run_id)["reused"] for run_id in runs]
    assert sorted(reused) == [False, True], "the second training reused the first one's adapter"
    waited, held = runs if reused[0] else runs[::-1]
    blocked = [e.message for e in stack.instance.all_logs(waited, of_type=dg.DagsterEventType.ENGINE_EVENT)
               if "blocked by limit for pool gpu" in e.message]
    assert any(f"held by run {held[:8]} (task twins, step lora_adapter) since " in line for line in blocked), blocked
    heavy = sorted((s.start_time, s.end_time) for run_id in runs for s in stack.instance.get_run_step_stats(run_id)
                   if s.step_key in ("lora_adapter", "eval_report", "merged_model"))
    assert all(later[0] >= earlier[1] for earlier, later in zip(heavy, heavy[1:])), "one heavy step at a time"
    folder = TaskLayout("twins").path("merged_model")
    live = {os.readlink(link) for link in folder.iterdir() if link.is_symlink() and link.name != "latest"}
    assert {p.name for p in folder.iterdir() if p.name.endswith(".v")} == live and len(live) == 1, "one copy"
    assert len(mlflow_client().search_model_versions("name = 'ftpipe-twins'")) == 1
    [experiment] = [e for e in mlflow_client().search_experiments() if e.name == "ftpipe-twins"]
    assert len(mlflow_client().search_runs([experiment.experiment_id])) == 1


def test_a_stack_killed_mid_training_fails_the_run_frees_its_slot_and_retries_it(stack: Stack) -> None:
    run_id = launch(stack, FINETUNE, "phoenix")
    training_past("phoenix", stack)
    training_run = mlflow_run_of("phoenix")
    stack.kill()
    assert stack.instance.get_run_by_id(run_id).status == dg.DagsterRunStatus.STARTED and claimed(stack, run_id)
    assert mlflow_status(training_run) == "RUNNING"
    restarted = time.monotonic()
    stack.start()
    stack.wait_until_loaded()
    loaded = time.monotonic() - restarted
    timings = {}
    for what, done in (("failed", lambda: stack.instance.get_run_by_id(run_id).status == dg.DagsterRunStatus.FAILURE),
                       ("slot freed", lambda: not claimed(stack, run_id)),
                       ("MLflow run KILLED", lambda: mlflow_status(training_run) == "KILLED")):
        wait_for(done, 60, f"the dead run to be {what}", stack, every=0.5)
        timings[what] = time.monotonic() - restarted
    print(f"after the restart: loaded {loaded:.0f}s, " + ", ".join(f"{k} {v:.0f}s" for k, v in timings.items()))
    [retry] = wait_for(lambda: stack.instance.get_runs(dg.RunsFilter(tags={"dagster/parent_run_id": run_id})), 60,
                       "the retry of the dead run", stack)
    assert wait_for_run(stack, retry.run_id) == "SUCCESS"
    trained = adapter(stack, retry.run_id)
    assert trained["mlflow_run_id"] == training_run and trained["resumed_from_step"] > 0
    assert mlflow_status(training_run) == "FINISHED"
