"""The evaluation report in Markdown, rendered from the stored measurements and prediction records with the gate
decided for the run's config (a reused evaluation shows the verdict of the thresholds in force)."""

from __future__ import annotations

from typing import Any

from ftpipe.config import EvaluationConfig
from ftpipe.core.evaluation.answer_budget import cut_off_warning
from ftpipe.core.evaluation.chart import CHART_LINK
from ftpipe.core.evaluation.forgetting import most_forgotten
from ftpipe.core.evaluation.gate import decide_gate, gate_caveat
from ftpipe.core.evaluation.measurements import LABEL_LIKELIHOOD
from ftpipe.core.evaluation.metrics.generation import LENIENT_MATCH
from ftpipe.core.evaluation.metrics import task_metrics
from ftpipe.core.text import cell, clipped_start, loose_words, markdown_table

SIDES = {"base": "base", "fewshot": "few-shot", "sft": "SFT", "finetuned": "fine-tuned", "teacher": "teacher",
         "copy": "copy of the input", "majority": "most common label"}
STAGES = {"base": "base", "sft": "SFT", "final": "final"}  # the models of a preference-tuning report
SHOWCASE_ROWS = 10
LENGTH_GROUPS = 4  # quarters of the held-out rows by message length
MIN_LENGTH_ROWS = 20  # fewer rows: no table by length (a handful of rows per group says nothing)
PROBE_CHANGES_SHOWN = 30
LOSS_NOTE = ("Held-out loss: the mean loss per token of the reference answers (with their end-of-turn tokens), over "
             "the held-out rows evaluated: tokens an answer copies from the message or repeats from every answer "
             "(a JSON object's keys) weigh on it as much as the few that decide a row, so a low loss can go with many "
             "wrong answers. The training's `eval_loss` (the adapter's metadata) is the same mean for the checkpoint "
             "it kept, but leaves out (or cuts) rows over `training.max_length`.")
LONG_TRAIN_ROWS = {"drop": "left out of the training", "truncate": "cut to that length in the training",
                   "trim_turns": "left out of the training or, multi-turn ones, shortened by their earliest turns"}
NAMED_LABELS = 12  # labels without held-out rows named in the warning
IN_FORM_SHARE = 0.5  # of base answers in the task's form, below which the delta over the base counts the form


def number(value: Any, signed: bool = False) -> str:
    """A value for reading: floats to 3 decimals (exact values stay in metrics.json), None as n/a."""
    if value is None:
        return "n/a"
    if isinstance(value, float):
        return f"{value:+.3f}" if signed else f"{value:.3f}"
    return str(value)


def _interval(low: float, high: float, signed: bool = True, kind: str = "paired-bootstrap CI") -> str:
    return f"95% {kind} {number(low, signed)} … {number(high, signed)}"


def verdict(passed: bool, failed: list[str], config: EvaluationConfig, preference: bool = False,
            caveat: str | None = None) -> str:
    """The gate's verdict with its thresholds (`preference`: preference pairs were evaluated, so it has one more),
    and after a pass what it does not say (`caveat`)."""
    thresholds = f"min_improvement {config.min_improvement:g}, max_forgetting {config.max_forgetting:g}"
    if preference:
        thresholds += f", min_preference_gain {config.min_preference_gain:g}"
    if config.require_beats_fewshot:
        thresholds += ", must beat few-shot"
    if config.require_beats_majority:
        thresholds += ", must beat the most common label"
    if config.require_human_review:
        thresholds += f", {config.require_human_review} human verdicts"
    if passed:
        return f"**Eval gate: PASSED** ({thresholds})" + (f". **But {caveat}.**" if caveat else "")
    return f"**Eval gate: FAILED** ({thresholds}): " + "; ".join(failed)


