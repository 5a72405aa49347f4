"""Data group: task_files -> teacher_examples -> raw_examples -> deduplicated_examples -> heldout_split, and review_sample.

The data assets refresh by themselves (declarative automation) whenever an upstream data version changes.
"""


import dagster as dg

from ftpipe.assets.common import TaskRunConfig, file_version, load_config, table
from ftpipe.core import dedup, label_spellings, records, review_sample as review, split, teacher
from ftpipe.core.evaluation.metrics import (
    answer_problem, answer_rule, labels_missing_from, shape_problems, task_metrics,
)
from ftpipe.core.evaluation.metrics.extraction import type_slips_said
from ftpipe.core.evaluation.metrics.final_answer import uncomputed_said
from ftpipe.core.evaluation.report import unheld_labels, untaught_labels
from ftpipe.core.similarity import Settings
from ftpipe.core.preferences import as_chat, unpaired_left_out
from ftpipe.core.preference_cleaning import cut_off_chosen_said, taught_answers_rejected_said
from ftpipe.core.layout import QUARANTINE, REMOVED, REVIEW_CSV, TaskLayout
from ftpipe.core.readable import plural
from ftpipe.core.storage import task_dir
from ftpipe.core.tasks import task_files_version
from ftpipe.partitions import task_partitions

GROUP = "data"
PREVIEW_ROWS = 20
REFRESH = dg.AutomationCondition.eager()
TEACHER_FIGURES = ("teacher_requests", "cache_hits", "teacher_tokens", "answers_rejected", "prompts", "rows",
                   "failed_requests", "unanswered")


@dg.observable_source_asset(partitions_def=task_partitions, group_name=GROUP)
def task_files(context: dg.OpExecutionContext) -> dg.DataVersionsByPartition:
    """A task folder's `task.yaml` and `raw/` files; its data version is a hash of their contents."""
    tasks = context.instance.get_dynamic_partitions(task_partitions.name)
    return dg.DataVersionsByPartition({task: task_files_version(task) for task in tasks})


@dg.asset(partitions_def=task_partitions, group_name=GROUP, kinds={"openai"}, deps=[task_files],
          automation_condition=REFRESH)
def teacher_examples(context: dg.AssetExecutionContext, config: TaskRunConfig) -> dg.MaterializeResult:
    """With a `distill` section: the teacher's answers to the prompts in the task's `prompts/` folder, asked only for
    prompts without a cached answer, within the budget, and checked (rejected answers kept with the reason)."""
    task = context.partition_key
    cfg = load_config(context, config)
    out = TaskLayout(task).asset("teacher_examples")
    try:
        summary = teacher.build_teacher_examples(task, cfg, out, log=context.log.info)
    except (teacher.TeacherError, ValueError) as error:
        raise dg.Failure(description=f"{task}: {error}") from None
    return dg.MaterializeResult(
        metadata={**{key: summary[key] for key in TEACHER_FIGURES}, "stopped": summary["stopped"] or "no",
                  "rows_path": dg.MetadataValue.path(str(out / teacher.TEACHER_FILE)),
                  "rejected_path": dg.MetadataValue.path(str(out / teacher.REJECTED_FILE))},
        data_version=file_version(out / teacher.TEACHER_FILE),
    )


@dg.asset(partitions_def=task_partitions, group_name=GROUP, kinds={"parquet"}, deps=[task_files, teacher_examples],
          automation_condition=REFRESH)
def raw_examples(context: dg.AssetExecutionContext, config: TaskRunConfig) -> dg.MaterializeResult:
    """Every row of the task's raw/ files, and the teacher's rows, in the canonical chat schema; unusable rows
    quarantined with a reason."""
    task = context.partition_key
    cfg = load_config(context, config)
    data = cfg.data
    paths = TaskLayout(task)
    out = paths.asset("raw_examples")
    spec = records.FormatSpec(data.format, dict(data.columns), data.system_prompt, tuple(data.label_names),
                              answer_rule(cfg.evaluation), answer_problem(cfg.evaluation),
                              shape_problems(cfg.evaluation),
                              tuple((pattern, own.format, dict(own.columns)) for pattern, own in data.files.items()))
    teacher_rows = paths.path("teacher_examples", teacher.TEACHER_FILE)
    extra = ((teacher_rows, f"teacher {cfg.distill.teacher.model}"),) if cfg.distill else ()
    try:
        summary = records.build_raw_examples(task_dir(task), out, spec, extra)
    except records.RawDataError as error:  # the data's problem, said in one line: no stack trace, no retry
        raise dg.Failure(description=f"{task}: {error}", allow_retries=False) from None
    context.log.info(f"{task}: {summary['rows_valid']} valid and {summary['rows_quarantined']} quarantined "
                     f"rows from {len(summary['files'])} file(s)")
    quarantine = summary.pop("quarantine")
    for line in [*summary["unused_entries"], summary["system_prompt_mix"], summary["odd_turn_orders"],
                 summary["unlisted_labels"]]:
        if line:
            context.log.warning(f"{task}: {line}")
    return dg.MaterializeResult(
        metadata={
            **{k: summary[k] for k in ("rows_read", "rows_valid", "rows_quarantined", "preference_rows")},
            "quarantine_path": dg.MetadataValue.path(str(out / QUARANTINE)),
            "examples_path": dg.MetadataValue.path(str(paths.examples("raw_examples"))),
            "files": summary["files"],
            "unusable_files": summary["unusable_files"],
            "ignored_files": summary["ignored_files"],
            "quarantine_reasons": dg.MetadataValue.json(summary["quarantine_reasons"]),
            "quarantine_preview": table(quarantine[:PREVIEW_ROWS], ["source", "reason", "raw"]),
        },
        data_version=file_version(paths.examples("raw_examples"), out / QUARANTINE, paths.preferences("raw_examples")),
    )


