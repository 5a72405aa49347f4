"""Waiting for a slot of a concurrency pool (the `gpu` pool): four repairs to how a Dagster 1.13 run waits, made by
`install()` wherever runs execute (the code location's run workers and `python -m ftpipe run` both load
`ftpipe.definitions`, which calls it).

- **Back-off.** `InstanceConcurrencyContext.interval_to_next_pending_claim_check` returns `min(0, ...)`, never more
  than 0, so `ActiveExecution.sleep_til_ready` never sleeps and a step waiting for a slot asks the database in a busy
  loop, a whole core. It returns the time until the next claim check again (Dagster's back-off: 1 s, growing to 15 s).
- **Interruptible.** The in-process executor never looks at an interrupt while a step waits for a slot, so Terminate,
  Ctrl-C and SIGTERM did nothing until the slot came free. The wait ends on an interrupt now, and the run stops
  (CANCELED when it was terminated, else FAILURE); its pending claim is withdrawn as it exits.
- **Explained.** "Step blocked by limit for pool gpu" names who holds the pool: run, task, step and since when; and
  it is logged at INFO, so the console of `python -m ftpipe run` shows it.
- **Claimed once.** `SqlEventLogStorage._claim_concurrency_slot`, the slot rows' semaphore behind a claim, finds a
  free slot with SELECT ... FOR UPDATE, then sets its owner by id; on PostgreSQL each statement commits on its own,
  so the lock is gone before the update and two runs asking at the same moment both got the one slot (two trainings
  on one GPU). The update now takes the slot only while it is still free; the run that loses waits, as for any
  taken slot.
"""

from __future__ import annotations

import logging
import os
import time

import dagster as dg
from dagster._core.errors import DagsterExecutionInterruptedError
from dagster._core.events import DagsterEvent, DagsterEventType, EngineEventData
from dagster._core.execution.plan.active import ActiveExecution
from dagster._core.execution.plan.instance_concurrency_context import InstanceConcurrencyContext
from dagster._core.storage.event_log.schema import ConcurrencySlotsTable
from dagster._core.storage.event_log.sql_event_log import SqlEventLogStorage
from dagster._utils.concurrency import ConcurrencySlotStatus
from dagster._utils.interrupts import check_captured_interrupt, pop_captured_interrupt

WAKE_SECONDS = 0.5  # how soon a waiting run notices an interrupt


def interval_to_next_claim_check(self: InstanceConcurrencyContext) -> float:
    """Seconds until the earliest pending claim may be checked again; 0 when one is due."""
    if not self._pending_claims:
        return 0.0
    now = time.time()
    return max(0.0, min((ready_at - now for ready_at in self._pending_timeouts.values()), default=0.0))


def sleep_til_ready(self: ActiveExecution) -> None:
    """Sleep until a step may be ready, waking often enough to end the wait when the run is interrupted."""
    deadline = time.monotonic() + self.sleep_interval()
    while not check_captured_interrupt() and (left := deadline - time.monotonic()) > 0:
        time.sleep(min(WAKE_SECONDS, left))
    if pop_captured_interrupt():
        raise DagsterExecutionInterruptedError("interrupted while waiting for a pool slot")


def holders(instance: dg.DagsterInstance, pool: str) -> str:
    """Who holds `pool`'s slots, e.g.
    `held by run 1a2b3c4d (task colors, step lora_adapter) since 2026-01-02 03:04:05 UTC`."""
    info = instance.event_log_storage.get_concurrency_info(pool)
    since = {(step.run_id, step.step_key): step.assigned_timestamp for step in info.pending_steps}
    held = []
    for slot in info.claimed_slots:
        run = instance.get_run_by_id(slot.run_id)
        task = run.tags.get("dagster/partition", "none") if run else "unknown"
        assigned = since.get((slot.run_id, slot.step_key))
        when = f" since {assigned:%Y-%m-%d %H:%M:%S} UTC" if assigned else ""
        held.append(f"run {slot.run_id[:8]} (task {task}, step {slot.step_key}){when}")
    return "held by " + "; ".join(held) if held else f"no slot is held (the pool's limit is {info.limit})"


def unlimited_warning(instance: dg.DagsterInstance, pool: str) -> str | None:
    """A warning when `instance` sets no limit on `pool` (a DAGSTER_HOME without the project's dagster.yaml), so
    heavy steps could run at once on one GPU; None when it has one."""
    if instance.event_log_storage.get_concurrency_info(pool).limit is not None:
        return None
    return (f"the Dagster instance (DAGSTER_HOME={os.environ.get('DAGSTER_HOME', 'unset')}) sets no limit on the "
            f"{pool!r} pool, so trainings of several tasks may run at once on one GPU or CPU: use the project's "
            "dagster.yaml there (its pool limit, run monitoring and run launcher)")


def step_concurrency_blocked(step_context, concurrency_key: str, initial: bool = True) -> DagsterEvent:
    """Dagster's "Step blocked by limit for pool" event, saying who holds the pool, and logged at INFO (not DEBUG) so
    that `python -m ftpipe run` shows it too."""
    still = "" if initial else "still "
    event = DagsterEvent(
        event_type_value=DagsterEventType.ENGINE_EVENT.value,
        job_name=step_context.job_name,
        step_handle=step_context.step.handle,
        node_handle=step_context.step.node_handle,
        step_kind_value=step_context.step.kind.value,
        logging_tags=step_context.event_tags,
        event_specific_data=EngineEventData(metadata={"pool": dg.MetadataValue.pool(concurrency_key)}),
        message=f"Step {still}blocked by limit for pool {concurrency_key}: "
                f"{holders(step_context.instance, concurrency_key)}",
        pid=os.getpid(),
    )
    step_context.log.log_dagster_event(level=logging.INFO, msg=event.message, dagster_event=event)
    return event


def claim_free_slot(storage, concurrency_key: str, run_id: str, step_key: str) -> ConcurrencySlotStatus:
    """Claim a free slot of `concurrency_key` for the step: CLAIMED, or BLOCKED when none is free (or another run
    took the one found first)."""
    import sqlalchemy as db

    slots = ConcurrencySlotsTable.c
    free = db.and_(slots.concurrency_key == concurrency_key, slots.step_key.is_(None),
                   slots.deleted == False)  # noqa: E712 - as Dagster writes it, for SQLite's 0/1
    with storage.index_connection() as conn:
        found = conn.execute(db.select(slots.id).where(free).with_for_update(skip_locked=True).limit(1)).fetchone()
        if not found:
            return ConcurrencySlotStatus.BLOCKED
        taken = conn.execute(ConcurrencySlotsTable.update().values(run_id=run_id, step_key=step_key)
                             .where(db.and_(slots.id == found[0], slots.step_key.is_(None)))).rowcount
    return ConcurrencySlotStatus.CLAIMED if taken else ConcurrencySlotStatus.BLOCKED


def install() -> None:
    """Apply the four repairs (idempotent)."""
    InstanceConcurrencyContext.interval_to_next_pending_claim_check = interval_to_next_claim_check
    ActiveExecution.sleep_til_ready = sleep_til_ready
    DagsterEvent.step_concurrency_blocked = staticmethod(step_concurrency_blocked)
    SqlEventLogStorage._claim_concurrency_slot = claim_free_slot