def unheld_labels(labels: list[str] | dict[str, int], typos: dict[str, str] | None = None,
                  eval_fraction: float | None = None, past_max_rows: list[str] = ()) -> str:
    """What a score on held-out rows cannot say: labels of train rows only (`_one_side_labels`). Given as a dict (a
    label -> its train rows), each is named with its rows, the largest first; with `eval_fraction` too, those whose
    share is a row or more are said to ask too few questions (a question's rows stay on one side). Those of
    `past_max_rows` have held-out rows that `evaluation.max_rows` left out: a larger one scores them."""
    if isinstance(labels, dict):
        labels = dict(sorted(labels.items(), key=lambda item: (-item[1], item[0])))
    past = [label for label in labels if label in past_max_rows]
    remedies = [f"{_named(past)} {'have' if len(past) > 1 else 'has'} held-out rows past evaluation.max_rows: a "
                f"larger max_rows scores {'them' if len(past) > 1 else 'it'}"] if past else []
    if len(past) < len(labels):
        remedies.insert(0, "a larger split.eval_fraction gives more labels a held-out row" + _few_questions(
            {label: rows for label, rows in labels.items() if label not in past} if isinstance(labels, dict) else {},
            eval_fraction))
    return _one_side_labels(labels, typos, "train rows", "held-out row evaluated" if past else "held-out row",
                            "the scores say nothing about {them}", "; ".join(remedies))


def _few_questions(labels: dict[str, int], eval_fraction: float | None) -> str:
    """The remedy's words on the labels (with their train rows) whose share of held-out rows is a row or more: their
    rows ask a few questions in other words ("" when none is)."""
    few_questions = [label for label, rows in labels.items() if rows * (eval_fraction or 0) >= 1]
    if not few_questions:
        return ""
    them = "them" if len(few_questions) > 1 else "it"
    return (f"; the rows of {_named(few_questions)} ask a few questions in other words, and a question's rows stay on "
            f"one side: rows asking other questions give {them} held-out rows")


def unheld_labels_of(metrics: dict[str, Any]) -> str:
    """`unheld_labels` of an evaluation's metrics: with their train rows, the held-out share and those past
    `evaluation.max_rows`, where recorded."""
    train, rows = metrics.get("train_rows"), metrics["rows"]
    return unheld_labels(metrics.get("train_rows_of_unheld_labels") or metrics["labels_without_heldout_rows"],
                         metrics.get("likely_typos"), rows / (rows + train) if train else None,
                         metrics.get("labels_past_max_rows", []))


def untaught_labels(labels: list[str] | dict[str, int], typos: dict[str, str] | None = None) -> str:
    """What no training teaches: labels of held-out rows only (`_one_side_labels`; a dict gives each one's rows)."""
    return _one_side_labels(labels, typos, "held-out rows", "train row", "fine-tuning never shows {them} to the model",
                            "more rows of {them} in the raw files give {them} train rows")


def _named(labels: list[str] | dict[str, int]) -> str:
    """The first NAMED_LABELS of `labels` (each with its rows, given as a dict), the rest counted."""
    shown = [f"{label} ×{labels[label]}" if isinstance(labels, dict) else label
             for label in list(labels)[:NAMED_LABELS]]
    return ", ".join(shown) + (f" and {len(labels) - NAMED_LABELS} more" if len(labels) > NAMED_LABELS else "")


def _one_side_labels(labels: list[str] | dict[str, int], typos: dict[str, str] | None, side: str, other: str,
                     meaning: str, remedy: str) -> str:
    """One line on labels of one `side` of the split only (`_named`, with their rows given as a dict): what that means
    and its `remedy`. `typos` (a label -> the commoner label it looks like a typo of, from cleaning) names those among
    them: a typo is corrected in the raw files."""
    many = len(labels) > 1
    them = "them" if many else "it"
    likely = [f"{label!r} looks like a typo of {typos[label]!r}" for label in labels if label in (typos or {})]
    fix = f"; {', '.join(likely)}: correct {'them' if len(likely) > 1 else 'it'} in the raw files" if likely else ""
    return (f"{len(labels)} label{'s' if many else ''} of the {side} ({_named(labels)}) "
            f"{'have' if many else 'has'} no {other}: {meaning.format(them=them)} ({remedy.replace('{them}', them)}"
            f"{fix}).")


