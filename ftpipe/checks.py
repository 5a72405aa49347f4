"""Asset checks, beside the assets they check.

A check judges an asset with the configuration that asset ran with: task.yaml plus the launchpad overrides this
run gave the asset (task.yaml alone when the check runs without it).
"""

import json
from pathlib import Path

import dagster as dg

from ftpipe.assets.common import effective_config, rounded_floats, run_overrides, table, upstream
from ftpipe.core import dedup, records, split
from ftpipe.core.similarity import Settings
from ftpipe.core.layout import PREDICTIONS, QUARANTINE, REMOVED, TaskLayout
from ftpipe.core.tasks import reviews_dir
from ftpipe.partitions import task_partitions

SHOWN_LABELS = 3  # labels over the cleaning limit named in the check's one line


@dg.asset_check(asset="raw_examples", blocking=True, partitions_def=task_partitions)
def raw_examples_every_file_used(context: dg.AssetCheckExecutionContext) -> dg.AssetCheckResult:
    """Fails when every row of a raw file went to the quarantine (a file that cannot be read, or columns the mapping
    does not name): training on the other files would leave that source out without a word."""
    task = context.partition_key
    summary = upstream(task, "raw_examples").metadata
    unusable, path = summary["unusable_files"], TaskLayout(task).asset("raw_examples") / QUARANTINE
    quarantine = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()] if unusable else []
    return dg.AssetCheckResult(
        passed=not unusable,
        description=(records.unusable_files_line(unusable, quarantine, path) if unusable
                     else f"every raw file gave rows ({len(summary['files'])} files)"),
        metadata={"unusable_files": unusable},
    )


@dg.asset_check(asset="heldout_split", blocking=True, partitions_def=task_partitions)
def heldout_split_no_leakage(context: dg.AssetCheckExecutionContext) -> dg.AssetCheckResult:
    """No eval prompt, of a chat row or a preference row, is an exact or near duplicate of a train prompt of either
    kind, no eval row asks a train row's question in other wrapping, and no eval row gives a train row's distinctive
    answer word for word (a paraphrase of its question)."""
    task = context.partition_key
    cleaning = effective_config(task, run_overrides(context, "heldout_split")).dedup
    leaks = split.split_leaks(TaskLayout(task).asset("heldout_split"), Settings.of(cleaning))
    return dg.AssetCheckResult(
        passed=not leaks,
        metadata={"leaked_eval_rows": len(leaks), "examples": dg.MetadataValue.json(leaks[:20])},
        description=split.leak_line(leaks),
    )


@dg.asset_check(asset="eval_report", blocking=True, partitions_def=task_partitions)
def eval_report_gate(context: dg.AssetCheckExecutionContext) -> dg.AssetCheckResult:
    """Passes only when the gain's 95% interval clears `min_improvement`, forgetting stays within `max_forgetting` and,
    after a preference stage, the preference-accuracy gain's interval clears `min_preference_gain`; decided from the
    stored measurements, so changing a threshold never re-runs the evaluation."""
    from ftpipe.core.evaluation import read_evaluation
    from ftpipe.core.evaluation.forgetting import most_forgotten

    task = context.partition_key
    evaluation = effective_config(task, run_overrides(context, "eval_report")).evaluation
    report = read_evaluation(TaskLayout(task).output("eval_report"), evaluation)
    failed = report["failed_conditions"]
    return dg.AssetCheckResult(
        passed=report["passed"],
        description="; ".join(failed) if failed else "fine-tuning helped on held-out data without costing general skills",
        metadata=rounded_floats({
            "delta_ci_low": report["delta_ci_low"], "min_improvement": evaluation.min_improvement,
            "forgetting": report["forgetting"], "max_forgetting": evaluation.max_forgetting,
            "most_forgotten_skill": most_forgotten(report["probe_accuracy_by_skill"]),  # the gate reads each skill
            **({"preference_margin_gain_ci_low": report["preference_margin_gain_ci_low"],
                "min_preference_gain": evaluation.min_preference_gain} if "preference_pairs" in report else {}),
            "failed_conditions": "; ".join(failed) or "none",
        }),
    )


