"""The evaluation at a glance, beside report.md: the fine-tuned model's gain over each baseline and its forgetting on
the general-skills probe (the whole probe and each skill), each with its 95% interval."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from ftpipe.config import EvaluationConfig
from ftpipe.core.plots import Bar, Interval, markdown_image, plot_intervals
from ftpipe.core.storage import atomic_file

CHART = "scores.png"
CHART_TITLE = "The fine-tuned model's gains and forgetting, with their 95% intervals"
CHART_LINK = f"![{CHART_TITLE}]({CHART})"
BASELINES = (("", "the base model"), ("_vs_fewshot", "few-shot"), ("_vs_majority", "the most common label"),
             ("_vs_copy", "a copy of the message"), ("_vs_sft", "the SFT model"))


def gains(metrics: dict[str, Any]) -> list[Interval]:
    """The primary metric's gain over each baseline the evaluation has an interval for."""
    return [(f"over {name}", metrics[f"delta{suffix}"], metrics[f"delta{suffix}_ci_low"],
             metrics[f"delta{suffix}_ci_high"])
            for suffix, name in BASELINES if metrics.get(f"delta{suffix}_ci_low") is not None]


def forgetting(metrics: dict[str, Any]) -> list[Interval]:
    """Forgetting over the whole probe, then by skill when it has more than one; none without a probe."""
    if not metrics["probe_rows"]:
        return []
    skills = metrics["probe_accuracy_by_skill"]
    by_skill = [(skill, s["forgetting"], s["forgetting_ci_low"], s["forgetting_ci_high"]) for skill, s in skills.items()]
    whole = ("whole probe", metrics["forgetting"], metrics["forgetting_ci_low"], metrics["forgetting_ci_high"])
    return [whole, *(by_skill if len(skills) > 1 else [])]


def write_chart(metrics: dict[str, Any], folder: Path, config: EvaluationConfig) -> Path:
    """The chart of `metrics` (an evaluation's measurements) as CHART in `folder`, with the gate's bars of `config`:
    `max_forgetting`, and `min_improvement` where it is not 0 (a line at 0 is drawn anyway)."""
    gain, forgot = (f"{metrics['primary_metric']} gain of the fine-tuned model (95% CI)",
                    "forgetting: the probe's relative worsening (95% CI)")
    panels = {gain: gains(metrics), forgot: forgetting(metrics)}
    bars: dict[str, Bar] = {forgot: (config.max_forgetting, f"gate: max_forgetting {config.max_forgetting:g}")}
    if config.min_improvement:
        bars[gain] = (config.min_improvement, f"gate: min_improvement {config.min_improvement:g} (over the base model)")
    with atomic_file(folder / CHART) as tmp:
        plot_intervals({title: found for title, found in panels.items() if found}, tmp, bars)
    return folder / CHART


def inline_chart(markdown: str, folder: Path) -> str:
    """`markdown` (a report linking CHART) with the chart of `folder` embedded, for views that cannot follow the link
    (the Dagster UI)."""
    return markdown.replace(CHART_LINK, markdown_image(folder / CHART, CHART_TITLE))