FORM_FREE_MEASURES = {  # scores that read past the form of an answer
    LABEL_LIKELIHOOD: "the top label by likelihood, which reads no answer",
    LENIENT_MATCH: "the lenient answer match, which reads an answer's last number where it gives no final one",
}


def _margin_size(m: dict[str, Any]) -> str:
    """How far the margins moved: the gain counts pairs, so a consistent nudge of a few hundredths of a nat counts
    as fully as a large change."""
    median = m.get("preference_margin_change_median")
    if median is None:
        return ""
    return (f"; a pair's margin moved by a median {median:+.3g} nats (the gain counts the pairs moved, however "
            "little)")


def base_out_of_form(m: dict[str, Any]) -> str | None:
    """Where the base model gave most held-out answers in another form than the task's (prose instead of a label),
    that the delta over it counts learning the form as much as the task, and what says how much is the task; None
    otherwise."""
    in_form = m.get("base_answers_in_form")
    if in_form is None or in_form >= IN_FORM_SHARE * m["rows"]:
        return None
    fairer = [*(["the few-shot baseline (shown the form)"] if m["fewshot_score"] is not None else []),
              *(f"{said} (base {number(m['metrics']['base'][name])}, fine-tuned "
                f"{number(m['metrics']['finetuned'][name])})" for name, said in FORM_FREE_MEASURES.items()
                if m["metrics"]["base"].get(name) is not None)]
    task = f"; {' and '.join(fairer)} say{'s' if len(fairer) == 1 else ''} how much is the task" if fairer else ""
    return (f"The base model answered {in_form} of {m['rows']} held-out rows in the task's form, so the delta over it "
            f"counts learning the form as much as the task{task}.")


def overview(metrics: dict[str, Any]) -> str:
    """The verdict's evidence in a few sentences, whether the fine-tuned model was warm-started, then where the base
    outputs came from and any cut-off answers."""
    parts = [*evidence(metrics), *_warm_start(metrics), _base_outputs(metrics)]
    if (cut_off := cut_off_warning(metrics)) is not None:
        parts.append(f"**{cut_off}.**")
    return " ".join(parts)


