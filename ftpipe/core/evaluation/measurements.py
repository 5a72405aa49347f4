"""The measurements of an evaluation (what metrics.json stores) and one prediction record per held-out row."""

from __future__ import annotations

from dataclasses import replace
from typing import Any

from ftpipe.config import EvaluationConfig
from ftpipe.core.evaluation.copy_baseline import answer_words
from ftpipe.core.evaluation.forgetting import measure_forgetting
from ftpipe.core.evaluation.metrics import Scores, TaskMetrics
from ftpipe.core.evaluation.outputs import Heldout, ModelOutputs
from ftpipe.core.evaluation.preference import measure_preference
from ftpipe.core.evaluation.statistics import bootstrap_interval, paired_bootstrap, ratio_bootstrap
from ftpipe.core.records import conversation_text

LABEL_LIKELIHOOD = "label_likelihood_accuracy"
DELTA_SEED, FEWSHOT_SEED, FORGETTING_SEED, PREFERENCE_SEED, SFT_SEED, TEACHER_SEED, COPY_SEED = 0, 1, 2, 3, 4, 5, 6
MAJORITY_SEED = 7


def side_scores(task: TaskMetrics, outputs: ModelOutputs, references: list[str]) -> Scores:
    """The task metrics of one model's answers, with label log-likelihood accuracy when labels were ranked."""
    scores = task.scores(outputs.answers, references)
    if outputs.label_correct is None:
        return scores
    return replace(scores, rows={**scores.rows, LABEL_LIKELIHOOD: outputs.label_correct})


def delta_intervals(base: Scores, tuned: Scores, samples: int) -> dict[str, list[float]]:
    """The 95% paired-bootstrap interval of the fine-tuned model's change over the base in each metric, per-row and
    resampled ({metric: [low, high]}); the primary metric's is `delta_ci_low` … `delta_ci_high`, drawn alike."""
    found = {name: list(paired_bootstrap(base.rows[name], tuned.rows[name], samples, seed=DELTA_SEED)[1:])
             for name in tuned.rows}
    size = len(next(iter(tuned.rows.values())))
    for name, metric in tuned.resampled.items():
        found[name] = list(bootstrap_interval(size, lambda rows: metric(rows) - base.resampled[name](rows), samples,
                                              seed=DELTA_SEED))
    return found


def _versus_fewshot(scores: dict[str, Scores], outputs: dict[str, ModelOutputs], primary: str,
                    config: EvaluationConfig) -> dict[str, Any]:
    if "fewshot" not in outputs:
        return dict.fromkeys(("fewshot_score", "delta_vs_fewshot", "delta_vs_fewshot_ci_low",
                              "delta_vs_fewshot_ci_high", "fewshot_prompt_tokens"))
    delta, low, high = paired_bootstrap(scores["fewshot"].rows[primary], scores["finetuned"].rows[primary],
                                        config.bootstrap_samples, seed=FEWSHOT_SEED)
    return {"fewshot_score": scores["fewshot"].summary[primary], "delta_vs_fewshot": delta,
            "delta_vs_fewshot_ci_low": low, "delta_vs_fewshot_ci_high": high,
            "fewshot_prompt_tokens": outputs["fewshot"].prompt_tokens}


def _versus_sft(heldout: Heldout, scores: dict[str, Scores], outputs: dict[str, ModelOutputs], primary: str,
                config: EvaluationConfig) -> dict[str, Any]:
    """The SFT model before a preference stage: its score, loss and forgetting, and what the preference stage
    changed in the primary metric (`delta_vs_sft`, final minus SFT, with its interval); nothing without one."""
    if "sft" not in outputs:
        return {}
    sft = outputs["sft"]
    delta, low, high = paired_bootstrap(scores["sft"].rows[primary], scores["finetuned"].rows[primary],
                                        config.bootstrap_samples, seed=SFT_SEED)
    forgetting = measure_forgetting(heldout.probe, outputs["base"], sft, config.bootstrap_samples,
                                    seed=FORGETTING_SEED)
    return {"sft_score": scores["sft"].summary[primary], "delta_vs_sft": delta, "delta_vs_sft_ci_low": low,
            "delta_vs_sft_ci_high": high, "sft_loss": sft.loss, "sft_perplexity": sft.perplexity,
            "sft_forgetting": forgetting["forgetting"], "sft_forgetting_ci_low": forgetting["forgetting_ci_low"],
            "sft_forgetting_ci_high": forgetting["forgetting_ci_high"],
            "probe_sft_accuracy": forgetting["probe_finetuned_accuracy"],
            "probe_sft_loss": forgetting["probe_finetuned_loss"]}


def _versus_teacher(scores: dict[str, Scores], outputs: dict[str, ModelOutputs], primary: str,
                    config: EvaluationConfig) -> dict[str, Any]:
    """With a teacher: its score, how much of it the fine-tuned student reaches (with a 95% paired-bootstrap
    interval; none when the teacher scores 0) and each one's time per held-out row."""
    if "teacher" not in outputs:
        return {}
    teacher, student = scores["teacher"].rows[primary], scores["finetuned"].rows[primary]
    ratio, low, high = (ratio_bootstrap(teacher, student, config.bootstrap_samples, seed=TEACHER_SEED)
                        if sum(teacher) > 0 else (None, None, None))
    latency = {side: outputs[side].seconds_per_row for side in ("teacher", "finetuned")}
    return {"teacher_score": scores["teacher"].summary[primary], "student_to_teacher_ratio": ratio,
            "student_to_teacher_ratio_ci_low": low, "student_to_teacher_ratio_ci_high": high,
            **{f"{'student' if side == 'finetuned' else side}_latency_ms": None if value is None else value * 1000
               for side, value in latency.items()}}


