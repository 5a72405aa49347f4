"""The eval gate, decided from stored measurements with the run's effective config: changing a threshold
re-decides it without generating anything (the thresholds are not part of the evaluation's reuse key)."""

from __future__ import annotations

from typing import Any

from ftpipe.config import EvaluationConfig
from ftpipe.core.evaluation.preference import margin_words

GATE_FIELDS = frozenset({"min_improvement", "min_preference_gain", "max_forgetting", "require_beats_fewshot",
                         "require_beats_majority", "require_human_review"})
BASELINES = {  # a baseline the gate may require beating (`require_beats_<name>`): its name, and why it may be missing
    "fewshot": ("few-shot", "no few-shot baseline was measured (no train rows or fewshot_k 0)"),
    "majority": ("most common label", "no most-common-label baseline was measured (not a classification, or no "
                                      "labelled train rows)"),
}


def _gain(metrics: dict[str, Any], config: EvaluationConfig) -> str | None:
    if metrics["delta_ci_low"] > config.min_improvement:
        return None
    return (f"delta_ci_low {metrics['delta_ci_low']:.3f} <= min_improvement {config.min_improvement:.3f} "
            f"({metrics['primary_metric']} {metrics['base_score']:.3f} -> {metrics['finetuned_score']:.3f})"
            + _finer_metric(metrics))


def _finer_metric(metrics: dict[str, Any]) -> str:
    """For an extraction judged by the exact match of whole objects: how its share of fields right rose, and the
    setting that judges that instead ("" when it did not rise, or another metric is judged)."""
    found = {side: metrics.get("metrics", {}).get(side, {}).get("field_accuracy") for side in ("base", "finetuned")}
    if metrics["primary_metric"] != "exact_match" or None in found.values() or found["finetuned"] <= found["base"]:
        return ""
    return (f"; its field_accuracy rose {found['base']:.3f} -> {found['finetuned']:.3f}: evaluation.extraction_metric: "
            "field_accuracy judges the share of fields right instead, finer on few rows or objects of many fields")


FORGET_LESS = ("to forget less: a lower training.learning_rate, fewer training.epochs (or training.max_steps) or more "
               "training.replay")
REPLAY_FIRST = ("to forget less: training.replay (none in this training; 0.2 mixes the base model's own answers to "
                "general prompts into a fifth of the train rows), a lower training.learning_rate or fewer "
                "training.epochs (or training.max_steps)")


def _forget_less(metrics: dict[str, Any]) -> str:
    """What to change to forget less: replay first where the training mixed in none."""
    return REPLAY_FIRST if metrics.get("trained_replay") == 0 else FORGET_LESS


def _forgetting(metrics: dict[str, Any], config: EvaluationConfig) -> str | None:
    if metrics["forgetting_ci_low"] > config.max_forgetting:
        return (f"forgetting {metrics['forgetting']:.3f} (95% CI {metrics['forgetting_ci_low']:.3f} … "
                f"{metrics['forgetting_ci_high']:.3f}): CI low > max_forgetting {config.max_forgetting:.3f} "
                f"(probe accuracy {metrics['probe_base_accuracy']:.3f} -> {metrics['probe_finetuned_accuracy']:.3f}, "
                f"probe loss {metrics['probe_base_loss']:.3f} -> {metrics['probe_finetuned_loss']:.3f}); "
                f"{_forget_less(metrics)}")
    skills = metrics["probe_accuracy_by_skill"]
    forgotten = [(name, s) for name, s in skills.items() if s["forgetting_ci_low"] > config.max_forgetting]
    if len(skills) < 2 or not forgotten:
        return None
    name, worst = max(forgotten, key=lambda found: found[1]["forgetting_ci_low"])
    return (f"forgetting of the probe's {name} skill {worst['forgetting']:.3f} (95% CI {worst['forgetting_ci_low']:.3f} "
            f"… {worst['forgetting_ci_high']:.3f}): CI low > max_forgetting {config.max_forgetting:.3f} (its accuracy "
            f"{worst['base']:.3f} -> {worst['finetuned']:.3f}, over {worst['rows']} rows; the whole probe's forgetting "
            f"{metrics['forgetting']:.3f}); {_forget_less(metrics)}")


def _beats(baseline: str):
    """The check of `require_beats_<baseline>`: the gain over that baseline has a CI low above `min_improvement`."""
    def check(metrics: dict[str, Any], config: EvaluationConfig) -> str | None:
        if not getattr(config, f"require_beats_{baseline}"):
            return None
        name, missing = BASELINES[baseline]
        if metrics.get(f"{baseline}_score") is None:
            return f"require_beats_{baseline}, but {missing}"
        low = metrics[f"delta_vs_{baseline}_ci_low"]
        if low > config.min_improvement:
            return None
        return (f"delta_vs_{baseline}_ci_low {low:.3f} <= min_improvement {config.min_improvement:.3f} "
                f"({metrics['primary_metric']} {name} {metrics[f'{baseline}_score']:.3f} -> fine-tuned "
                f"{metrics['finetuned_score']:.3f})")
    return check