def evidence(metrics: dict[str, Any]) -> list[str]:
    """The scores behind the verdict, one sentence each: the primary metric with its interval, what it says nothing
    about (labels without held-out rows, a system prompt that names some labels only), the baselines (few-shot,
    teacher, copy, most common label) and forgetting."""
    m = metrics
    parts = [f"Primary metric `{m['primary_metric']}` on {m['rows']} held-out rows: base {number(m['base_score'])}, "
             f"fine-tuned {number(m['finetuned_score'])}, delta {number(m['delta'], True)} "
             f"({_interval(m['delta_ci_low'], m['delta_ci_high'])})."]
    if (form := base_out_of_form(m)) is not None:
        parts.append(form)
    if m.get("labels_without_heldout_rows"):
        parts.append(unheld_labels_of(m))
    if unlisted := m.get("unlisted_labels"):
        parts.append(f"{unlisted[0].upper()}{unlisted[1:]}.")
    if m["fewshot_score"] is not None:
        parts.append(
            f"Base model with {m['fewshot_examples']} train examples in the prompt (few-shot): "
            f"{number(m['fewshot_score'])}; fine-tuned vs few-shot {number(m['delta_vs_fewshot'], True)} "
            f"({_interval(m['delta_vs_fewshot_ci_low'], m['delta_vs_fewshot_ci_high'])}), at "
            f"{m['prompt_tokens']:.0f} instead of {m['fewshot_prompt_tokens']:.0f} prompt tokens per call"
            + (f"; its examples are the train rows of {', '.join(row['source'] for row in m['fewshot_rows'])}."
               if m.get("fewshot_rows") else "."))
        shown, labels = m.get("fewshot_labels") or (0, 0)
        if shown < labels:
            parts.append(f"Its examples show {shown} of the task's {labels} labels: a weak baseline for the others "
                         "(`evaluation.fewshot_k` shows more, at a longer prompt).")
    if m.get("teacher_score") is not None:
        reach = (f"reaches {number(m['student_to_teacher_ratio'])} of it "
                 f"({_interval(m['student_to_teacher_ratio_ci_low'], m['student_to_teacher_ratio_ci_high'], False)})"
                 if m["student_to_teacher_ratio"] is not None else "cannot be compared with a score of 0")
        parts.append(f"Teacher {number(m['teacher_score'])}: the fine-tuned student {reach}, in "
                     f"{number(m['student_latency_ms'])} ms per held-out row against the teacher's "
                     f"{number(m['teacher_latency_ms'])} ms.")
    if m.get("copy_score") is not None:
        words = m["answer_words"]
        parts.append(f"A copy of the user's message cut to the train answers' median length (the copies average "
                     f"{words['copy']:.0f} words): {number(m['copy_score'])}; fine-tuned vs copy "
                     f"{number(m['delta_vs_copy'], True)} "
                     f"({_interval(m['delta_vs_copy_ci_low'], m['delta_vs_copy_ci_high'])}). Answers average "
                     f"{words['reference']:.0f} words in the references, {words['finetuned']:.0f} from the fine-tuned "
                     f"model and {words['base']:.0f} from the base.")
    if m.get("majority_score") is not None:
        parts.append(f"The train rows' most common label as every answer (`{cell(m['majority_answer'], 60)}`): "
                     f"{number(m['majority_score'])}; fine-tuned vs that {number(m['delta_vs_majority'], True)} "
                     f"({_interval(m['delta_vs_majority_ci_low'], m['delta_vs_majority_ci_high'])}).")
    if m["probe_rows"]:
        interval = _interval(m["forgetting_ci_low"], m["forgetting_ci_high"], signed=False)
        parts.append(f"Forgetting {number(m['forgetting'])} ({interval}) on {m['probe_rows']} probe rows: accuracy "
                     f"{number(m['probe_base_accuracy'])} -> {number(m['probe_finetuned_accuracy'])}, reference loss "
                     f"{number(m['probe_base_loss'])} -> {number(m['probe_finetuned_loss'])} (forgetting is the "
                     f"larger relative worsening of the two, 0 when neither worsened).{_skill_lost(m)}")
    else:
        parts.append("Forgetting not checked (no probe file).")
    return parts


def _skill_lost(m: dict[str, Any]) -> str:
    """The skill that lost the most, which the whole probe's figure can hide and the gate reads too ('' if none)."""
    most = most_forgotten(m.get("probe_accuracy_by_skill", {}))
    return "" if most == "none" else f" By skill, the most forgotten is {most}; the gate reads each skill too."


def _warm_start(m: dict[str, Any]) -> list[str]:
    """The sentence saying the fine-tuned model continued the previous adapter (none when it trained from the base)."""
    warm = m.get("warm_start")
    if not warm:
        return []
    return [f"The fine-tuned model continued the previous adapter (`retrain.warm_start`) on {warm['new_rows']} new and "
            f"{warm['replayed_rows']} replayed train rows instead of training from the base; the README's warm start "
            "section says when that is safe."]


def _base_outputs(m: dict[str, Any]) -> str:
    """Where the evaluation took the base model's outputs from: it generated them, took them from the cache, or both
    (said of the evaluation, so a report reused whole is still right)."""
    run, rows = m.get("base_rows_run"), m["rows"]  # evaluations made before the count say only cached or not
    if m["base_cached"]:
        return "This evaluation took the base outputs from the cache."
    if run is None or run == rows:
        return "This evaluation generated the base outputs."
    return (f"This evaluation generated the base outputs for {run} of {rows} held-out rows and took the others from "
            "the cache.")


