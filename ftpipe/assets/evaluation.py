"""Evaluation group: eval_report (base vs fine-tuned on held-out rows and the general-skills probe) and its gate."""

import hashlib
import json

import dagster as dg

from ftpipe.assets.common import GPU_POOL, TaskRunConfig, file_version, load_config
from ftpipe.assets.training import adapter_dir, adapter_version, base_model, base_model_info, lora_adapter, split_files
from ftpipe.core.storage import artifact_dir, data_dir, home_dir, write_text
from ftpipe.partitions import task_partitions
from ftpipe.resources import MlflowTracking

GROUP = "evaluation"
KEY_FILE = "evaluation_key"
CONTRACT = ("primary_metric", "base_score", "finetuned_score", "delta", "delta_ci_low", "delta_ci_high", "forgetting", "passed")


def adapter_result(task: str) -> dict:
    return json.loads((adapter_dir(task) / "training_result.json").read_text())


def eval_metrics(task: str) -> dict:
    """metrics.json of the task's latest eval_report."""
    return json.loads((artifact_dir(task, "eval_report") / "metrics.json").read_text())


def evaluation_key(task: str, base_fingerprint: str, eval_version: str, probe, cfg) -> str:
    """What decides an evaluation's result: base model, adapter weights, eval split, probe and settings."""
    parts = {
        "base": base_fingerprint,
        "adapter": adapter_version(task),
        "eval": eval_version,
        "probe": file_version(probe).value if probe else None,
        "config": cfg.evaluation.model_dump(),
    }
    return hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()[:16]


def _metadata(result: dict, run_url: str) -> dict:
    return {
        **{key: result[key] for key in CONTRACT},
        "base_cached": result["base_cached"],
        "failed_conditions": "; ".join(result["failed_conditions"]) or "none",
        "report": dg.MetadataValue.md(result["report_markdown"]),
        "report_path": dg.MetadataValue.path(result["report_path"]),
        "mlflow_run": run_url,
    }


def _reuse(task: str, key: str, run_url: str, context: dg.AssetExecutionContext) -> dg.MaterializeResult | None:
    """The previous report when it was computed from exactly these inputs (no generation at all)."""
    folder = artifact_dir(task, "eval_report")
    marker = folder / KEY_FILE
    if not marker.exists() or marker.read_text().strip() != key:
        return None
    context.log.info(f"evaluation inputs {key} unchanged: reusing the report in {folder}")
    result = {**eval_metrics(task), "report_markdown": (folder / "report.md").read_text()}
    return dg.MaterializeResult(metadata={**_metadata(result, run_url), "reused": True},
                                data_version=file_version(folder / "metrics.json"))


@dg.asset(
    partitions_def=task_partitions, group_name=GROUP, kinds={"pytorch", "mlflow"}, deps=[lora_adapter, base_model], pool=GPU_POOL,
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
    probe = probe if probe.exists() else None
    eval_version = file_version(eval_path).value
    run_id = adapter_result(task)["mlflow_run_id"]
    key = evaluation_key(task, base["fingerprint"], eval_version, probe, cfg)
    reused = _reuse(task, key, mlflow.run_url(run_id), context)
    if reused:
        return reused
    out = artifact_dir(task, "eval_report")
    result = run_evaluation(
        base_model_dir=base["path"], base_fingerprint=base["fingerprint"],
        adapter_dir=adapter_dir(task),
        eval_path=eval_path, eval_version=eval_version,
        probe_path=probe, config=cfg.evaluation,
        cache_dir=home_dir() / "cache" / "eval_base", out_dir=out,
        trust_remote_code=cfg.trust_remote_code, log=context.log.info,
    )
    write_text(out / KEY_FILE, key)
    log_to_mlflow(run_id, result, result["predictions_path"], mlflow.uri())
    return dg.MaterializeResult(
        metadata={**_metadata(result, mlflow.run_url(run_id)), "reused": False},
        data_version=file_version(out / "metrics.json"),
    )
