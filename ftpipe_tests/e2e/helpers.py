"""What the end-to-end tests share: two tiny tasks run as separate processes against one instance, and the real UI
stack (dagster-webserver and dagster-daemon on 127.0.0.1) driven through the GraphQL API the UI's buttons use."""

from __future__ import annotations

import json
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import dagster as dg
import psutil
import yaml

from ftpipe.core.storage import REPO_ROOT
from ftpipe_tests.builders import LENIENT_GATE, toy_task

TASKS = ["apples", "plums"]
HEAVY_STEPS = ("lora_adapter", "eval_report", "merged_model")


def as_a_terminal_starts_it() -> None:
    """A terminal's shell starts commands with SIGINT's and SIGHUP's default actions, even where the suite itself runs
    in the background (SIGINT ignored) or under nohup (SIGHUP ignored): a `preexec_fn` for commands a test stops so."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)
    signal.signal(signal.SIGHUP, signal.SIG_DFL)


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


ATTEMPT_STARTS = {"STEP_START", "STEP_RESTARTED"}
ATTEMPT_ENDS = {"STEP_SUCCESS", "STEP_FAILURE", "STEP_UP_FOR_RETRY"}  # the pool's slot is given back at each


def heavy_attempts(instance: dg.DagsterInstance) -> list[tuple[float, float, str]]:
    """(start, end, "run step") of every attempt of a heavy step, in order of start: a retried step holds the pool
    once per attempt, not while it waits to retry."""
    attempts = []
    for run in instance.get_runs():
        started: dict[str, float] = {}
        for entry in instance.all_logs(run.run_id):
            event = entry.dagster_event
            if event is None or entry.step_key not in HEAVY_STEPS:
                continue
            if event.event_type_value in ATTEMPT_STARTS:
                started[entry.step_key] = entry.timestamp
            elif event.event_type_value in ATTEMPT_ENDS:
                attempts.append((started.pop(entry.step_key), entry.timestamp,
                                 f"{run.run_id[:8]} {entry.step_key} ({event.event_type_value})"))
    return sorted(attempts)


def assert_heavy_steps_one_at_a_time(instance: dg.DagsterInstance) -> None:
    """The `gpu` pool ran the two runs' training, evaluation and merge steps one after another, never together."""
    attempts = heavy_attempts(instance)
    succeeded = [name for *_, name in attempts if name.endswith("(STEP_SUCCESS)")]
    assert len(succeeded) == len(HEAVY_STEPS) * len(TASKS), attempts
    overlaps = [(earlier, later) for earlier, later in zip(attempts, attempts[1:]) if later[0] < earlier[1]]
    assert not overlaps, f"the gpu pool ran heavy steps at once: {overlaps}"


def multiprocess_finetune_job() -> dg.JobDefinition:
    """`finetune_job` with every step in its own process, forked from a server that imported the libraries once."""
    from ftpipe.definitions import defs

    preload = ["ftpipe.definitions", "torch", "transformers", "peft", "mlflow"]
    executor = dg.multiprocess_executor.configured({"start_method": {"forkserver": {"preload_modules": preload}}})
    return defs.resolve_job_def("finetune_job").with_executor_def(executor)


REPOSITORY = {"repositoryLocationName": "ftpipe", "repositoryName": "__repository__"}
LAUNCH = """
mutation Launch($params: ExecutionParams!) {
  launchPipelineExecution(executionParams: $params) {
    __typename
    ... on LaunchRunSuccess { run { runId } }
    ... on PythonError { message }
    ... on RunConfigValidationInvalid { errors { message } }
  }
}"""
RUN_STATUS = "query Run($id: ID!) { runOrError(runId: $id) { ... on Run { status } } }"
LOCATION = "{ workspaceOrError { ... on Workspace { locationEntries { name loadStatus } } } }"
FINISHED = ("SUCCESS", "FAILURE", "CANCELED")
SENSOR = "query Sensor($selector: SensorSelector!) { sensorOrError(sensorSelector: $selector) { ... on Sensor { id } } }"
STOP_SENSOR = "mutation Stop($id: String) { stopSensor(id: $id) { __typename } }"


def dagster_home(tmp_path: Path, **settings: dict) -> Path:
    """A Dagster home holding the project's dagster.yaml, with the sections in `settings` updated (e.g. a shorter
    `run_monitoring` poll interval for a test)."""
    home = tmp_path / "dagster_home"
    home.mkdir()
    config = yaml.safe_load((REPO_ROOT / "dagster.yaml").read_text())
    for section, values in settings.items():
        config[section] = {**config.get(section, {}), **values}
    (home / "dagster.yaml").write_text(yaml.safe_dump(config))
    return home


