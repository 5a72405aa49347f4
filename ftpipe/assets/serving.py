"""Serving group: merged_model, built only when the eval gate passed, and registered in MLflow."""

from pathlib import Path

import dagster as dg

from ftpipe.assets.common import GPU_POOL, TaskRunConfig, effective_config, load_config, run_overrides, upstream
from ftpipe.config import TOO_LONG_DONE, TaskConfig
from ftpipe.core.evaluation.card import card_evaluation
from ftpipe.core.evaluation.chart import CHART, inline_chart
from ftpipe.core.layout import TaskLayout
from ftpipe.core.readable import rounded
from ftpipe.core.results import Result
from ftpipe.core.tasks import final_training, system_prompt_source, task_system_prompt
from ftpipe.core.training.methods import PREFERENCE_OBJECTIVES
from ftpipe.partitions import task_partitions
from ftpipe.resources import MlflowTracking

GROUP = "serving"


def _card(task: str, cfg: TaskConfig, gate_overrides: str, base: Result, adapter: Result, evaluation: Result,
          report: dict) -> dict:
    """The model card's facts: the task, what it was evaluated on and how well (the gate decided with task.yaml and
    `gate_overrides`), and the base model, method and settings the adapter was trained with (`trained_settings`)."""
    sft = upstream(task, "lora_adapter")
    return {
        "task": task,
        "description": cfg.description,
        "system_prompt": task_system_prompt(task, cfg),
        "base_model": base.inputs["base_model"],
        "method": adapter.produced["method"],
        "data_versions": {"split": adapter.inputs["split_version"], "base_model": base.reuse_key,
                          "eval": evaluation.inputs["eval_version"]},
        "data": _data_counts(task, sft),
        "evaluation": card_evaluation(report, effective_config(task, gate_overrides).evaluation, gate_overrides),
        "evaluation_chart": str(Path(report["report_path"]).parent / CHART),
        "hyperparameters": trained_settings(sft, adapter),
        "mlflow_run_id": adapter.metadata["mlflow_run_id"],
        **({"sft_mlflow_run_id": sft.metadata["mlflow_run_id"]} if sft.reuse_key != adapter.reuse_key else {}),
    }


def trained_settings(sft: Result, adapter: Result) -> dict:
    """The settings the published weights were trained with: the SFT training's (a preference stage trains with its
    own rate and steps in their place), with the stages and preference settings of the stage that trained last. A
    reused SFT training recorded those as they were at its own time."""
    training, final = sft.produced["training"], adapter.produced["training"]
    if final["objective"] in PREFERENCE_OBJECTIVES:
        return {**training, "stages": final["stages"], "preference": final["preference"]}
    return {**training, "stages": [training["objective"]]}


TURN_ROWS = "train rows' assistant turns (every_turn: each a training row)"


def _data_counts(task: str, sft: Result) -> dict[str, int]:
    """The rows behind the model, from the raw files to the (`sft`) training: read, quarantined, removed by cleaning,
    held out, trained on (with the replayed general rows), left out or cut for their length, and shortened by their
    earliest turns."""
    raw, cleaned, split = (upstream(task, asset)
                           for asset in ("raw_examples", "deduplicated_examples", "heldout_split"))
    return {
        "rows read": raw.metadata["rows_read"],
        "rows quarantined": raw.metadata["rows_quarantined"],
        **{f"{kind.replace('_', ' ')} removed": cleaned.metadata[kind]
           for kind in ("exact_duplicates", "near_duplicates", "contradictions")},
        "held-out rows": split.metadata["eval_rows"],
        "train rows": split.metadata["train_rows"],
        "replayed general rows": sft.metadata.get("replay_rows", 0),
        **length_counts(sft.produced["training"], sft.metadata),
        **_preference_counts(raw, cleaned, split),
    }


def _preference_counts(raw: Result, cleaned: Result, split: Result) -> dict[str, int]:
    """Where the task has preference rows (counted in the rows read, quarantined and removed above): how many, after
    cleaning, and the pairs of each side of the split."""
    if not raw.metadata.get("preference_rows"):
        return {}
    return {"preference rows among the rows read": raw.metadata["preference_rows"],
            "preference rows after cleaning": cleaned.metadata["preference_rows_out"],
            "held-out preference pairs": split.metadata["eval_pairs"],
            "train preference pairs": split.metadata["train_pairs"]}