@dg.asset(
    partitions_def=task_partitions, group_name=GROUP, kinds={"parquet"}, deps=[raw_examples], automation_condition=REFRESH,
)
def deduplicated_examples(context: dg.AssetExecutionContext, config: TaskRunConfig) -> dg.MaterializeResult:
    """Exact duplicates, near-duplicates and contradicting answers removed, judged on what varies between rows;
    every removal kept with its reason and the row it matched."""
    task = context.partition_key
    cfg = load_config(context, config)
    paths = TaskLayout(task)
    out = paths.asset("deduplicated_examples")
    summary = dedup.build_deduplicated(paths.examples("raw_examples"), out, Settings.of(cfg.dedup),
                                       free_text=cfg.evaluation.task_type == "generation",
                                       labels=task_metrics(cfg.evaluation), label_names=tuple(cfg.data.label_names))
    removed = summary.pop("removed")
    pairs = (f" and {summary['preference_rows_out']} of {summary['preference_rows_in']} preference rows"
             if summary["preference_rows_in"] else "")
    context.log.info(f"{task}: kept {summary['rows_out']} of {summary['rows_in']} chat rows{pairs}")
    respelled = summary["label_spellings"], summary["preference_answers_respelled"]
    if any(respelled):
        context.log.info(f"{task}: {label_spellings.said(*respelled)}")
    if misspelt := summary["likely_misspellings"]:
        context.log.warning(f"{task}: {label_spellings.misspellings_said(misspelt)}")
    if uncomputed := summary["uncomputed_final_answers"]:
        context.log.warning(f"{task}: {uncomputed_said(uncomputed, summary['first_uncomputed_final_answer'])}")
    if slips := summary["type_slips"]:
        context.log.warning(f"{task}: {type_slips_said(slips)}")
    if unnamed := summary["labels_not_named"]:
        context.log.warning(f"{task}: {label_spellings.unnamed_said(unnamed)}")
    if punctuation := summary["pairs_differing_in_punctuation"]:
        context.log.warning(f"{task}: {plural(punctuation, 'preference pair')} kept whose answers "
                            "differ only in punctuation, case or spacing (the first: "
                            f"{summary['first_pair_differing_in_punctuation']}): what such a pair teaches is that "
                            "difference")
    if summary["pairs_rejecting_taught_answers"]:
        context.log.warning(f"{task}: {taught_answers_rejected_said(summary)}")
    if summary["cut_off_chosen_answers"]:
        context.log.warning(f"{task}: {cut_off_chosen_said(summary)}")
    return dg.MaterializeResult(
        metadata={
            **{key: summary[key] for key in (*dedup.COUNTS, "preference_rows_in", "preference_rows_out")},
            "shared_text_shingles": summary["shared_text_shingles"],
            "removed_by_label": table(
                [{"label": label, **counts, "share": f"{counts['removed'] / counts['rows_in']:.0%}"}
                 for label, counts in summary["removed_by_label"].items()], ["label", "rows_in", "removed", "share"]),
            "matched_examples": table(summary["matched_examples"], dedup.match_columns(summary)),
            "labels_respelled": sum(r["rows"] for r in summary["label_spellings"]),
            "label_spellings": table(label_spellings.shown(summary["label_spellings"]), label_spellings.COLUMNS),
            "preference_answers_respelled": summary["preference_answers_respelled"],
            "pairs_differing_in_punctuation": summary["pairs_differing_in_punctuation"],
            "pairs_rejecting_taught_answers": summary["pairs_rejecting_taught_answers"],
            "cut_off_chosen_answers": summary["cut_off_chosen_answers"],
            "likely_misspelt_labels": len(summary["likely_misspellings"]),
            "values_of_another_type": sum(slip["answers"] for slip in summary["type_slips"]),
            "final_answers_not_in_their_working": summary["uncomputed_final_answers"],
            "labels_not_in_label_names": len(summary["labels_not_named"]),
            "misspelt_labels": table(label_spellings.shown(summary["likely_misspellings"], ("label", "like")),
                                     label_spellings.misspelling_columns(summary["likely_misspellings"])),
            "removed_path": dg.MetadataValue.path(str(out / REMOVED)),
            "removed_preview": table(
                [{**r, "message": records.user_message(chat["messages"]), "answer": chat["messages"][-1]["content"]}
                 for r in removed[:PREVIEW_ROWS] for chat in [r if "messages" in r else as_chat(r)]],
                ["reason", "id", "duplicate_of", "detail", "message", "answer", "source"],
            ),
        },
        data_version=file_version(paths.examples("deduplicated_examples"), paths.preferences("deduplicated_examples")),
    )