@dg.asset_check(asset="deduplicated_examples", blocking=False, partitions_def=task_partitions)
def deduplicated_examples_removal_share(context: dg.AssetCheckExecutionContext) -> dg.AssetCheckResult:
    """Warns when cleaning removed more than `dedup.max_removed_share` of the rows, or of any one label's rows (beyond
    chance: `dedup.heavy_removals`), with removed rows next to the rows they were matched with."""
    task = context.partition_key
    limit = effective_config(task, run_overrides(context, "deduplicated_examples")).dedup.max_removed_share
    summary = upstream(task, "deduplicated_examples").metadata
    heavy = dedup.heavy_removals(summary, limit)
    flagged = set(heavy) - {None, dedup.PREFERENCE_ROWS}
    examples = [row for row in summary["matched_examples"] if not flagged or row["label"] in flagged]
    return dg.AssetCheckResult(
        passed=not heavy,
        severity=dg.AssetCheckSeverity.WARN,
        description=removal_warning(heavy, limit, TaskLayout(task).asset("deduplicated_examples") / REMOVED)
        if heavy else
        f"cleaning removed at most {limit:.0%} of the rows, and of each label at most that or no more than chance",
        metadata={"max_removed_share": limit, "over_the_limit": "; ".join(heavy.values()) or "none",
                  "matched_examples": table(examples, dedup.match_columns(summary))},
    )


def removal_warning(heavy: dict[str | None, str], limit: float, removed: Path) -> str:
    """One line: all rows' share and the labels over `limit` (and over chance: `dedup.heavy_removals`), the first
    `SHOWN_LABELS` of more than one more (the check's `over_the_limit` lists every one), and where every removed row
    is (`removed`)."""
    labels = [text for label, text in heavy.items() if label is not None]
    more = len(labels) - SHOWN_LABELS if len(labels) > SHOWN_LABELS + 1 else 0
    shown = ([heavy[None]] if None in heavy else []) + labels[:len(labels) - more]
    beyond = ", and of a label more than chance would take at the share of all rows" if labels else ""
    return ("; ".join(shown) + (f" and {more} more labels (the check's over_the_limit names them)" if more else "")
            + f" (more than {limit:.0%}{beyond}): read the matched examples before training (every removed row: "
            f"{removed})")


@dg.asset_check(asset="human_review", blocking=True, partitions_def=task_partitions)
def human_review_verdicts(context: dg.AssetCheckExecutionContext) -> dg.AssetCheckResult:
    """With `evaluation.require_human_review` N, passes once N human verdicts on the new model's answers exist; the
    merge waits for it. Dropping more verdicts in the task's `reviews/` folder re-runs it."""
    from ftpipe.core.evaluation import waiting_for_reviews
    from ftpipe.core.evaluation.review import sample_verdicts

    task = context.partition_key
    paths = TaskLayout(task)
    evaluation = effective_config(task, run_overrides(context, "human_review")).evaluation
    verdicts = sample_verdicts(paths.path("eval_report", PREDICTIONS), paths.asset("human_review"), reviews_dir(task))
    have = len(verdicts.verdicts)
    waiting = waiting_for_reviews(have, evaluation)
    return dg.AssetCheckResult(
        passed=waiting is None,
        description=waiting or f"{have} human verdicts (needed: {evaluation.require_human_review})",
        metadata={"human_verdicts": have, "require_human_review": evaluation.require_human_review},
    )


def _production_check(context: dg.AssetCheckExecutionContext, check: str, problems_of, severity, fine: str):
    """A check of the production report's figures; when it fails and `monitoring.alert_webhook` is set, the webhook
    gets the task, the check, the problems and the figures."""
    from ftpipe.core import monitoring
    from ftpipe.core.alerts import post_alert

    task = context.partition_key
    watch = effective_config(task, run_overrides(context, "production_report")).monitoring
    figures = monitoring.read_figures(TaskLayout(task).asset("production_report"))
    problems = problems_of(figures, watch)
    alert = None
    if problems and watch.alert_webhook:
        alert = post_alert(watch.alert_webhook, {"task": task, "check": check, "severity": severity.value,
                                                 "problems": problems, "figures": figures})
        if alert:
            context.log.warning(alert)
    return dg.AssetCheckResult(
        passed=not problems, severity=severity, description="; ".join(problems) or fine,
        metadata={**rounded_floats({k: v for k, v in figures.items() if isinstance(v, float)}),
                  "alerted": bool(problems and watch.alert_webhook and not alert)},
    )


@dg.asset_check(asset="production_report", partitions_def=task_partitions)
def production_health(context: dg.AssetCheckExecutionContext) -> dg.AssetCheckResult:
    """Fails (ERROR) when the served traffic's error rate or p95 latency is above the task's `monitoring` limits, or
    the share of answers of the task's form below them."""
    from ftpipe.core.monitoring import health_problems

    return _production_check(context, "production_health", health_problems, dg.AssetCheckSeverity.ERROR,
                             "error rate, p95 latency and validity within the limits")


@dg.asset_check(asset="production_report", partitions_def=task_partitions)
def production_drift(context: dg.AssetCheckExecutionContext) -> dg.AssetCheckResult:
    """Warns when production prompts drift from the training prompts beyond the task's `monitoring` limits."""
    from ftpipe.core.monitoring import drift_problems

    return _production_check(context, "production_drift", drift_problems, dg.AssetCheckSeverity.WARN,
                             "production prompts look like the training prompts")