def length_counts(training: dict, metadata: dict) -> dict[str, int]:
    """The rows a training (its `training` settings and `metadata`) left out or cut for their length, and those it
    shortened by their earliest turns (too_long: trim_turns)."""
    rows = TURN_ROWS if training.get("every_turn") else "train"
    over = (f"{rows} and eval rows over max_length {training['max_length']}, {TOO_LONG_DONE[training['too_long']]} by "
            "the training (the evaluation scores every held-out row)")
    trimmed = {"multi-turn rows trained without their earliest turns": metadata["rows_trimmed"]} if (
        "rows_trimmed" in metadata) else {}
    return {over: metadata.get("rows_too_long", 0), **trimmed}


@dg.asset(
    partitions_def=task_partitions, group_name=GROUP, kinds={"safetensors", "mlflow"},
    deps=["eval_report", "human_review", "lora_adapter", "preference_adapter", "base_model"], pool=GPU_POOL,
    automation_condition=(
        dg.AutomationCondition.eager().allow(dg.AssetSelection.assets("eval_report", "human_review"))
        & dg.AutomationCondition.all_deps_blocking_checks_passed()
    ),
)
def merged_model(context: dg.AssetExecutionContext, config: TaskRunConfig, mlflow: MlflowTracking) -> dg.MaterializeResult:
    """The fine-tuned model ready to serve: an adapter merged into a full-precision base and parity-checked, or a full
    fine-tune as trained; with a model card and serving files, registered in MLflow.

    Each fine-tuned model gets its own folder, `merged_model/<base>-<adapter>/`, so a new one never touches the
    champion's files; `merged_model/latest` links to the newest. A model packaged before is reused, not packaged again.
    """
    from ftpipe.core.evaluation import finetuned_row_scores, read_evaluation
    from ftpipe.core.merging import PARITY_ROWS, card_body, package_model, packaged

    task = context.partition_key
    cfg = load_config(context, config)
    paths = TaskLayout(task)
    final = final_training(cfg.training)
    base, adapter, evaluation = (upstream(task, asset) for asset in ("base_model", final, "eval_report"))
    report = read_evaluation(paths.output("eval_report"), cfg.evaluation)
    out = paths.merged(base.reuse_key, adapter.produced["data_version"])
    key = f"{base.reuse_key}-{adapter.produced['data_version']}"
    facts = packaged(out, key)
    reused = facts is not None
    if not reused:
        context.log.info(f"{task}: {system_prompt_source(task, cfg)}")
        prompts = min(PARITY_ROWS, upstream(task, "heldout_split").metadata["eval_rows"])
        context.log.info(f"{task}: packaging {out.name}: merging an adapter into the base and checking parity on the "
                         f"{prompts} shortest held-out prompts (a full fine-tune is copied as it is)")
        gate_overrides = run_overrides(context, "eval_report") or config.overrides  # those the gate was decided with
        card = _card(task, cfg, gate_overrides, base, adapter, evaluation, report)
        facts = package_model(
            base_model_dir=base.produced["path"], finetuned_dir=paths.output(final), out_dir=out,
            eval_path=paths.split_files[1], card=card, reuse_key=key, trust_remote_code=cfg.trust_remote_code,
        )
    paths.mark_latest_merged(out)
    registered = mlflow.register_model(
        task=task, model_path=out, run_id=adapter.metadata["mlflow_run_id"], eval_score=report["finetuned_score"],
        eval_version=evaluation.inputs["eval_version"], scores=finetuned_row_scores(report))
    removed = paths.prune_merged(keep=mlflow.registered_folders(task))
    mlflow.mark_removed_versions(task)
    context.log.info(f"model {out} ({'reused' if reused else 'written'}); removed older models: {removed or 'none'}")
    return dg.MaterializeResult(
        metadata={
            "model_path": dg.MetadataValue.path(str(out)),
            "parity_max_abs_diff": rounded(facts["parity_max_abs_diff"]),
            "registered_model": registered["registered_model"],
            "registered_version": registered["registered_version"],
            "champion": registered["champion"],
            "champion_comparison": registered["compared"],
            "reused": reused,
            "model_card": dg.MetadataValue.md(inline_chart(card_body(out), out)),
        },
        data_version=dg.DataVersion(out.name),
    )