def summary_table(metrics: dict[str, Any]) -> str:
    """Every metric of every model side by side, with the fine-tuned model's change over the base and its 95%
    interval; a fact no model has (the time per row without a teacher, the probe without general prompts) is left
    out."""
    scores = metrics["metrics"]
    sides = [side for side in SIDES if side in scores]
    names = [name for name, value in scores["base"].items() if isinstance(value, float)]
    intervals = metrics.get("delta_intervals", {})  # none in evaluations made before them
    rows = [[name, *(number(scores[side].get(name)) for side in sides),
             _change(scores["finetuned"][name] - scores["base"][name], intervals.get(name))] for name in names]
    tokens = {side: round(metrics[key]) for side, key in
              (("base", "prompt_tokens"), ("fewshot", "fewshot_prompt_tokens"), ("sft", "prompt_tokens"),
               ("finetuned", "prompt_tokens"))
              if metrics[key] is not None}
    facts = {
        "held-out loss": {"base": metrics["base_loss"], "sft": metrics.get("sft_loss"),
                          "finetuned": metrics["finetuned_loss"]},
        "held-out perplexity": {"base": metrics["base_perplexity"], "sft": metrics.get("sft_perplexity"),
                                "finetuned": metrics["finetuned_perplexity"]},
        "prompt tokens per call": tokens,
        "answer words": {side: f"{words:.1f}" for side, words in metrics.get("answer_words", {}).items()},
        "seconds per held-out row": {"finetuned": _per_thousand(metrics.get("student_latency_ms")),
                                     "teacher": _per_thousand(metrics.get("teacher_latency_ms"))},
        "probe accuracy": {"base": metrics["probe_base_accuracy"], "sft": metrics.get("probe_sft_accuracy"),
                           "finetuned": metrics["probe_finetuned_accuracy"]},
        "probe loss": {"base": metrics["probe_base_loss"], "sft": metrics.get("probe_sft_loss"),
                       "finetuned": metrics["probe_finetuned_loss"]},
    }
    rows += [[label, *(number(values.get(side)) for side in sides), ""] for label, values in facts.items()
             if any(value is not None for value in values.values())]  # no row of n/a: nothing measured
    change = "fine-tuned − base (95% CI)" if intervals else "fine-tuned − base"
    return markdown_table(["metric", *(SIDES[side] for side in sides), change], rows)


def _change(delta: float, interval: list[float] | None) -> str:
    """A change with its interval when it has one: `+0.120 (+0.050 … +0.190)`."""
    return number(delta, True) + (f" ({number(interval[0], True)} … {number(interval[1], True)})" if interval else "")


def _per_thousand(milliseconds: float | None) -> float | None:
    return None if milliseconds is None else milliseconds / 1000


