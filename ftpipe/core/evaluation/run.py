"""The evaluation's entry points: its reuse key, running it (or reusing the published one), and reading a
published one with the gate decided for the run's config."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

from ftpipe.config import EvaluationConfig
from ftpipe.core.evaluation.answer_budget import AnswerBudget
from ftpipe.core.evaluation.chart import write_chart
from ftpipe.core.evaluation.copy_baseline import copy_outputs
from ftpipe.core.evaluation.majority_baseline import majority_outputs
from ftpipe.core.evaluation.fewshot import choose_examples
from ftpipe.core.evaluation.forgetting import forgetting_words, most_forgotten
from ftpipe.core.evaluation.gate import GATE_FIELDS, decide_gate, gate_caveat
from ftpipe.core.evaluation.judge import judge_metrics
from ftpipe.core.evaluation.measurements import measure, prediction_records
from ftpipe.core.evaluation.metrics import TaskMetrics, check_references, task_metrics
from ftpipe.core.evaluation.outputs import Heldout, Log, ModelOutputs, all_outputs
from ftpipe.core.evaluation.preference import read_pairs
from ftpipe.core.evaluation.probe import PROBE_MAX_NEW_TOKENS, read_probe
from ftpipe.core.evaluation.report import report_markdown
from ftpipe.core.evaluation.review import Verdicts, human_metrics
from ftpipe.core.evaluation.trained_length import (
    mark_over_max_length, trained_length, trained_replay, warm_start,
)
from ftpipe.core.layout import METRICS, PREDICTIONS, REPORT
from ftpipe.core.records import read_examples, unlisted_labels
from ftpipe.core.results import Result, reusable
from ftpipe.core.storage import atomic_dir, file_sha256, write_text
from ftpipe.core.text import label_key

Teacher = Callable[[list[str], list[list[dict]]], ModelOutputs]  # (row ids, prompts) -> a teacher's outputs

KIND = "eval_report"
FORMAT = "12"  # bump when what an evaluation measures or writes changes
PROBE_ROWS = None  # all rows of the probe


def select_rows(rows: list[dict], max_rows: int | None) -> list[dict]:
    """The first `max_rows` rows by id (all when None)."""
    return sorted(rows, key=lambda row: row["id"])[:max_rows]


def output_settings(config: EvaluationConfig) -> dict[str, Any]:
    """The evaluation settings that change its outputs: every one but the gate's thresholds."""
    return config.model_dump(exclude=set(GATE_FIELDS))


def evaluation_key(*, base_fingerprint: str, adapter_version: str, eval_version: str, train_version: str | None,
                   probe_hash: str | None, probe_rows: int | None, config: EvaluationConfig,
                   sft_adapter_version: str | None = None, preference_version: str | None = None,
                   teacher_version: str | None = None) -> str:
    """The reuse key of an evaluation: base model, fine-tuned weights (and the SFT stage's, before a preference
    stage), eval split, held-out preference pairs, train split (the few-shot examples), probe and the settings that
    change outputs; not the gate thresholds."""
    parts = {"format": FORMAT, "base": base_fingerprint, "adapter": adapter_version, "sft": sft_adapter_version,
             "eval": eval_version, "preferences": preference_version, "train": train_version, "probe": probe_hash,
             "probe_rows": probe_rows, "settings": output_settings(config),
             **({"teacher": teacher_version} if teacher_version else {})}
    return hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()[:16]


def read_evaluation(out_dir: Path | str, config: EvaluationConfig,
                    verdicts: Verdicts | None = None) -> dict[str, Any]:
    """A published evaluation with the gate decided for `config` and the human `verdicts` (`read_verdicts`; those on
    the evaluated model's answers count): metrics.json's measurements, `human_metrics`, `passed`,
    `failed_conditions`, `gate_caveat` (what a pass does not say), `report_markdown`, the prediction `records` and
    the paths of the report, predictions and metrics files."""
    import pyarrow.parquet as pq

    out_dir = Path(out_dir)
    metrics = json.loads((out_dir / METRICS).read_text(encoding="utf-8"))
    records = pq.read_table(out_dir / PREDICTIONS).to_pylist()
    metrics.update(human_metrics(records, verdicts))
    passed, failed = decide_gate(metrics, config)
    return {**metrics, "passed": passed, "failed_conditions": failed,
            "gate_caveat": gate_caveat(metrics, config) if passed else None,
            "report_markdown": report_markdown(metrics, records, config), "records": records,
            "report_path": str(out_dir / REPORT),
            "predictions_path": str(out_dir / PREDICTIONS), "metrics_path": str(out_dir / METRICS)}


