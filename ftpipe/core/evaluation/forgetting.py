"""Forgetting: how much worse the fine-tuned model does than the base on a general-skills probe, over the whole probe
and for each of its skills (gains in one skill can hide losses in another), each with a paired bootstrap interval,
and which probe rows changed between the two."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from ftpipe.core.evaluation.probe import probe_correct
from ftpipe.core.evaluation.statistics import bootstrap_interval
from ftpipe.core.records import user_message

if TYPE_CHECKING:
    from ftpipe.core.evaluation.outputs import ModelOutputs

EPS = 1e-9


def forgetting_score(base_accuracy, tuned_accuracy, base_loss, tuned_loss):
    """Relative worsening on the probe, for numbers or arrays (one value per resample):

        max(0, (base_acc - tuned_acc) / max(base_acc, eps), (tuned_loss - base_loss) / max(base_loss, eps))

    i.e. the larger of the relative accuracy drop and the relative reference-loss increase, floored at 0.
    """
    import numpy as np

    accuracy_drop = (base_accuracy - tuned_accuracy) / np.maximum(base_accuracy, EPS)
    loss_increase = (tuned_loss - base_loss) / np.maximum(base_loss, EPS)
    return np.maximum(0.0, np.maximum(accuracy_drop, loss_increase))


class _ProbeSide:
    """One model's per-row probe outcomes; accuracy and token-weighted loss over index matrices (one row each)."""

    def __init__(self, outputs: ModelOutputs, probe: list[dict]):
        import numpy as np

        self.correct = np.array([probe_correct(a, row) for a, row in zip(outputs.probe_answers, probe)], dtype=float)
        self.logprobs = np.asarray(outputs.probe_logprobs, dtype=float)
        self.tokens = np.asarray(outputs.probe_tokens, dtype=float)

    def accuracy(self, rows):
        return self.correct[rows].mean(axis=1)

    def loss(self, rows):
        return -self.logprobs[rows].sum(axis=1) / self.tokens[rows].sum(axis=1).clip(min=1)


def by_skill(probe: list[dict], before: _ProbeSide, after: _ProbeSide, samples: int,
             seed: int) -> dict[str, dict[str, float]]:
    """For each skill: its probe rows, both models' accuracy, and its forgetting with a 95% paired-bootstrap interval
    over its own rows."""
    import numpy as np

    skills = [row.get("skill", "") for row in probe]
    found = {}
    for number, skill in enumerate(sorted(set(skills))):
        rows = np.array([i for i, name in enumerate(skills) if name == skill])

        def forgetting(drawn, rows=rows):
            picked = rows[drawn]
            return forgetting_score(before.accuracy(picked), after.accuracy(picked), before.loss(picked),
                                    after.loss(picked))

        low, high = bootstrap_interval(len(rows), forgetting, samples, seed + number)
        found[skill] = {"rows": len(rows), "base": float(before.correct[rows].mean()),
                        "finetuned": float(after.correct[rows].mean()),
                        "forgetting": float(forgetting(np.arange(len(rows))[None, :])[0]),
                        "forgetting_ci_low": low, "forgetting_ci_high": high}
    return found


def most_forgotten(skills: dict[str, dict[str, float]]) -> str:
    """The skill that lost the most (`by_skill`), with its forgetting and interval, in a few words; "none" when no
    skill lost anything or the probe has one skill."""
    if len(skills) < 2:
        return "none"
    name, worst = max(skills.items(), key=lambda item: (item[1]["forgetting"], item[0]))
    if worst["forgetting"] <= 0:
        return "none"
    return (f"{name} {worst['forgetting']:.3f} (95% CI {worst['forgetting_ci_low']:.3f} … "
            f"{worst['forgetting_ci_high']:.3f}, {worst['rows']} rows)")


def forgetting_words(forgetting: float, most: str) -> str:
    """Forgetting in a few words, with the skill that lost the most (`most_forgotten`), which the whole probe's
    figure can hide."""
    return f"forgetting {forgetting:.3f}" + ("" if most == "none" else
                                            f" over the whole probe, the most in one skill: {most}")


def changed_rows(probe: list[dict], base: ModelOutputs, tuned: ModelOutputs, base_correct, tuned_correct) -> list[dict]:
    """The probe rows that one model answers right and the other wrong: those lost first, then those gained."""
    changed = [
        {"id": row["id"], "skill": row.get("skill", ""), "message": user_message(row["messages"]),
         "reference": row["reference"], "base_answer": base.probe_answers[i],
         "finetuned_answer": tuned.probe_answers[i],
         "change": "lost" if base_correct[i] else "gained"}
        for i, row in enumerate(probe) if base_correct[i] != tuned_correct[i]
    ]
    return sorted(changed, key=lambda row: (row["change"] != "lost", row["id"]))


def measure_forgetting(probe: list[dict], base: ModelOutputs, tuned: ModelOutputs, samples: int,
                       seed: int) -> dict[str, Any]:
    """Probe accuracies and losses of both models, `forgetting` with its 95% paired-bootstrap interval
    (`forgetting_ci_low`, `forgetting_ci_high`), the same by skill and the changed rows; forgetting 0 without a
    probe."""
    if not probe:
        return {"probe_rows": 0, "probe_base_accuracy": None, "probe_finetuned_accuracy": None,
                "probe_base_loss": None, "probe_finetuned_loss": None, "forgetting": 0.0,
                "forgetting_ci_low": 0.0, "forgetting_ci_high": 0.0, "probe_accuracy_by_skill": {},
                "probe_changes": []}
    import numpy as np

    before, after = _ProbeSide(base, probe), _ProbeSide(tuned, probe)

    def forgetting(rows):
        return forgetting_score(before.accuracy(rows), after.accuracy(rows), before.loss(rows), after.loss(rows))

    every_row = np.arange(len(probe))[None, :]
    low, high = bootstrap_interval(len(probe), forgetting, samples, seed)
    return {
        "probe_rows": len(probe),
        "probe_base_accuracy": float(before.accuracy(every_row)[0]),
        "probe_finetuned_accuracy": float(after.accuracy(every_row)[0]),
        "probe_base_loss": float(before.loss(every_row)[0]),
        "probe_finetuned_loss": float(after.loss(every_row)[0]),
        "forgetting": float(forgetting(every_row)[0]), "forgetting_ci_low": low, "forgetting_ci_high": high,
        "probe_accuracy_by_skill": by_skill(probe, before, after, samples, seed),
        "probe_changes": changed_rows(probe, base, tuned, before.correct, after.correct),
    }