def preference_tuning(metrics: dict[str, Any]) -> str | None:
    """The base, SFT and final models side by side (preference accuracy, primary metric, forgetting) and what the
    preference stage changed, with intervals (None: neither an SFT model nor preference pairs were evaluated)."""
    m, pairs = metrics, metrics.get("preference_pairs")
    if not pairs and "sft_score" not in m:
        return None
    sides = [side for side in STAGES if side != "sft" or "sft_score" in m]
    scores = {"base": m["base_score"], "sft": m.get("sft_score"), "final": m["finetuned_score"]}
    forgetting = {"base": 0.0, "sft": m.get("sft_forgetting"), "final": m["forgetting"]}
    rows = [[m["primary_metric"], *(number(scores[side]) for side in sides)],
            ["forgetting", *(number(forgetting[side]) for side in sides)]]
    if pairs:
        rows.insert(0, [f"preference accuracy ({pairs} pairs)",
                        *(number(m[f"preference_accuracy_{side}"]) for side in sides)])
    parts = [markdown_table(["metric", *(STAGES[side] for side in sides)], rows)]
    if pairs:
        baseline = STAGES[m["preference_baseline"]]
        parts.append(f"Preference accuracy: the share of held-out pairs whose chosen answer the model finds likelier "
                     f"per token than the rejected one. Final vs {baseline} {number(m['preference_delta'], True)} "
                     f"({_interval(m['preference_delta_ci_low'], m['preference_delta_ci_high'])}).")
        gain = _interval(m["preference_margin_gain_ci_low"], m["preference_margin_gain_ci_high"], kind="score interval")
        parts.append(f"Margin gain, which the gate reads: against the {baseline} model, the final model widened the "
                     f"chosen answer's lead over the rejected one (summed log-probability, what a DPO stage trains) on "
                     f"{m['preference_margin_widened']} of {pairs} pairs and narrowed it on "
                     f"{m['preference_margin_narrowed']}: {number(m['preference_margin_gain'], True)} "
                     f"({gain})"
                     f"{_margin_size(m)}. Verbose rejected answers can hold the accuracy still while the margins "
                     "move.")
    if "sft_score" in m:
        parts.append(f"The preference stage changed `{m['primary_metric']}` by {number(m['delta_vs_sft'], True)} "
                     f"({_interval(m['delta_vs_sft_ci_low'], m['delta_vs_sft_ci_high'])}) and forgetting from "
                     f"{number(m['sft_forgetting'])} to {number(m['forgetting'])}.")
    return "\n\n".join(parts)


def _message(record: dict[str, Any]) -> str:
    """A held-out row's message for a table: a conversation of several user turns shown to its last (the one
    answered) where it must be cut."""
    return clipped_start(record["message"]) if record.get("user_turns", 1) > 1 else record["message"]


def showcase(records: list[dict[str, Any]], improvements: bool, delta: str = "delta") -> str:
    """The SHOWCASE_ROWS largest improvements (or worst regressions) of the primary metric over the base (`delta`;
    `delta_vs_fewshot`: over few-shot), side by side, the change titled by what it is over; with final answers, the
    extracted final answers and the fine-tuned model's whole answer. The most common label, the same on every row,
    is left out."""
    sign = 1 if improvements else -1
    picked = sorted((r for r in records if sign * r[delta] > 0), key=lambda r: (-sign * r[delta], r["id"]))
    if not picked:
        return "_none_"
    sides = [side for side in SIDES if f"{side}_answer" in picked[0] and side != "majority"]
    change = "fine-tuned − few-shot" if delta == "delta_vs_fewshot" else "fine-tuned − base"
    if "reference_final_answer" in picked[0]:
        header = ["user message", "reference final answer", *(f"{SIDES[s]} final answer" for s in sides),
                  "fine-tuned answer", change]
        rows = [[_message(r), r["reference_final_answer"], *(number(r[f"{side}_final_answer"]) for side in sides),
                 r["finetuned_answer"], number(r[delta], True)] for r in picked[:SHOWCASE_ROWS]]
        return markdown_table(header, rows)
    rows = [[_message(r), r["reference"], *(r[f"{side}_answer"] for side in sides), number(r[delta], True)]
            for r in picked[:SHOWCASE_ROWS]]
    return markdown_table(["user message", "reference", *(f"{SIDES[s]} answer" for s in sides), change], rows)


def showcases(metrics: dict[str, Any], records: list[dict[str, Any]]) -> list[str]:
    """The largest improvements and worst regressions, titled; over few-shot where the base answered too few rows in
    the task's form for its row-by-row changes to say anything but that."""
    delta, over = "delta", ""
    if base_out_of_form(metrics) and records and "delta_vs_fewshot" in records[0]:
        delta, over = "delta_vs_fewshot", " over few-shot (the base answered too few rows in the task's form)"
    return [f"## Largest improvements{over}", showcase(records, True, delta),
            f"## Worst regressions{over}", showcase(records, False, delta)]