def finetuned_row_scores(evaluation: dict[str, Any]) -> dict[str, Any]:
    """The fine-tuned model's primary metric on each held-out row of a `read_evaluation` dict: {metric, rows: {row id:
    score}}."""
    metric = evaluation["primary_metric"]
    return {"metric": metric, "rows": {row["id"]: float(row[f"finetuned_{metric}"]) for row in evaluation["records"]}}


def _examples(train_rows: list[dict], exclude_ids: set[str], task: TaskMetrics, config: EvaluationConfig) -> list[dict]:
    """The few-shot examples (none without train rows or with fewshot_k 0)."""
    return choose_examples(train_rows, config.fewshot_k, exclude_ids,
                           group=lambda row: task.group(row["messages"][-1]["content"]))


def _publish(out_dir: Path, metrics: dict[str, Any], records: list[dict], config: EvaluationConfig,
             result: Result, verdicts: Verdicts | None) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    reviewed = {**metrics, **human_metrics(records, verdicts)}
    with atomic_dir(out_dir) as tmp:
        (tmp / REPORT).write_text(report_markdown(reviewed, records, config), encoding="utf-8")
        write_chart(metrics, tmp, config)
        pq.write_table(pa.Table.from_pylist(records), tmp / PREDICTIONS)
        (tmp / METRICS).write_text(json.dumps(metrics, indent=2), encoding="utf-8")
        result.write(tmp)


def _measure(*, base_model_dir: Path, base_fingerprint: str, tuned: dict[str, tuple[Path, str]], eval_path: Path,
             eval_version: str, preference_eval_path: Path | None, train_path: Path | None, probe_path: Path | None,
             probe_hash: str | None, probe_rows: int | None, config: EvaluationConfig, cache_dir: Path,
             trust_remote_code: bool, log: Log, teacher: Teacher | None) -> tuple[dict[str, Any], list[dict]]:
    """(measurements, prediction records) of a new evaluation."""
    from transformers import AutoTokenizer

    eval_rows = read_examples(eval_path)
    rows = select_rows(eval_rows, config.max_rows)
    if not rows:
        raise ValueError(f"{eval_path}: no held-out rows to evaluate")
    task = task_metrics(config)
    check_references(rows, task)
    tokenizer = AutoTokenizer.from_pretrained(str(base_model_dir), trust_remote_code=trust_remote_code)
    budget = AnswerBudget.of(config.max_new_tokens, [row["messages"][-1]["content"] for row in rows], tokenizer)
    config = config.model_copy(update={"max_new_tokens": budget.tokens})
    train_rows = read_examples(train_path) if train_path else []
    pairs = read_pairs(preference_eval_path, config.max_rows)
    heldout = Heldout.of(rows, read_probe(probe_path, probe_rows) if probe_path else [], task, train_rows,
                         config.constrain_to_labels, pairs)
    examples = _examples(train_rows, {row["id"] for row in eval_rows}, task, config)
    base_key = {"base": base_fingerprint, "eval": eval_version, "probe": probe_hash, "probe_rows": len(heldout.probe),
                "probe_max_new_tokens": PROBE_MAX_NEW_TOKENS, "labels": heldout.labels,
                "answer_end": heldout.answer_end.key if heldout.answer_end else None,
                **config.model_dump(include={"task_type", "label_field", "max_rows", "max_new_tokens", "batch_size"}),
                **({"preference_pairs": [pair["id"] for pair in pairs]} if pairs else {})}  # keeps older caches valid
    outputs, base_rows_run = all_outputs(
        base_model_dir=base_model_dir, base_key=base_key, tuned=tuned, heldout=heldout, examples=examples,
        config=config, cache_dir=cache_dir, trust_remote_code=trust_remote_code, log=log)
    if teacher is not None:
        outputs["teacher"] = teacher(heldout.ids, heldout.prompts)
    if task.compares_to_copy and (copied := copy_outputs(heldout.rows, train_rows)) is not None:
        outputs["copy"] = copied
    if task.compares_to_majority and (majority := majority_outputs(heldout.rows, train_rows, task)) is not None:
        outputs["majority"] = majority
    metrics, scores = measure(heldout, outputs, task, config, len(examples))
    records = prediction_records(heldout, outputs, scores, task)
    if trained := trained_length(tuned["finetuned"][0]):
        trained["rows_over"] = mark_over_max_length(records, heldout.rows, tokenizer, trained["max_length"])
    judged = judge_metrics(records, config.judge, log)
    found = {**metrics, **judged, **budget.metrics(), "base_cached": base_rows_run == 0, "base_rows_run": base_rows_run,
             "fewshot_labels": _labels_shown(examples, heldout, task), "trained_length": trained,
             "fewshot_rows": [{"id": row["id"], "source": row["source"]} for row in examples],
             "warm_start": warm_start(sft_dir := tuned.get("sft", tuned["finetuned"])[0]),  # before a stage
             "trained_replay": trained_replay(sft_dir),
             "labels_past_max_rows": _past_max_rows(metrics["labels_without_heldout_rows"], eval_rows, rows, task),
             "unlisted_labels": (unlisted_labels(rows, heldout.choices.written, "the held-out and train answers")
                                 if heldout.choices else None)}
    return found, records


