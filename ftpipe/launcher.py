"""Runs whose process died: the local instance's run launcher, and the sweep `python -m ftpipe run` does itself.

Dagster's default launcher cannot tell that a run worker died (a machine crash, an OOM kill, `kill -9`), so such a
run stays STARTED and keeps its pool slots. `LocalRunLauncher` tells run monitoring whether the worker is alive (every
`run_monitoring.poll_interval_seconds` of dagster.yaml): a run whose worker is gone is marked failed, the daemon frees
its slots (`free_slots_after_run_end_seconds`), and the run retry policy launches it again. It is meant for runs that
execute on the machine that launched them (`dagster dev`, `make ui`): a run tagged with another host is never judged.
"""

from __future__ import annotations

import socket

import dagster as dg
from dagster._core.launcher import CheckRunHealthResult, DefaultRunLauncher, LaunchRunContext, WorkerStatus

from ftpipe.core.storage import process_alive
from ftpipe.core.tracking import HOST_TAG


def worker(instance: dg.DagsterInstance, run: dg.DagsterRun) -> tuple[int, float] | None:
    """(pid, Unix time it was logged) of the process executing `run`: the first engine event naming a pid ("Started
    process for run", or "Executing steps in process" under `python -m ftpipe run`); None before it started."""
    records = instance.get_records_for_run(run.run_id, of_type=dg.DagsterEventType.ENGINE_EVENT).records
    for record in records:
        data = record.event_log_entry.dagster_event.engine_event_data
        pid = data.metadata.get("pid") if data else None
        if pid is not None and str(pid.value).isdigit():
            return int(pid.value), record.event_log_entry.timestamp
    return None


def worker_alive(instance: dg.DagsterInstance, run: dg.DagsterRun) -> bool | None:
    """Whether `run`'s worker process is alive; None when this machine cannot tell (another host's run, or not
    started yet). A process started after the pid was logged is another one that reuses the pid."""
    found = worker(instance, run) if run.tags.get(HOST_TAG) == socket.gethostname() else None
    return None if found is None else process_alive(*found)


def release_dead_runs(instance: dg.DagsterInstance) -> list[str]:
    """End the in-progress runs whose worker is gone (canceling ones as canceled, the others as failed), and free the
    pool slots of every ended run whose worker is not running; one line per run it changed."""
    changed = []
    in_progress = [dg.DagsterRunStatus.STARTED, dg.DagsterRunStatus.CANCELING]
    for run in instance.get_runs(filters=dg.RunsFilter(statuses=in_progress)):
        if worker_alive(instance, run) is False:
            canceling = run.status == dg.DagsterRunStatus.CANCELING
            (instance.report_run_canceled if canceling else instance.report_run_failed)(run, "its run worker is gone")
            changed.append(f"run {run.run_id} ended: its run worker is gone")
    for run_id in instance.event_log_storage.get_concurrency_run_ids():
        run = instance.get_run_by_id(run_id)
        if run is None or (run.is_finished and not worker_alive(instance, run)):
            instance.event_log_storage.free_concurrency_slots_for_run(run_id)
            changed.append(f"run {run_id} ended: freed its pool slots")
    return changed


class LocalRunLauncher(DefaultRunLauncher):
    """Dagster's default launcher that also tells run monitoring whether a run's worker is alive, and terminates a run
    whose worker is gone by marking it canceled (its code server may be gone too)."""

    def launch_run(self, context: LaunchRunContext) -> None:
        self._instance.add_run_tags(context.dagster_run.run_id, {HOST_TAG: socket.gethostname()})
        super().launch_run(context)

    def terminate(self, run_id: str) -> bool:
        run = self._instance.get_run_by_id(run_id)
        if run is None or run.is_finished or worker_alive(self._instance, run) is not False:
            return super().terminate(run_id)
        self._instance.report_run_canceled(run, "canceled: its run worker is gone")
        return True

    @property
    def supports_check_run_worker_health(self) -> bool:
        return True

    def check_run_worker_health(self, run: dg.DagsterRun) -> CheckRunHealthResult:
        if worker_alive(self._instance, run) is False:
            return CheckRunHealthResult(WorkerStatus.FAILED, "the run worker process is gone")
        return CheckRunHealthResult(WorkerStatus.RUNNING)