def length_table(records: list[dict[str, Any]], primary: str) -> str | None:
    """Each model's primary metric and the fine-tuned gain over the base per quarter of the held-out rows by the
    length of the user's message (words; rows of one length stay in one group, so groups may differ in size):
    whether long inputs fare worse. None for fewer than MIN_LENGTH_ROWS rows or messages of one length."""
    import numpy as np

    words = np.array([len(loose_words(record["message"])) for record in records])
    if len(records) < MIN_LENGTH_ROWS or words.min() == words.max():
        return None
    sides = [side for side in SIDES if f"{side}_{primary}" in records[0]]
    shorter = np.searchsorted(np.sort(words), words)  # how many rows are shorter than each
    quarters = shorter * LENGTH_GROUPS // len(words)
    rows = []
    for quarter in np.unique(quarters):
        group = np.flatnonzero(quarters == quarter)
        low, high = words[group].min(), words[group].max()
        rows.append(_group_row(f"{low}–{high}" if low < high else str(low), [records[i] for i in group], sides, primary))
    return markdown_table(["message words", "rows", *(SIDES[s] for s in sides), "fine-tuned − base"], rows)


def _group_row(title: str, group: list[dict[str, Any]], sides: list[str], primary: str) -> list:
    """A table row: the group's title and size, each model's mean primary metric and the fine-tuned gain."""
    mean = {side: sum(record[f"{side}_{primary}"] for record in group) / len(group) for side in sides}
    return [title, len(group), *(number(mean[side]) for side in sides), number(mean["finetuned"] - mean["base"], True)]


def trained_length_table(records: list[dict[str, Any]], metrics: dict[str, Any]) -> str | None:
    """The held-out rows longer than the fine-tuned model's training.max_length and the others, scored apart (None:
    no such row, or the model's training is not known)."""
    trained, primary = metrics.get("trained_length"), metrics["primary_metric"]
    if not trained or not trained["rows_over"]:
        return None
    sides = [side for side in SIDES if f"{side}_{primary}" in records[0]]
    longer = [record for record in records if record["over_max_length"]]
    within = [record for record in records if not record["over_max_length"]]
    rows = [_group_row(title, group, sides, primary) for title, group in
            ((f"over {trained['max_length']} tokens", longer), ("the others", within)) if group]
    done = LONG_TRAIN_ROWS[trained["too_long"]]
    return (f"{len(longer)} of {len(records)} held-out rows are longer than training.max_length ({trained['max_length']} "
            f"tokens). Train rows that long were {done}, so the model never learned from whole inputs "
            f"that long:\n\n" + markdown_table(["held-out rows", "rows", *(SIDES[s] for s in sides), "fine-tuned − base"], rows))


def _preference(metrics: dict[str, Any], prefix: str, what: str) -> str:
    low, high = metrics[f"{prefix}_win_rate_ci_low"], metrics[f"{prefix}_win_rate_ci_high"]
    return (f"{what}: the fine-tuned model against the base {metrics[f'{prefix}_wins']} wins, "
            f"{metrics[f'{prefix}_ties']} ties, {metrics[f'{prefix}_losses']} losses; win rate "
            f"{number(metrics[f'{prefix}_win_rate'])} (a tie counts half, 0.5 is no preference; "
            f"{_interval(low, high, signed=False, kind='score interval')}).")


def preferences(metrics: dict[str, Any], config: EvaluationConfig) -> str | None:
    """The LLM judge's and the human reviewers' pairwise verdicts, and how far they agree (None: neither)."""
    parts = []
    if metrics["judge_pairs"]:
        unclear = metrics["judge_unclear_replies"]
        parts.append(_preference(metrics, "judge", f"LLM judge on {metrics['judge_pairs']} pairs, each asked in both "
                                                   "orders (a win only when both agree)")
                     + (f" {unclear} replies were not A, B or tie." if unclear else ""))
    if metrics["human_verdicts"]:
        parts.append(_preference(metrics, "human", f"Blind human review, {metrics['human_verdicts']} verdicts"))
    elif config.require_human_review:
        parts.append(f"No human verdicts yet: the gate waits for {config.require_human_review}.")
    if metrics["judge_human_agreement"] is not None:
        parts.append(f"The judge agrees with {number(metrics['judge_human_agreement'])} of the "
                     f"{metrics['judge_human_pairs']} human verdicts on rows it judged.")
    return "\n\n".join(parts) or None