def _versus_baseline(side: str, scores: dict[str, Scores], primary: str, config: EvaluationConfig,
                     seed: int) -> dict[str, Any]:
    """A baseline's score (`side`: copy, majority) and the fine-tuned model's gain over it with its 95% paired-bootstrap
    interval; nothing without that side."""
    if side not in scores:
        return {}
    delta, low, high = paired_bootstrap(scores[side].rows[primary], scores["finetuned"].rows[primary],
                                        config.bootstrap_samples, seed=seed)
    return {f"{side}_score": scores[side].summary[primary], f"delta_vs_{side}": delta,
            f"delta_vs_{side}_ci_low": low, f"delta_vs_{side}_ci_high": high}


def _versus_copy(scores: dict[str, Scores], outputs: dict[str, ModelOutputs], references: list[str], primary: str,
                 config: EvaluationConfig) -> dict[str, Any]:
    """Free text: the copy baseline's `_versus_baseline` and the mean words of the references and of every side's
    answers; nothing for other task types."""
    if "copy" not in outputs:
        return {}
    words = {"reference": answer_words(references), **{side: answer_words(o.answers) for side, o in outputs.items()}}
    return {**_versus_baseline("copy", scores, primary, config, COPY_SEED), "answer_words": words}


def _versus_majority(scores: dict[str, Scores], outputs: dict[str, ModelOutputs], primary: str,
                     config: EvaluationConfig) -> dict[str, Any]:
    """Classification: the majority baseline's `_versus_baseline` and the answer it gives every row."""
    if "majority" not in outputs:
        return {}
    return {**_versus_baseline("majority", scores, primary, config, MAJORITY_SEED),
            "majority_answer": outputs["majority"].answers[0]}


def measure(heldout: Heldout, outputs: dict[str, ModelOutputs], task: TaskMetrics, config: EvaluationConfig,
            fewshot_examples: int) -> tuple[dict[str, Any], dict[str, Scores]]:
    """(measurements, scores by side): every model's metrics, the primary metric's gain over the base and over
    few-shot (and for free text over a copy of the input) with 95% paired-bootstrap intervals, how many base answers
    have the task's form (`base_answers_in_form`), prompt tokens per call, losses and forgetting; with an SFT model
    before a preference stage, its measurements too, and with preference pairs each model's preference accuracy."""
    references = [row["messages"][-1]["content"] for row in heldout.rows]
    scores = {side: side_scores(task, produced, references) for side, produced in outputs.items()}
    base, tuned, primary = outputs["base"], outputs["finetuned"], task.primary
    delta, low, high = paired_bootstrap(scores["base"].rows[primary], scores["finetuned"].rows[primary],
                                        config.bootstrap_samples, seed=DELTA_SEED)
    unheld = heldout.choices.without_heldout_rows() if heldout.choices else {}
    metrics = {
        "primary_metric": primary, "rows": len(heldout.rows), "train_rows": heldout.train_rows,
        "labels_without_heldout_rows": list(unheld), "train_rows_of_unheld_labels": unheld,
        "base_score": scores["base"].summary[primary], "finetuned_score": scores["finetuned"].summary[primary],
        "base_answers_in_form": sum(task.valid_outputs(base.answers, references)),
        "delta": delta, "delta_ci_low": low, "delta_ci_high": high,
        "delta_intervals": delta_intervals(scores["base"], scores["finetuned"], config.bootstrap_samples),
        **_versus_fewshot(scores, outputs, primary, config), "fewshot_examples": fewshot_examples,
        "prompt_tokens": tuned.prompt_tokens,
        **measure_forgetting(heldout.probe, base, tuned, config.bootstrap_samples, seed=FORGETTING_SEED),
        "base_loss": base.loss, "finetuned_loss": tuned.loss,
        "base_perplexity": base.perplexity, "finetuned_perplexity": tuned.perplexity,
        "metrics": {side: scored.summary for side, scored in scores.items()},
        **_versus_sft(heldout, scores, outputs, primary, config),
        **measure_preference(outputs, config.bootstrap_samples, seed=PREFERENCE_SEED),
        **_versus_teacher(scores, outputs, primary, config),
        **_versus_copy(scores, outputs, references, primary, config),
        **_versus_majority(scores, outputs, primary, config),
    }
    return metrics, scores


def prediction_records(heldout: Heldout, outputs: dict[str, ModelOutputs], scores: dict[str, Scores],
                       task: TaskMetrics) -> list[dict[str, Any]]:
    """One record per held-out row: the user's message (with the turns before it, in a multi-turn row), the whole
    prompt, the reference, each model's answer, per-row scores, label and final answer, and the primary metric's
    delta against the base (and few-shot)."""
    records, primary = [], task.primary
    for i, row in enumerate(heldout.rows):
        reference = row["messages"][-1]["content"]
        record = {"id": row["id"], "message": conversation_text(row["messages"]),
                  "user_turns": sum(m["role"] == "user" for m in row["messages"]),
                  "prompt": "\n".join(f"{m['role']}: {m['content']}" for m in row["messages"][:-1]),
                  "reference": reference}
        if task.checks_answers:
            record["reference_final_answer"] = task.final_answer(reference)
        for side, scored in scores.items():
            record[f"{side}_answer"] = outputs[side].answers[i]
            record.update({f"{side}_{name}": values[i] for name, values in scored.rows.items()})
            if scored.labels is not None:
                record[f"{side}_label"] = scored.labels[i]
            if scored.final_answers is not None:
                record[f"{side}_final_answer"] = scored.final_answers[i]
        record["delta"] = record[f"finetuned_{primary}"] - record[f"base_{primary}"]
        if "fewshot" in scores:
            record["delta_vs_fewshot"] = record[f"finetuned_{primary}"] - record[f"fewshot_{primary}"]
        records.append(record)
    return records