class Stack:
    """The webserver and daemon processes (and what they start: code servers, run workers, trainings), and the
    GraphQL endpoint."""

    def __init__(self, env: dict, cwd: Path, stopped_sensors: tuple[str, ...] = ()):
        self.env, self.home, self.logs = env, cwd, cwd / "stack.log"
        self.start(stopped_sensors)

    def start(self, stopped_sensors: tuple[str, ...] = ()) -> None:
        """Start the webserver on a free port, then the daemon; the sensors in `stopped_sensors` are switched off in
        between, so none of them ticks (and switching them off does not race the daemon's first write of their state)."""
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.processes = [self._start("dagster-webserver", "-h", "127.0.0.1", "-p", str(self.port))]
        try:
            if stopped_sensors:
                self.wait_until_loaded()
                self.stop_sensors(*stopped_sensors)
        except BaseException:
            self.stop()
            raise
        self.processes.append(self._start("dagster-daemon", "run"))

    def _start(self, program: str, *arguments: str) -> subprocess.Popen:
        out = self.logs.open("a")
        command = [Path(sys.executable).parent / program, *arguments, "-w", str(REPO_ROOT / "workspace.yaml")]
        return subprocess.Popen(command, env=self.env, cwd=self.home, stdout=out, stderr=out)

    def graphql(self, query: str, **variables) -> dict:
        body = json.dumps({"query": query, "variables": variables}).encode()
        request = urllib.request.Request(f"{self.url}/graphql", body, {"Content-Type": "application/json"})
        try:
            with urllib.request.urlopen(request, timeout=60) as response:
                answer = json.load(response)
        except urllib.error.HTTPError as error:
            error.msg = f"{error.msg}: {error.read().decode()[:4000]}"  # the server's own error, in the message
            raise
        assert "errors" not in answer, answer
        return answer["data"]

    def wait_until_loaded(self) -> None:
        def loaded():
            try:
                entries = self.graphql(LOCATION)["workspaceOrError"]["locationEntries"]
            except OSError:
                return False
            return all(e["loadStatus"] == "LOADED" for e in entries) and entries

        wait_for(loaded, 180, "the webserver to load the ftpipe code location", self)

    def stop_sensors(self, *names: str) -> None:
        """What the UI's sensor toggle does, for each sensor in `names`."""
        for name in names:
            sensor = self.graphql(SENSOR, selector={**REPOSITORY, "sensorName": name})["sensorOrError"]
            assert self.graphql(STOP_SENSOR, id=sensor["id"])["stopSensor"]["__typename"] == "StopSensorMutationResult"

    def family(self) -> list[psutil.Process]:
        """Both processes and everything they started."""
        members = []
        for process in self.processes:
            try:
                members += [psutil.Process(process.pid), *psutil.Process(process.pid).children(recursive=True)]
            except psutil.NoSuchProcess:
                pass
        return members

    def stop(self) -> None:
        """Stop the whole family by process id: SIGTERM, then SIGKILL for what is still there 20 s later."""
        family = self.family()
        for member in family:
            member.terminate()
        _, alive = psutil.wait_procs(family, timeout=20)
        self.kill(alive)

    def kill(self, family: list[psutil.Process] | None = None) -> None:
        """SIGKILL the whole family at once (a crash of the machine, as far as these processes can tell)."""
        family = self.family() if family is None else family
        for member in family:
            try:
                member.kill()
            except psutil.NoSuchProcess:
                pass
        psutil.wait_procs(family, timeout=10)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def wait_for(condition, timeout: float, what: str, stack: Stack, every: float = 0.5):
    """`condition()`'s first true value, polled every `every` seconds for up to `timeout`."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = condition()
        if value:
            return value
        time.sleep(every)
    raise AssertionError(f"timed out after {timeout:.0f}s waiting for {what}; log tail:\n{stack.logs.read_text()[-4000:]}")


def launch(stack: Stack, selector: dict, task: str, run_config: dict | None = None) -> str:
    """What the UI's Materialize and Launch buttons send for one partition; the new run's id."""
    params = {"mode": "default", "selector": {**REPOSITORY, **selector},
              "executionMetadata": {"tags": [{"key": "dagster/partition", "value": task}]},
              "runConfigData": run_config or {}}
    launched = stack.graphql(LAUNCH, params=params)["launchPipelineExecution"]
    assert launched["__typename"] == "LaunchRunSuccess", launched
    return launched["run"]["runId"]


def run_status(stack: Stack, run_id: str) -> str:
    return stack.graphql(RUN_STATUS, id=run_id)["runOrError"]["status"]


def wait_for_run(stack: Stack, run_id: str, timeout: float = 600) -> str:
    """The status `run_id` ends with."""
    def finished():
        status = run_status(stack, run_id)
        return status if status in FINISHED else None

    return wait_for(finished, timeout, f"run {run_id}", stack)
