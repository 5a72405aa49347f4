"""Serving group: merged_model, built only when the eval gate passed, and registered in MLflow."""

import dagster as dg

from ftpipe.assets.common import TaskRunConfig, file_version, load_config
from ftpipe.assets.evaluation import adapter_result, eval_metrics, eval_report
from ftpipe.assets.training import adapter_version, base_model, base_model_info, lora_adapter, split_files
from ftpipe.core.storage import artifact_dir, point
from ftpipe.partitions import task_partitions
from ftpipe.resources import MlflowTracking

GROUP = "serving"


def _card(task: str, cfg, training: dict, metrics: dict, base: dict) -> dict:
    train, evaluation = split_files(task)
    return {
        "task": task,
        "base_model": cfg.base_model,
        "base_fingerprint": base["fingerprint"],
        "split_data_version": file_version(train, evaluation).value,
        "metrics": {key: metrics[key] for key in ("primary_metric", "base_score", "finetuned_score", "delta",
                                                   "delta_ci_low", "delta_ci_high", "forgetting")},
        "hyperparameters": {"method": training["method"], **cfg.training.model_dump()},
        "mlflow_run_id": training["mlflow_run_id"],
    }


@dg.asset(
    partitions_def=task_partitions, group_name=GROUP, kinds={"safetensors", "mlflow"},
    deps=[eval_report, lora_adapter, base_model],
    automation_condition=(
        dg.AutomationCondition.eager().allow(dg.AssetSelection.assets(eval_report))
        & dg.AutomationCondition.all_deps_blocking_checks_passed()
    ),
)
def merged_model(context: dg.AssetExecutionContext, config: TaskRunConfig, mlflow: MlflowTracking) -> dg.MaterializeResult:
    """The adapter merged into a full-precision base, parity-checked, with a model card and serving files; registered in MLflow.

    Each adapter gets its own folder, `merged_model/<base>-<adapter>/`, so a new merge never touches the champion's
    files; `merged_model/latest` links to the newest. An adapter merged before is reused, not merged again.
    """
    from ftpipe.core.merging import is_merged, merge_adapter, merge_facts, prune_merged, register_model

    task = context.partition_key
    cfg = load_config(context, config)
    base, training, metrics = base_model_info(task), adapter_result(task), eval_metrics(task)
    _, eval_path = split_files(task)
    folder = artifact_dir(task, "merged_model")
    out = folder / f"{base['fingerprint'][:8]}-{adapter_version(task)}"
    reused = is_merged(out)
    if reused:
        context.log.info(f"adapter already merged: reusing {out}")
    else:
        merge_adapter(
            base_model_dir=base["path"], adapter_dir=training["adapter_path"], out_dir=out, eval_path=eval_path,
            card=_card(task, cfg, training, metrics, base), trust_remote_code=cfg.trust_remote_code,
        )
    point(folder / "latest", out)
    card = (out / "README.md").read_text()
    registered = register_model(
        task=task, model_path=out, run_id=training["mlflow_run_id"], eval_score=metrics["finetuned_score"],
        eval_version=file_version(eval_path).value, tracking_uri=mlflow.uri(),
    )
    removed = prune_merged(folder, task, mlflow.uri())
    context.log.info(f"merged model {out} ({'reused' if reused else 'written'}); removed older merges: {removed or 'none'}")
    return dg.MaterializeResult(
        metadata={
            "model_path": dg.MetadataValue.path(str(out)),
            "parity_max_abs_diff": merge_facts(out)["parity_max_abs_diff"],
            "registered_model": registered["registered_model"],
            "registered_version": int(registered["registered_version"]),
            "champion": registered["champion"],
            "reused": reused,
            "model_card": dg.MetadataValue.md(card),
        },
        data_version=file_version(*sorted(out.glob("*.safetensors"))),
    )
