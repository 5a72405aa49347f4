"""The evaluation as a model card shows it: the gate's verdict with the thresholds it used, the scores against the
baselines, every metric of every model, the chart of gains and forgetting (its file copied beside the card), what a
preference stage changed, the task type's sections for the fine-tuned model, forgetting by probe skill, and the
settings the run changed."""

from __future__ import annotations

from typing import Any

import yaml

from ftpipe.config import EvaluationConfig
from ftpipe.core.evaluation.chart import CHART_LINK
from ftpipe.core.evaluation.forgetting import most_forgotten
from ftpipe.core.evaluation.gate import decide_gate, gate_caveat
from ftpipe.core.evaluation.report import (evidence, preference_tuning, skill_table, summary_table, task_sections,
                                          verdict)


def card_evaluation(metrics: dict[str, Any], config: EvaluationConfig, overrides: str = "") -> str:
    """Markdown for the model card from a published evaluation (`read_evaluation`), with the gate decided for
    `config`; the evaluation settings of `overrides` (task.yaml settings changed for the run, as YAML) are shown."""
    passed, failed = decide_gate(metrics, config)
    parts = [verdict(passed, failed, config, "preference_pairs" in metrics, gate_caveat(metrics, config)),
             " ".join(evidence(metrics)), summary_table(metrics), CHART_LINK]
    if (stages := preference_tuning(metrics)) is not None:
        parts += ["Preference tuning:", stages]
    for title, section in task_sections(metrics, metrics["records"], config, sides=("finetuned",)):
        parts += [f"{title}:", section]
    skills = metrics["probe_accuracy_by_skill"]
    if len(skills) > 1:
        parts += [f"Forgetting by probe skill (most forgotten: {most_forgotten(skills)}):", skill_table(skills)]
    if changed := (yaml.safe_load(overrides) or {}).get("evaluation"):
        settings = yaml.safe_dump({"evaluation": changed}, sort_keys=False).strip()
        parts.append(f"Evaluation settings changed from task.yaml for this run:\n\n```yaml\n{settings}\n```")
    return "\n\n".join(parts)
