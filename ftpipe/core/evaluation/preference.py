"""Preference accuracy on held-out preference pairs: the share of pairs where a model gives the chosen answer a
higher log-probability per token than the rejected one, for the base, SFT and final models, and the final model's
gain with a paired bootstrap interval."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

from ftpipe.core.evaluation.statistics import paired_bootstrap
from ftpipe.core.preferences import is_paired, read_preferences

if TYPE_CHECKING:
    from ftpipe.core.evaluation.outputs import ModelOutputs

ANSWERS = ("chosen", "rejected")
MODELS = {"base": "base", "sft": "sft", "finetuned": "final"}  # output side -> name in the metrics


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


def measure_preference(outputs: dict[str, ModelOutputs], samples: int, seed: int) -> dict[str, Any]:
    """`preference_pairs`, `preference_accuracy_base`, `_sft` (None without an SFT model) and `_final`, and the final
    model's gain over `preference_baseline` (the SFT model, else the base) as `preference_delta` with its 95%
    paired-bootstrap interval; nothing when no pairs were scored."""
    correct = {MODELS[side]: produced.preference_correct for side, produced in outputs.items()
               if side in MODELS and produced.preference_correct is not None}
    if not correct.get("final"):
        return {}
    baseline = "sft" if "sft" in correct else "base"
    delta, low, high = paired_bootstrap(correct[baseline], correct["final"], samples, seed)
    accuracy = {f"preference_accuracy_{name}": sum(values) / len(values) if (values := correct.get(name)) else None
                for name in MODELS.values()}
    return {"preference_pairs": len(correct["final"]), **accuracy, "preference_baseline": baseline,
            "preference_delta": delta, "preference_delta_ci_low": low, "preference_delta_ci_high": high}
