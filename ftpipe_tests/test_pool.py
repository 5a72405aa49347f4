"""How a run waits for a pool slot (ftpipe/pool.py): with a back-off, and saying who holds the pool. Waiting for real,
its CPU cost and stopping the wait: e2e/test_operator.py."""

import importlib.util
import re

import dagster as dg
from dagster._core.execution.plan import instance_concurrency_context
from dagster._core.execution.plan.instance_concurrency_context import InstanceConcurrencyContext

from ftpipe.pool import holders, install, interval_to_next_claim_check, unlimited_warning
from ftpipe_tests.builders import pool_holding_job


def dagster_interval():
    """Dagster's own `interval_to_next_pending_claim_check`, from a fresh copy of its module (importing
    ftpipe.definitions replaces it on the class)."""
    spec = importlib.util.spec_from_file_location("dagster_copy", instance_concurrency_context.__file__)
    copy = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(copy)
    return copy.InstanceConcurrencyContext.interval_to_next_pending_claim_check


def test_a_blocked_claim_waits_for_its_back_off_where_dagster_would_poll_at_once() -> None:
    with dg.instance_for_test() as instance:
        instance.event_log_storage.set_concurrency_slots("gpu", 1)
        holder = instance.create_run_for_job(pool_holding_job, tags={"dagster/partition": "colors"})
        instance.event_log_storage.claim_concurrency_slot("gpu", holder.run_id, "lora_adapter")
        waiting = InstanceConcurrencyContext(instance, instance.create_run_for_job(pool_holding_job))
        assert not waiting.claim("gpu", "lora_adapter")

        assert dagster_interval()(waiting) <= 0, "Dagster fixed it: remove the back-off repair from ftpipe/pool.py"
        assert 0 < interval_to_next_claim_check(waiting) <= 15
        install()
        assert InstanceConcurrencyContext.interval_to_next_pending_claim_check is interval_to_next_claim_check


def test_the_holder_of_a_pool_is_named_with_its_task_step_and_since_when() -> None:
    with dg.instance_for_test() as instance:
        instance.event_log_storage.set_concurrency_slots("gpu", 1)
        assert holders(instance, "gpu") == "no slot is held (the pool's limit is 1)"
        holder = instance.create_run_for_job(pool_holding_job, tags={"dagster/partition": "colors"})
        instance.event_log_storage.claim_concurrency_slot("gpu", holder.run_id, "lora_adapter")
        assert re.fullmatch(rf"held by run {holder.run_id[:8]} \(task colors, step lora_adapter\) "
                            r"since \d{4}-\d\d-\d\d \d\d:\d\d:\d\d UTC", holders(instance, "gpu"))


def test_an_instance_without_a_pool_limit_is_warned_about_and_one_with_the_projects_is_not() -> None:
    with dg.instance_for_test() as bare:
        assert ("sets no limit on the 'gpu' pool, so trainings of several tasks may run at once on one GPU or CPU: "
                "use the project's dagster.yaml there") in unlimited_warning(bare, "gpu")
    with dg.instance_for_test(overrides={"concurrency": {"pools": {"default_limit": 1}}}) as configured:
        assert unlimited_warning(configured, "gpu") is None


def test_a_slot_another_run_took_after_it_was_found_free_is_not_claimed_again() -> None:
    from contextlib import contextmanager
    from types import SimpleNamespace

    import sqlalchemy
    from dagster._core.storage.event_log.schema import ConcurrencySlotsTable
    from dagster._utils.concurrency import ConcurrencySlotStatus

    from ftpipe.pool import claim_free_slot

    with dg.instance_for_test() as instance:
        storage = instance.event_log_storage
        storage.set_concurrency_slots("gpu", 1)
        holder = instance.create_run_for_job(pool_holding_job)
        assert claim_free_slot(storage, "gpu", holder.run_id, "lora_adapter") == ConcurrencySlotStatus.CLAIMED
        with storage.index_connection() as conn:
            [(slot,)] = conn.execute(sqlalchemy.select(ConcurrencySlotsTable.c.id)).fetchall()

        @contextmanager
        def found_before_it_was_taken():
            """PostgreSQL's autocommit: the SELECT saw the slot free, and the holder's UPDATE committed first."""
            with storage.index_connection() as conn:
                yield SimpleNamespace(execute=lambda statement: SimpleNamespace(fetchone=lambda: (slot,))
                                      if statement.is_select else conn.execute(statement))

        waiting = instance.create_run_for_job(pool_holding_job)
        racing = SimpleNamespace(index_connection=found_before_it_was_taken)
        assert claim_free_slot(racing, "gpu", waiting.run_id, "lora_adapter") == ConcurrencySlotStatus.BLOCKED
        [claimed] = storage.get_concurrency_info("gpu").claimed_slots
        assert claimed.run_id == holder.run_id, "the slot stays the holder's"