def _past_max_rows(unheld: list[str], eval_rows: list[dict], rows: list[dict], task: TaskMetrics) -> list[str]:
    """The labels of `unheld` (as written) that held-out rows `evaluation.max_rows` left out have."""
    if not unheld:
        return []
    evaluated = {row["id"] for row in rows}
    left_out = {task.group(row["messages"][-1]["content"]) for row in eval_rows if row["id"] not in evaluated}
    return [label for label in unheld if label_key(label) in left_out]


def _labels_shown(examples: list[dict], heldout: Heldout, task: TaskMetrics) -> list[int] | None:
    """[labels the few-shot examples show, labels of the task] (None: the task type has no labels)."""
    if heldout.choices is None:
        return None
    return [len({task.group(row["messages"][-1]["content"]) for row in examples}), len(heldout.choices.names)]


def run_evaluation(*, base_model_dir: Path | str, base_fingerprint: str, adapter_dir: Path | str,
                   adapter_version: str, eval_path: Path | str, eval_version: str, train_path: Path | str | None,
                   probe_path: Path | str | None, config: EvaluationConfig, cache_dir: Path | str,
                   out_dir: Path | str, trust_remote_code: bool = False, log: Log = print,
                   probe_rows: int | None = PROBE_ROWS, verdicts: Verdicts | None = None,
                   sft_adapter_dir: Path | str | None = None, sft_adapter_version: str | None = None,
                   preference_eval_path: Path | str | None = None, teacher: Teacher | None = None,
                   teacher_version: str | None = None, label_typos: dict[str, str] | None = None) -> dict[str, Any]:
    """Evaluate the base model zero-shot and few-shot, and the fine-tuned model (an adapter on the base, or a full
    fine-tune), on the held-out rows and the probe; publish `out_dir`; return `read_evaluation`'s dict plus
    `reused`.

    After a preference stage, `adapter_dir` is the final model and `sft_adapter_dir` (with `sft_adapter_version`)
    the SFT model it was tuned from, evaluated the same way (`sft_score`, `sft_forgetting`, ...). The paired rows of
    `preference_eval_path` (held-out preference rows; a missing file has none) give each model's preference
    accuracy and the final model's gain over the SFT model (over the base without one), which the gate checks.

    When `out_dir` already holds an evaluation with this `evaluation_key`, nothing is generated: it is read back
    with the gate decided for `config`. The base model's outputs come from `cache_dir` when this base, eval split,
    decoding setup and probe were evaluated before. `train_path` None (or fewshot_k 0) skips the few-shot
    baseline; `probe_path` None skips the forgetting check (forgetting 0); `probe_rows` caps the probe rows used.
    With `evaluation.judge`, an LLM judge compares fine-tuned and base answers; `verdicts` are the human ones.
    `teacher(ids, prompts)` gives a distillation teacher's outputs on the held-out prompts (`teacher_version` names
    it): the report adds its score, how much of it the student reaches, and each one's time per row.
    `label_typos` (a label -> the commoner label it looks like a typo of, from cleaning) names the likely typos among
    the labels without a held-out row (`likely_typos` in the metrics).

    `out_dir` gets report.md, predictions.parquet (one row per held-out example), metrics.json (the measurements,
    not the gate) and result.json (the reuse key and the inputs' versions).
    """
    if (sft_adapter_dir is None) != (sft_adapter_version is None):
        raise ValueError("sft_adapter_dir and sft_adapter_version are given together or not at all")
    out_dir = Path(out_dir)
    train_path, probe_path, preference_eval_path = (Path(path) if path else None
                                                    for path in (train_path, probe_path, preference_eval_path))
    inputs = {"base_fingerprint": base_fingerprint, "adapter_version": adapter_version, "eval_version": eval_version,
              "train_version": file_sha256(train_path) if train_path else None,
              "probe_hash": file_sha256(probe_path) if probe_path else None, "probe_rows": probe_rows,
              "sft_adapter_version": sft_adapter_version, "teacher_version": teacher_version,
              "preference_version": (file_sha256(preference_eval_path)
                                     if preference_eval_path and preference_eval_path.is_file() else None)}
    key = evaluation_key(**inputs, config=config)
    if reusable(out_dir, KIND, key):
        found = read_evaluation(out_dir, config, verdicts)
        rewritten = (out_dir / REPORT).read_text(encoding="utf-8") != found["report_markdown"]
        if rewritten:  # the gate decided for this run's thresholds (or verdicts) differs from the stored report's
            write_text(out_dir / REPORT, found["report_markdown"])
            write_chart(found, out_dir, config)  # its bars too
        log(f"evaluation inputs unchanged (key {key}): reusing {out_dir}"
            + (f"; the report rewritten: eval gate {'passed' if found['passed'] else 'failed'}" if rewritten else ""))
        return {**found, "reused": True, "report_rewritten": rewritten}
    tuned = {"sft": (Path(sft_adapter_dir), sft_adapter_version)} if sft_adapter_dir else {}
    metrics, records = _measure(
        base_model_dir=Path(base_model_dir), base_fingerprint=base_fingerprint,
        tuned={**tuned, "finetuned": (Path(adapter_dir), adapter_version)}, eval_path=Path(eval_path),
        eval_version=eval_version,
        preference_eval_path=preference_eval_path, train_path=train_path, probe_path=probe_path,
        probe_hash=inputs["probe_hash"], probe_rows=probe_rows, config=config, cache_dir=Path(cache_dir),
        trust_remote_code=trust_remote_code, log=log, teacher=teacher)
    metrics["likely_typos"] = {label: like for label, like in (label_typos or {}).items()
                               if label in metrics["labels_without_heldout_rows"]}
    produced = {"report": REPORT, "predictions": PREDICTIONS, "metrics": METRICS}
    _publish(out_dir, metrics, records, config, Result(kind=KIND, reuse_key=key, inputs=inputs, produced=produced),
             verdicts)
    result = {**read_evaluation(out_dir, config, verdicts), "reused": False, "report_rewritten": False}
    preference = (f", preference accuracy {result['preference_accuracy_final']:.3f}"
                  if "preference_pairs" in result else "")
    forgetting = forgetting_words(result["forgetting"], most_forgotten(result["probe_accuracy_by_skill"]))
    failed = f"; failed: {'; '.join(result['failed_conditions'])}" if result["failed_conditions"] else ""
    log(f"eval gate {'passed' if result['passed'] else 'failed'}: {result['primary_metric']} "
        f"{result['base_score']:.3f} -> {result['finetuned_score']:.3f}, {forgetting}{preference}{failed}")
    return result
