"""Data group: task_files -> raw_examples -> deduplicated_examples -> heldout_split, and review_sample.

The data assets refresh by themselves (declarative automation) whenever an upstream data version changes.
"""


import dagster as dg

from ftpipe.assets.common import TaskRunConfig, file_version, load_config, markdown_table
from ftpipe.core import dedup, records, split
from ftpipe.core.storage import artifact_dir, task_dir
from ftpipe.core.tasks import task_files_version
from ftpipe.partitions import task_partitions

GROUP = "data"
PREVIEW_ROWS = 20
REFRESH = dg.AutomationCondition.eager()


@dg.observable_source_asset(partitions_def=task_partitions, group_name=GROUP)
def task_files(context: dg.OpExecutionContext) -> dg.DataVersionsByPartition:
    """A task folder's `task.yaml` and `raw/` files; its data version is a hash of their contents."""
    tasks = context.instance.get_dynamic_partitions(task_partitions.name)
    return dg.DataVersionsByPartition({task: task_files_version(task) for task in tasks})


def _examples(task: str, asset: str, name: str = "examples.parquet"):
    return artifact_dir(task, asset) / name


@dg.asset(partitions_def=task_partitions, group_name=GROUP, kinds={"parquet"}, deps=[task_files], automation_condition=REFRESH)
def raw_examples(context: dg.AssetExecutionContext, config: TaskRunConfig) -> dg.MaterializeResult:
    """Every row of the task's raw/ files in the canonical chat schema; unusable rows quarantined with a reason."""
    task = context.partition_key
    data = load_config(context, config).data
    out = artifact_dir(task, "raw_examples")
    spec = records.FormatSpec(data.format, dict(data.columns), data.system_prompt)
    summary = records.build_raw_examples(task_dir(task), out, spec)
    context.log.info(f"{task}: {summary['rows_valid']} valid and {summary['rows_quarantined']} quarantined "
                     f"rows from {len(summary['files'])} file(s)")
    quarantine = summary.pop("quarantine")
    return dg.MaterializeResult(
        metadata={
            **{k: summary[k] for k in ("rows_read", "rows_valid", "rows_quarantined")},
            "quarantine_path": dg.MetadataValue.path(str(out / "quarantine.jsonl")),
            "examples_path": dg.MetadataValue.path(str(out / "examples.parquet")),
            "files": summary["files"],
            "ignored_files": summary["ignored_files"],
            "quarantine_reasons": dg.MetadataValue.json(summary["quarantine_reasons"]),
            "quarantine_preview": markdown_table(quarantine[:PREVIEW_ROWS], ["source", "reason", "raw"]),
        },
        data_version=file_version(out / "examples.parquet", out / "quarantine.jsonl"),
    )


@dg.asset(
    partitions_def=task_partitions, group_name=GROUP, kinds={"parquet"}, deps=[raw_examples], automation_condition=REFRESH,
)
def deduplicated_examples(context: dg.AssetExecutionContext, config: TaskRunConfig) -> dg.MaterializeResult:
    """Exact duplicates, near-duplicates (MinHash LSH) and contradicting labels removed; every removal kept with its reason."""
    task = context.partition_key
    cfg = load_config(context, config).dedup
    out = artifact_dir(task, "deduplicated_examples")
    summary = dedup.build_deduplicated(
        _examples(task, "raw_examples"), out,
        threshold=cfg.near_threshold, num_perm=cfg.num_perm, shingle_words=cfg.shingle_words,
    )
    removed = summary.pop("removed")
    context.log.info(f"{task}: kept {summary['rows_out']} of {summary['rows_in']} rows")
    return dg.MaterializeResult(
        metadata={
            **summary,
            "removed_path": dg.MetadataValue.path(str(out / "removed.jsonl")),
            "removed_preview": markdown_table(
                [{**r, "prompt": r["messages"][-2]["content"], "answer": r["messages"][-1]["content"]}
                 for r in removed[:PREVIEW_ROWS]],
                ["reason", "id", "duplicate_of", "detail", "prompt", "answer", "source"],
            ),
        },
        data_version=file_version(out / "examples.parquet"),
    )


@dg.asset(
    partitions_def=task_partitions, group_name=GROUP, kinds={"csv"}, deps=[deduplicated_examples], automation_condition=REFRESH,
)
def review_sample(context: dg.AssetExecutionContext) -> dg.MaterializeResult:
    """100 random deduplicated examples (fixed seed) for a manual read before training."""
    task = context.partition_key
    sample = records.review_sample(records.read_examples(_examples(task, "deduplicated_examples")))
    path = artifact_dir(task, "review_sample") / "review_sample.csv"
    records.write_csv(sample, path)
    return dg.MaterializeResult(
        metadata={
            "rows": len(sample),
            "csv_path": dg.MetadataValue.path(str(path)),
            "sample": markdown_table(sample, ["prompt", "answer", "source"]),
        },
        data_version=file_version(path),
    )


@dg.asset(
    partitions_def=task_partitions, group_name=GROUP, kinds={"parquet"}, deps=[deduplicated_examples], automation_condition=REFRESH,
)
def heldout_split(context: dg.AssetExecutionContext, config: TaskRunConfig) -> dg.MaterializeResult:
    """Train / eval rows by a stable hash of the prompt; near-duplicate prompts stay on one side."""
    task = context.partition_key
    cfg = load_config(context, config)
    out = artifact_dir(task, "heldout_split")
    summary = split.build_split(
        _examples(task, "deduplicated_examples"), out,
        eval_fraction=cfg.split.eval_fraction, seed=cfg.split.seed,
        threshold=cfg.dedup.near_threshold, num_perm=cfg.dedup.num_perm, shingle_words=cfg.dedup.shingle_words,
    )
    context.log.info(f"{task}: {summary['train_rows']} train / {summary['eval_rows']} eval rows")
    return dg.MaterializeResult(
        metadata={
            **summary,
            "eval_fraction": cfg.split.eval_fraction,
            "train_path": dg.MetadataValue.path(str(out / "train.parquet")),
            "eval_path": dg.MetadataValue.path(str(out / "eval.parquet")),
        },
        data_version=file_version(out / "train.parquet", out / "eval.parquet"),
    )
