"""Asset checks, beside the assets they check."""


import dagster as dg

from ftpipe.assets.data import heldout_split
from ftpipe.assets.evaluation import eval_metrics, eval_report
from ftpipe.core import records, split
from ftpipe.core.storage import artifact_dir
from ftpipe.core.tasks import task_config
from ftpipe.partitions import task_partitions


@dg.asset_check(asset=heldout_split, blocking=True, partitions_def=task_partitions)
def heldout_split_no_leakage(context: dg.AssetCheckExecutionContext) -> dg.AssetCheckResult:
    """No eval prompt is an exact or near duplicate of a train prompt."""
    folder = artifact_dir(context.partition_key, "heldout_split")
    near = task_config(context.partition_key).dedup
    leaks = split.find_leaks(
        records.read_examples(folder / "train.parquet"), records.read_examples(folder / "eval.parquet"),
        threshold=near.near_threshold, num_perm=near.num_perm, shingle_words=near.shingle_words,
    )
    return dg.AssetCheckResult(
        passed=not leaks,
        metadata={"leaked_eval_rows": len(leaks), "examples": dg.MetadataValue.json(leaks[:20])},
        description=f"{len(leaks)} eval prompt(s) duplicate a train prompt" if leaks else "no leakage",
    )


@dg.asset_check(asset=eval_report, blocking=True, partitions_def=task_partitions)
def eval_report_gate(context: dg.AssetCheckExecutionContext) -> dg.AssetCheckResult:
    """Passes only when the gain's 95% interval clears `min_improvement` and forgetting stays within `max_forgetting`."""
    metrics = eval_metrics(context.partition_key)
    evaluation = task_config(context.partition_key).evaluation
    failed = metrics["failed_conditions"]
    return dg.AssetCheckResult(
        passed=bool(metrics["passed"]),
        description="; ".join(failed) if failed else "fine-tuning helped on held-out data without costing general skills",
        metadata={
            "delta_ci_low": metrics["delta_ci_low"], "min_improvement": evaluation.min_improvement,
            "forgetting": metrics["forgetting"], "max_forgetting": evaluation.max_forgetting,
            "failed_conditions": "; ".join(failed) or "none",
        },
    )
