"""Evaluation group: eval_report (base vs fine-tuned on held-out rows and the general-skills probe) and its gate."""

import json

import dagster as dg

from ftpipe.assets.common import TaskRunConfig, file_version, load_config
from ftpipe.assets.training import adapter_dir, base_model, base_model_info, lora_adapter, split_files
from ftpipe.core.storage import artifact_dir, data_dir, home_dir
from ftpipe.partitions import task_partitions
from ftpipe.resources import MlflowTracking

GROUP = "evaluation"
CONTRACT = ("primary_metric", "base_score", "finetuned_score", "delta", "delta_ci_low", "delta_ci_high", "forgetting", "passed")


def adapter_result(task: str) -> dict:
    return json.loads((adapter_dir(task) / "training_result.json").read_text())


def eval_metrics(task: str) -> dict:
    """metrics.json of the task's latest eval_report."""
    return json.loads((artifact_dir(task, "eval_report") / "metrics.json").read_text())


@dg.asset(
    partitions_def=task_partitions, group_name=GROUP, kinds={"pytorch", "mlflow"}, deps=[lora_adapter, base_model], pool="gpu",
    automation_condition=dg.AutomationCondition.eager().allow(dg.AssetSelection.assets(lora_adapter)),
)
def eval_report(context: dg.AssetExecutionContext, config: TaskRunConfig, mlflow: MlflowTracking) -> dg.MaterializeResult:
    """Base vs fine-tuned model on the held-out split (task metric with a bootstrap interval) and a forgetting check."""
    from ftpipe.core.evaluation import log_to_mlflow, run_evaluation

    task = context.partition_key
    cfg = load_config(context, config)
    base = base_model_info(task)
    _, eval_path = split_files(task)
    probe = data_dir() / "general" / "probe.jsonl"
    result = run_evaluation(
        base_model_dir=base["path"], base_fingerprint=base["fingerprint"],
        adapter_dir=adapter_dir(task),
        eval_path=eval_path, eval_version=file_version(eval_path).value,
        probe_path=probe if probe.exists() else None, config=cfg.evaluation,
        cache_dir=home_dir() / "cache" / "eval_base", out_dir=artifact_dir(task, "eval_report"),
        trust_remote_code=cfg.trust_remote_code, log=context.log.info,
    )
    run_id = adapter_result(task)["mlflow_run_id"]
    log_to_mlflow(run_id, result, result["predictions_path"], mlflow.uri())
    return dg.MaterializeResult(
        metadata={
            **{key: result[key] for key in CONTRACT},
            "base_cached": result["base_cached"],
            "failed_conditions": "; ".join(result["failed_conditions"]) or "none",
            "report": dg.MetadataValue.md(result["report_markdown"]),
            "report_path": dg.MetadataValue.path(result["report_path"]),
            "mlflow_run": mlflow.run_url(run_id),
        },
        data_version=file_version(artifact_dir(task, "eval_report") / "metrics.json"),
    )