def skill_table(skills: dict[str, dict[str, float]]) -> str:
    """Probe accuracy of both models and forgetting for each skill, and which skills can show it only by their loss
    (the base model answers none of their rows right)."""
    rows = [[skill, s["rows"], number(s["base"]), number(s["finetuned"]), number(s["finetuned"] - s["base"], True),
             f"{number(s['forgetting'])} ({number(s['forgetting_ci_low'])} … {number(s['forgetting_ci_high'])})"]
            for skill, s in skills.items()]
    table = markdown_table(["skill", "rows", "base", "fine-tuned", "change", "forgetting (95% CI)"], rows)
    unanswered = [skill for skill, s in skills.items() if s["base"] == 0]
    if not unanswered:
        return table
    return (f"{table}\n\nThe base model answers no row of {', '.join(unanswered)} right: accuracy cannot drop there, "
            "so only the reference loss can show forgetting.")


def probe_changes(changes: list[dict[str, Any]]) -> str:
    """The probe rows the fine-tuned model lost (then gained) against the base, side by side."""
    if not changes:
        return "_none_"
    rows = [[c["id"], c["skill"], c["message"], c["reference"], c["base_answer"], c["finetuned_answer"], c["change"]]
            for c in changes[:PROBE_CHANGES_SHOWN]]
    table = markdown_table(["id", "skill", "message", "reference", "base answer", "fine-tuned answer", "change"], rows)
    hidden = len(changes) - PROBE_CHANGES_SHOWN
    return table + (f"\n\n{hidden} more in metrics.json (`probe_changes`)." if hidden > 0 else "")


def task_sections(metrics: dict[str, Any], records: list[dict[str, Any]], config: EvaluationConfig,
                  sides: tuple[str, ...] = ("finetuned", "fewshot", "base")) -> list[tuple[str, str]]:
    """The task type's own sections (title, markdown), such as a classification's confusion tables, for the models of
    `sides` that `metrics` evaluated."""
    titles = {side: SIDES[side] for side in sides if side in metrics["metrics"]}
    return task_metrics(config).report_sections(records, titles)


def report_markdown(metrics: dict[str, Any], records: list[dict[str, Any]], config: EvaluationConfig) -> str:
    """The whole report: gate verdict, overview, metrics table, the chart of gains and forgetting (`chart.CHART`), the
    models before and after a preference stage, the task type's sections, the judge's and the human verdicts, the
    scores by message length, the largest improvements and regressions, and the probe rows that changed."""
    passed, failed = decide_gate(metrics, config)
    parts = ["# Evaluation: base vs fine-tuned",
             verdict(passed, failed, config, "preference_pairs" in metrics, gate_caveat(metrics, config)),
             overview(metrics), summary_table(metrics), LOSS_NOTE, CHART_LINK]
    if (stages := preference_tuning(metrics)) is not None:
        parts += ["## Preference tuning", stages]
    for title, section in task_sections(metrics, records, config):
        parts += [f"## {title}", section]
    if (preferred := preferences(metrics, config)) is not None:
        parts += ["## Pairwise preference (fine-tuned vs base)", preferred]
    if (by_length := length_table(records, metrics["primary_metric"])) is not None:
        parts += [f"## {metrics['primary_metric']} by message length", by_length]
    if (over := trained_length_table(records, metrics)) is not None:
        parts += ["## Rows longer than the training's max_length", over]
    parts += showcases(metrics, records)
    if metrics["probe_rows"]:
        parts += ["## General-skills probe", skill_table(metrics["probe_accuracy_by_skill"]),
                  "### Rows that changed (base → fine-tuned)", probe_changes(metrics["probe_changes"])]
    return "\n\n".join(parts) + "\n"
