"""Dagster's own per-run cost on the data assets: the in-process executor against the multiprocess executor,
side by side on the same task and instance.

    python bench/executors.py [--task ticket_triage] [--repeats 3]

Each repeat materializes the data assets (raw_examples, deduplicated_examples, review_sample,
heldout_split and its leakage check) once with each executor. It prints the median wall time of each,
the time spent inside the steps themselves, and the ratio.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time

import dagster as dg

from ftpipe.assets import data
from ftpipe.checks import heldout_split_no_leakage
from ftpipe.partitions import task_partitions

ASSETS = [data.task_files, data.raw_examples, data.deduplicated_examples, data.review_sample, data.heldout_split]


def data_job(executor: dg.ExecutorDefinition) -> dg.JobDefinition:
    defs = dg.Definitions(
        assets=ASSETS, asset_checks=[heldout_split_no_leakage],
        jobs=[dg.define_asset_job("data", selection=dg.AssetSelection.groups("data"), executor_def=executor)],
    )
    return defs.resolve_job_def("data")


def in_process_job() -> dg.JobDefinition:
    return data_job(dg.in_process_executor)


def multiprocess_job() -> dg.JobDefinition:
    return data_job(dg.multiprocess_executor)


def timed_run(job_fn, instance: dg.DagsterInstance, task: str) -> tuple[float, float]:
    """(wall seconds, seconds inside the steps) of one run."""
    start = time.perf_counter()
    with dg.execute_job(dg.reconstructable(job_fn), instance=instance, tags={"dagster/partition": task}) as result:
        assert result.success
        run_id = result.run_id
    wall = time.perf_counter() - start
    steps = sum(s.end_time - s.start_time for s in instance.get_run_step_stats(run_id))
    return wall, steps


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--task", default="ticket_triage")
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    results = {"in-process": [], "multiprocess": []}
    with tempfile.TemporaryDirectory() as home, dg.DagsterInstance.local_temp(home) as instance:
        instance.add_dynamic_partitions(task_partitions.name, [args.task])
        for _ in range(args.repeats):
            results["in-process"].append(timed_run(in_process_job, instance, args.task))
            results["multiprocess"].append(timed_run(multiprocess_job, instance, args.task))
    medians = {name: (statistics.median(w for w, _ in runs), statistics.median(s for _, s in runs))
               for name, runs in results.items()}
    for name, (wall, steps) in medians.items():
        print(f"{name:13s} {wall:6.2f} s per run, {steps:5.2f} s inside the steps, {wall - steps:5.2f} s of Dagster overhead")
    print(f"multiprocess / in-process wall time: {medians['multiprocess'][0] / medians['in-process'][0]:.2f}x "
          f"(median of {args.repeats})")


if __name__ == "__main__":
    main()