@dg.asset(
    partitions_def=task_partitions, group_name=GROUP, kinds={"csv"}, deps=[deduplicated_examples], automation_condition=REFRESH,
)
def review_sample(context: dg.AssetExecutionContext) -> dg.MaterializeResult:
    """100 random deduplicated examples, and 100 preference rows (fixed seed), for a manual read before training."""
    paths = TaskLayout(context.partition_key)
    chats, pairs = review.build_review_sample(paths.examples("deduplicated_examples"),
                                              paths.preferences("deduplicated_examples"), paths.asset("review_sample"))
    path, shared = paths.path("review_sample", REVIEW_CSV), paths.path("review_sample", review.SYSTEM_PROMPT_FILE)
    pairs_path = paths.path("review_sample", review.PREFERENCES_CSV)
    return dg.MaterializeResult(
        metadata={
            "rows": len(chats),
            "csv_path": dg.MetadataValue.path(str(path)),
            **({"shared_system_prompt_path": dg.MetadataValue.path(str(shared))} if shared.is_file() else {}),
            "sample": table(chats, ["prompt", "answer", "source"]),
            **({"preference_rows": len(pairs), "preferences_csv_path": dg.MetadataValue.path(str(pairs_path)),
                "preference_sample": table(pairs, ["prompt", *review.answer_columns(pairs), "source"])}
               if pairs else {}),
        },
        data_version=file_version(*[p for p in (path, pairs_path) if p.is_file()]),
    )


@dg.asset(
    partitions_def=task_partitions, group_name=GROUP, kinds={"parquet"}, deps=[deduplicated_examples], automation_condition=REFRESH,
)
def heldout_split(context: dg.AssetExecutionContext, config: TaskRunConfig) -> dg.MaterializeResult:
    """Train / eval rows stratified by answer in a stable hash order; near-duplicate prompts stay on one side."""
    task = context.partition_key
    cfg = load_config(context, config)
    paths = TaskLayout(task)
    scoring = task_metrics(cfg.evaluation)
    summary = split.build_split(
        paths.examples("deduplicated_examples"), paths.asset("heldout_split"),
        eval_fraction=cfg.split.eval_fraction, seed=cfg.split.seed, settings=Settings.of(cfg.dedup),
        labelled=scoring.labelled, categories=scoring.categories,
    )
    preference = (f", {summary['train_pairs']} train / {summary['eval_pairs']} eval preference rows"
                  if summary["train_pairs"] + summary["eval_pairs"] else "")
    context.log.info(f"{task}: {summary['train_rows']} train / {summary['eval_rows']} eval rows{preference}"
                     f"{split.changes_said(summary)}")
    if summary["train_rows"] and not summary["eval_rows"]:
        context.log.warning(f"{task}: no held-out row of {summary['train_rows']}: nothing can be evaluated, so no "
                            "training starts; a larger split.eval_fraction holds some out")
    if unpaired := unpaired_left_out(cfg.training.preference_objective, summary["unpaired_train_rows"],
                                     summary["unpaired_eval_rows"]):
        context.log.warning(f"{task}: {unpaired}")
    if given := summary["preference_rows_given_system_prompt"]:
        context.log.info(f"{task}: {given} preference prompts started without a system message and got the one the "
                         "chat rows and serving start with")
    train, evaluation = paths.split_files
    train_rows = records.read_examples(train)  # read once: the stock-answer check reads the rows
    train_answers, eval_answers = [row["messages"][-1]["content"] for row in train_rows], records.answers(evaluation)
    unheld = labels_missing_from(cfg.evaluation, train_answers, eval_answers)
    untaught = labels_missing_from(cfg.evaluation, eval_answers, train_answers)
    typos = dedup.likely_typos(paths.asset("deduplicated_examples")) if unheld or untaught else {}
    if unheld:
        context.log.warning(f"{task}: {unheld_labels(unheld, typos, cfg.split.eval_fraction)}")
    if untaught:
        context.log.warning(f"{task}: {untaught_labels(untaught, typos)}")
    generation = cfg.evaluation.task_type == "generation"
    if generation and (stock := split.stock_answer(train_rows, cfg.training.every_turn)):
        context.log.warning(f"{task}: {stock}")
    return dg.MaterializeResult(
        metadata={
            **summary,
            "eval_fraction": cfg.split.eval_fraction,
            "labels_without_heldout_rows": len(unheld),
            "labels_without_train_rows": len(untaught),
            "train_path": dg.MetadataValue.path(str(train)),
            "eval_path": dg.MetadataValue.path(str(evaluation)),
        },
        data_version=file_version(train, evaluation, *paths.preference_split_files),
    )
