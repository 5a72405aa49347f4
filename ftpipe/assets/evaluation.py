"""Evaluation group: eval_report (base vs fine-tuned on held-out rows and the general-skills probe); its gate is the
blocking check `eval_report_gate`."""

from functools import partial
from pathlib import Path

import dagster as dg

from ftpipe.assets.common import GPU_POOL, TaskRunConfig, file_version, load_config, rounded_floats, upstream
from ftpipe.core.layout import METRICS, PREDICTIONS, TaskLayout
from ftpipe.core.tasks import final_training, general_probe, reviews_dir, reviews_version
from ftpipe.partitions import task_partitions
from ftpipe.resources import MlflowTracking

GROUP = "evaluation"
CONTRACT = ("primary_metric", "base_score", "finetuned_score", "delta", "delta_ci_low", "delta_ci_high", "forgetting",
            "passed", "fewshot_score", "delta_vs_fewshot", "delta_vs_fewshot_ci_low", "delta_vs_fewshot_ci_high",
            "fewshot_prompt_tokens", "forgetting_ci_low", "forgetting_ci_high", "preference_accuracy_base",
            "preference_accuracy_sft", "preference_accuracy_final", "preference_delta_ci_low",
            "preference_delta_ci_high", "preference_pairs", "preference_baseline", "preference_margin_widened",
            "preference_margin_narrowed", "preference_margin_gain", "preference_margin_gain_ci_low",
            "preference_margin_gain_ci_high", "preference_margin_change_median", "sft_score", "delta_vs_sft",
            "sft_forgetting", "teacher_score", "student_to_teacher_ratio", "student_to_teacher_ratio_ci_low",
            "student_to_teacher_ratio_ci_high", "student_latency_ms", "teacher_latency_ms", "copy_score",
            "delta_vs_copy", "delta_vs_copy_ci_low", "delta_vs_copy_ci_high", "majority_score", "delta_vs_majority",
            "delta_vs_majority_ci_low", "delta_vs_majority_ci_high")


def _metadata(report: dict, run_url: str, warm_started: bool) -> dict:
    from ftpipe.core.evaluation.chart import inline_chart
    from ftpipe.core.evaluation.forgetting import most_forgotten

    return rounded_floats({
        **{key: report[key] for key in CONTRACT if key in report},
        "base_cached": report["base_cached"],
        "warm_started": warm_started,  # the SFT adapter continued the previous one (retrain.warm_start)
        "failed_conditions": "; ".join(report["failed_conditions"]) or "none",
        "most_forgotten_skill": most_forgotten(report["probe_accuracy_by_skill"]),  # a skill the whole probe hides
        "gate_caveat": report["gate_caveat"] or "none",  # what a passed gate does not say
        "report": dg.MetadataValue.md(inline_chart(report["report_markdown"], Path(report["report_path"]).parent)),
        "report_path": dg.MetadataValue.path(report["report_path"]),
        "mlflow_run": dg.MetadataValue.url(run_url),
        "reused": report["reused"],
    })


