"""Preference tuning measured on held-out preference pairs, for the base, SFT and final models:

- preference accuracy, the share of pairs where a model finds the chosen answer likelier per token than the rejected
  one: an absolute reading, which verbose rejected answers can hold at the same value for every model;
- the margin gain, which the gate reads: per pair, whether the final model widened or narrowed the chosen answer's
  lead over the rejected one (summed log-probabilities, what a DPO stage trains) against the model it was tuned from
  (the SFT model, else the base), as the share widened minus the share narrowed, with a score interval (a bootstrap's
  shrinks to a point where every pair moved one way).
"""

from __future__ import annotations

import statistics
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ftpipe.core.evaluation.statistics import mean_share_interval, paired_bootstrap
from ftpipe.core.preferences import is_paired, read_preferences

if TYPE_CHECKING:
    from ftpipe.core.evaluation.outputs import ModelOutputs

ANSWERS = ("chosen", "rejected")
MODELS = {"base": "base", "sft": "sft", "finetuned": "final"}  # output side -> name in the metrics
MARGIN_TOLERANCE = 1e-3  # nats: a pair's margin moving less than this is numerical noise, not a change


def read_pairs(path: Path | None, max_rows: int | None) -> list[dict]:
    """The paired rows of a preferences file, the first `max_rows` by id (all when None); none without a file."""
    pairs = [row for row in read_preferences(path) if is_paired(row)] if path else []
    return sorted(pairs, key=lambda row: row["id"])[:max_rows]


def pair_conversations(pairs: list[dict]) -> list[list[dict]]:
    """Each pair's prompt with its chosen answer, then with its rejected one."""
    return [pair["prompt"] + [{"role": "assistant", "content": pair[answer]}] for pair in pairs for answer in ANSWERS]


def mean_pair_logprobs(sums: list[tuple[float, int]]) -> list[tuple[float, float]]:
    """(chosen, rejected) mean token log-probability per pair, from `pair_conversations`' (sum, token count)."""
    means = [logprob / max(count, 1) for logprob, count in sums]
    return list(zip(means[::2], means[1::2]))


def chosen_preferred(sums: list[tuple[float, int]]) -> list[float]:
    """Per pair, 1.0 when the chosen answer has the strictly higher mean token log-probability, else 0.0."""
    return [float(chosen > rejected) for chosen, rejected in mean_pair_logprobs(sums)]


def margins(sums: list[tuple[float, int]]) -> list[float]:
    """Per pair, the chosen answer's summed log-probability minus the rejected one's."""
    totals = [logprob for logprob, _ in sums]
    return [chosen - rejected for chosen, rejected in zip(totals[::2], totals[1::2])]


def margin_changes(before: list[tuple[float, int]], after: list[tuple[float, int]]) -> list[float]:
    """Per pair, 1.0 where `after` widened the chosen answer's margin over `before` (by more than MARGIN_TOLERANCE),
    -1.0 where it narrowed it, else 0.0."""
    return [float(new - old > MARGIN_TOLERANCE) - float(old - new > MARGIN_TOLERANCE)
            for old, new in zip(margins(before), margins(after))]


def margin_words(metrics: dict[str, Any]) -> str:
    """How the final model moved the pairs' margins against its baseline, in a few words: how many, and by how much
    (a consistent nudge of every pair moves each of them, however little)."""
    median = metrics.get("preference_margin_change_median")  # None: an evaluation from before it was measured
    size = f", by a median {median:+.3g} nats" if median is not None else ""
    return (f"final vs {metrics['preference_baseline']}: the chosen answer's margin over the rejected one widened on "
            f"{metrics['preference_margin_widened']} and narrowed on {metrics['preference_margin_narrowed']} of "
            f"{metrics['preference_pairs']} pairs{size}")


def measure_preference(outputs: dict[str, ModelOutputs], samples: int, seed: int) -> dict[str, Any]:
    """`preference_pairs`, `preference_accuracy_base`, `_sft` (None without an SFT model) and `_final`, the final
    model's accuracy change over `preference_baseline` (the SFT model, else the base) as `preference_delta` with its
    95% paired-bootstrap interval, and its margin changes against that model: `preference_margin_widened`,
    `_narrowed` and `preference_margin_gain` (the share widened minus the share narrowed) with its 95% score
    interval, and the median change of a pair's margin in nats, `preference_margin_change_median`; nothing when no
    pairs were scored."""
    sums = {MODELS[side]: produced.preference_logprobs for side, produced in outputs.items()
            if side in MODELS and produced.preference_logprobs}
    if not sums.get("final"):
        return {}
    baseline = "sft" if "sft" in sums else "base"
    correct = {name: chosen_preferred(values) for name, values in sums.items()}
    accuracy = {f"preference_accuracy_{name}": sum(correct[name]) / len(correct[name]) if name in correct else None
                for name in MODELS.values()}
    delta, delta_low, delta_high = paired_bootstrap(correct[baseline], correct["final"], samples, seed)
    changes = margin_changes(sums[baseline], sums["final"])
    gain, low, high = (2 * share - 1 for share in mean_share_interval([(change + 1) / 2 for change in changes]))
    shifts = [new - old for old, new in zip(margins(sums[baseline]), margins(sums["final"]))]
    return {"preference_pairs": len(changes), **accuracy, "preference_baseline": baseline,
            "preference_delta": delta, "preference_delta_ci_low": delta_low, "preference_delta_ci_high": delta_high,
            "preference_margin_widened": changes.count(1.0), "preference_margin_narrowed": changes.count(-1.0),
            "preference_margin_gain": gain, "preference_margin_gain_ci_low": low,
            "preference_margin_gain_ci_high": high, "preference_margin_change_median": statistics.median(shifts)}
