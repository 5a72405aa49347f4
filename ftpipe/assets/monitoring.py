"""Monitoring group: the serving request log as an observable source, and the production report on it (its checks
`production_health` and `production_drift` sit in `ftpipe.checks`)."""

import dagster as dg

from ftpipe.assets.common import TaskRunConfig, file_version, load_config, rounded_floats, table
from ftpipe.core import monitoring
from ftpipe.core.layout import TaskLayout
from ftpipe.partitions import task_partitions

GROUP = "monitoring"
CONTRACT = ("requests", "error_rate", "latency_p95_ms", "validity", "novel_input_share", "drift_score")
SHARES = ("training_share", "production_share")
DETAILS = ("refused_rate", "latency_p50_ms", "latency_p99_ms", "outputs_judged", "heldout_novel_share", "length_shift",
           "vocabulary_shift", "foreign_system_prompt_share", "window_hours", "ftpipe_requests_left_out", "corrections",
           "confirmations")


@dg.observable_source_asset(partitions_def=task_partitions, group_name=GROUP)
def production_requests(context: dg.OpExecutionContext) -> dg.DataVersionsByPartition:
    """The request log `python -m ftpipe serve` writes for each task; its version changes with every new segment."""
    tasks = context.instance.get_dynamic_partitions(task_partitions.name)
    return dg.DataVersionsByPartition({task: monitoring.requests_version(task) for task in tasks})


@dg.asset(
    partitions_def=task_partitions, group_name=GROUP, kinds={"pandas"}, deps=["production_requests", "heldout_split"],
    automation_condition=dg.AutomationCondition.eager(),
)
def production_report(context: dg.AssetExecutionContext, config: TaskRunConfig) -> dg.MaterializeResult:
    """Volume, errors, latency, output validity, predicted labels and input drift against the training split, over
    the last `monitoring.window_hours` of the task's served requests; corrections dropped in the task's `feedback/`
    folder become raw rows."""
    task = context.partition_key
    paths = TaskLayout(task)
    out = paths.asset("production_report")
    train, heldout = paths.split_files
    report = monitoring.production_report(task, train, load_config(context, config), out, heldout_path=heldout)
    for line in report["feedback_refused"]:
        context.log.warning(f"{task}: correction refused: {line}")
    drift = "n/a (no prompt logged with its content)" if report["drift_score"] is None else f"{report['drift_score']:.2f}"
    context.log.info(f"{task}: {report['requests']} requests in the last {report['window_hours']:g} h, "
                     f"error rate {report['error_rate']:.1%}, refused {report['refused_rate']:.1%}, drift score {drift}")
    return dg.MaterializeResult(
        metadata={
            **rounded_floats({key: report[key] for key in CONTRACT + DETAILS}),
            "labels": table([{"label": row["label"], **{key: f"{row[key]:.1%}" for key in SHARES}} for row in report["labels"]],
                            ["label", *SHARES]),
            "report": dg.MetadataValue.md(report["report_markdown"]),
            "over_time": dg.MetadataValue.md(report["over_time"]),
            "report_path": dg.MetadataValue.path(report["report_path"]),
            "feedback_rows": report["feedback_rows"],
            "feedback_refused": len(report["feedback_refused"]),
        },
        data_version=file_version(out / monitoring.FIGURES),
    )