@dg.asset(
    partitions_def=task_partitions, group_name=GROUP, kinds={"pytorch", "mlflow"},
    deps=["lora_adapter", "preference_adapter", "base_model", "heldout_split"], pool=GPU_POOL,  # reads both adapters
    automation_condition=dg.AutomationCondition.eager().allow(dg.AssetSelection.assets("preference_adapter")),
)
def eval_report(context: dg.AssetExecutionContext, config: TaskRunConfig, mlflow: MlflowTracking) -> dg.MaterializeResult:
    """Base (zero- and few-shot) vs fine-tuned model on the held-out split (task metric with a bootstrap interval)
    and a forgetting check, and with a preference stage the SFT model beside them and preference accuracy on the
    held-out pairs; an evaluation of the same inputs is reused without generating anything."""
    from ftpipe.core.dedup import likely_typos
    from ftpipe.core.evaluation import run_evaluation
    from ftpipe.core.evaluation.answer_budget import cut_off_warning
    from ftpipe.core.evaluation.gate import GATE_FIELDS
    from ftpipe.core.evaluation.report import unheld_labels_of
    from ftpipe.core.teacher import served_version, teacher_outputs, teacher_version

    task = context.partition_key
    cfg = load_config(context, config)
    paths = TaskLayout(task)
    final = final_training(cfg.training)
    base, adapter = upstream(task, "base_model"), upstream(task, final)
    sft = upstream(task, "lora_adapter") if final != "lora_adapter" else None
    train, evaluation = paths.split_files
    distill = cfg.distill  # with a teacher, it answers the held-out rows too
    version = served_version(distill) if distill else None  # asked once: the reuse key and the answers agree
    teacher = partial(teacher_outputs, task, distill, version=version, log=context.log.info) if distill else None
    typos = likely_typos(paths.asset("deduplicated_examples"))
    report = run_evaluation(
        base_model_dir=base.produced["path"], base_fingerprint=base.reuse_key,
        adapter_dir=paths.output(final), adapter_version=adapter.produced["data_version"],
        sft_adapter_dir=sft and paths.output("lora_adapter"), sft_adapter_version=sft and sft.produced["data_version"],
        preference_eval_path=sft and paths.preference_split_files[1],
        eval_path=evaluation, eval_version=file_version(evaluation).value, train_path=train,
        probe_path=general_probe(), config=cfg.evaluation, cache_dir=paths.eval_base_cache,
        out_dir=paths.output("eval_report"), trust_remote_code=cfg.trust_remote_code, log=context.log.info,
        teacher=teacher, teacher_version=teacher_version(distill, version) if distill else None, label_typos=typos,
    )
    if report.get("labels_without_heldout_rows"):
        context.log.warning(f"{task}: {unheld_labels_of(report)}")
    if (cut_off := cut_off_warning(report)) is not None:
        context.log.warning(f"{task}: {cut_off}")
    if report["gate_caveat"] is not None:
        context.log.warning(f"{task}: the gate passed, but {report['gate_caveat']}")
    run_id = adapter.metadata["mlflow_run_id"]
    if not report["reused"] or report["report_rewritten"]:
        mlflow.log_evaluation(run_id, report, cfg.evaluation.model_dump(include=GATE_FIELDS))
    return dg.MaterializeResult(
        metadata=_metadata(report, mlflow.run_url(run_id), (sft or adapter).metadata.get("warm_started", False)),
        data_version=file_version(paths.path("eval_report", METRICS)),
    )


@dg.observable_source_asset(partitions_def=task_partitions, group_name=GROUP)
def review_verdicts(context: dg.OpExecutionContext) -> dg.DataVersionsByPartition:
    """The filled-in review CSV files reviewers drop in a task's `reviews/` folder; its version is their hash."""
    tasks = context.instance.get_dynamic_partitions(task_partitions.name)
    return dg.DataVersionsByPartition({task: reviews_version(task) for task in tasks})


@dg.asset(
    partitions_def=task_partitions, group_name=GROUP, kinds={"html", "csv"}, deps=["eval_report", "review_verdicts"],
    automation_condition=dg.AutomationCondition.eager(),
)
def human_review(context: dg.AssetExecutionContext) -> dg.MaterializeResult:
    """A blind, randomised A/B sample of held-out rows (base vs fine-tuned answers) as a CSV and a self-contained HTML
    page for a reviewer, and the verdicts found so far in the task's `reviews/` folder with the win rate's interval."""
    import pyarrow.parquet as pq

    from ftpipe.core.evaluation.review import sample_verdicts, write_review_sample

    task = context.partition_key
    paths = TaskLayout(task)
    predictions, out = paths.path("eval_report", PREDICTIONS), paths.asset("human_review")
    sample = write_review_sample(pq.read_table(predictions).to_pylist(), out)
    verdicts = sample_verdicts(predictions, out, reviews_dir(task)).summary()
    context.log.info(f"{task}: review sample {sample['review_sample']} of {sample['review_rows']} rows; "
                     f"{verdicts['human_verdicts']} verdicts so far")
    return dg.MaterializeResult(
        metadata={
            **rounded_floats(verdicts),
            "review_rows": sample["review_rows"],
            "review_html": dg.MetadataValue.path(sample["review_html"]),
            "review_csv": dg.MetadataValue.path(sample["review_csv"]),
            "reviews_folder": dg.MetadataValue.path(str(reviews_dir(task))),
        },
        data_version=dg.DataVersion(f"{sample['review_sample']}-{verdicts['human_verdicts']}"),
    )