def _preference_gain(metrics: dict[str, Any], config: EvaluationConfig) -> str | None:
    low = metrics.get("preference_margin_gain_ci_low")  # None: no preference pairs were evaluated
    if low is None or low > config.min_preference_gain:
        return None
    return (f"preference_margin_gain_ci_low {low:.3f} <= min_preference_gain {config.min_preference_gain:.3f} "
            f"({margin_words(metrics)})")


def _baseline_higher(metrics: dict[str, Any], baseline: str, what: str) -> str | None:
    """`what` scores higher than the fine-tuned model: the gain over `baseline` has a 95% CI high below 0."""
    high = metrics.get(f"delta_vs_{baseline}_ci_high")
    if high is None or high >= 0:
        return None
    return (f"{what} scores higher ({metrics[f'{baseline}_score']:.3f} against {metrics['finetuned_score']:.3f}, the "
            f"gain over it has a 95% CI high of {high:+.3f})")


def _fewshot_caveat(metrics: dict[str, Any], config: EvaluationConfig) -> str | None:
    found = None if config.require_beats_fewshot else _baseline_higher(metrics, "fewshot",
                                                                       "few-shot prompting of the base model")
    return found and f"{found}; evaluation.require_beats_fewshot: true holds such a model back"


def _copy_caveat(metrics: dict[str, Any]) -> str | None:
    found = _baseline_higher(metrics, "copy", "copying the opening of the user's message")
    return found and f"{found}: the metric rewards words taken from the input"


def _majority_caveat(metrics: dict[str, Any], config: EvaluationConfig) -> str | None:
    found = None if config.require_beats_majority else _baseline_higher(
        metrics, "majority", "answering every row with the train rows' most common label")
    return found and (f"{found}: the model tells the labels apart worse than no model; "
                      "evaluation.require_beats_majority: true holds such a model back")


def _preference_caveat(metrics: dict[str, Any]) -> str | None:
    if metrics.get("sft_score") is None or metrics.get("preference_pairs"):
        return None  # no preference stage, or its pairs were checked
    return ("no held-out preference pair (a chosen and a rejected answer) checked what the preference stage changed: "
            "the gate judged the task metric and forgetting only")


def gate_caveat(metrics: dict[str, Any], config: EvaluationConfig) -> str | None:
    """What a passed gate does not say, None when nothing: that few-shot prompting of the base model scores higher
    (the gain over it has a 95% CI high below 0) while the gate does not require beating it, that a copy of the
    input does (free text), or the most common label as every answer (classification) unless required, or that no
    held-out pair checked a preference stage (KTO's single answers, or too few pairs for the held-out split)."""
    caveats = [found for found in (_fewshot_caveat(metrics, config), _copy_caveat(metrics),
                                   _majority_caveat(metrics, config), _preference_caveat(metrics)) if found]
    return "; and ".join(caveats) or None


def waiting_for_reviews(have: int, config: EvaluationConfig) -> str | None:
    """With `require_human_review` N, why the model waits (fewer than N human verdicts on its answers), else None."""
    if have >= config.require_human_review:
        return None
    return f"waiting for {config.require_human_review} human verdicts (have {have})"


def decide_gate(metrics: dict[str, Any], config: EvaluationConfig) -> tuple[bool, list[str]]:
    """(passed, the unmet conditions as sentences with their numbers). The conditions:

    - the primary metric's gain over the base model has a 95% CI low above `min_improvement` (by default: evidence of
      a gain; a model that only ties the base is not promoted);
    - forgetting fails only on evidence: when its 95% CI low is above `max_forgetting` (a few probe rows
      changing by chance cannot fail the gate);
    - with `require_beats_fewshot` (`require_beats_majority`), the gain over the few-shot baseline (the train rows'
      most common label as every answer) has a CI low above `min_improvement`;
    - with held-out preference pairs, the final model's margin gain over the SFT model (over the base without one:
      the share of pairs whose chosen answer it favours more, less the share it favours less) has a CI low above
      `min_preference_gain`.

    Human verdicts arrive after the evaluation, so `waiting_for_reviews` is a gate of its own (on `human_review`).
    """
    checks = (_gain, _forgetting, *map(_beats, BASELINES), _preference_gain)
    failures = [failure for check in checks if (failure := check(metrics, config))]
    return not failures, failures
