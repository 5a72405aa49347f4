"""Task metrics, one entry per task type (`evaluation.task_type`): add a type by adding a `TaskMetrics` subclass."""

from __future__ import annotations

from collections.abc import Callable
from functools import partial

from ftpipe.config import EvaluationConfig
from ftpipe.core.evaluation.metrics.base import AnswerEnd, LabelChoices, Scores, TaskMetrics
from ftpipe.core.evaluation.metrics.classification import Classification, raw_label
from ftpipe.core.evaluation.metrics.extraction import Extraction
from ftpipe.core.evaluation.metrics.generation import Generation

TASK_TYPES: dict[str, type[TaskMetrics]] = {cls.name: cls for cls in (Classification, Extraction, Generation)}

__all__ = ["TASK_TYPES", "AnswerEnd", "LabelChoices", "Scores", "TaskMetrics", "answer_problem", "answer_rule",
           "check_references", "label_reader", "labels_missing_from", "shape_check", "shape_problems",
           "task_metrics"]


def task_metrics(config: EvaluationConfig) -> TaskMetrics:
    """The metrics of the configured task type."""
    return TASK_TYPES[config.task_type](config)


def label_reader(config: EvaluationConfig) -> Callable[[str], str | None] | None:
    """How to read a row's label, as written, from its answer, for task types with labels (None for the others)."""
    return partial(raw_label, label_field=config.label_field) if task_metrics(config).labelled else None


def labels_missing_from(config: EvaluationConfig, answers: list[str], others: list[str]) -> dict[str, int]:
    """The labels (as written) of `answers` that no answer of `others` has, each with its rows of `answers`, the
    largest first, for task types with labels (none for the others): of the train answers, labels the held-out scores
    say nothing about; of the held-out answers, labels no training shows the model."""
    task = task_metrics(config)
    return task.label_choices(others, answers).without_heldout_rows() if task.labelled else {}


def answer_problem(config: EvaluationConfig) -> Callable[[str], str | None]:
    """Why an answer could not serve as a reference of this task type, in one phrase naming the type (None: it
    could): rows with such answers are quarantined and corrections refused, rather than trained on or failing the
    evaluation that holds them out."""
    task = task_metrics(config)

    def problem(answer: str) -> str | None:
        found = task.reference_problem(answer)
        return f"the answer {found} (evaluation.task_type {task.name})" if found else None

    return problem


def shape_check(config: EvaluationConfig, answers: list[str]) -> Callable[[str], str | None]:
    """Why an answer departs from the form nearly all of a task's `answers` share, in one phrase naming the type
    (None: it does not): such rows are quarantined, as `answer_problem`'s are, and such corrections refused."""
    task = task_metrics(config)
    check = task.shape_check(answers)

    def problem(answer: str) -> str | None:
        found = check(answer)
        return f"the answer {found} (evaluation.task_type {task.name})" if found else None

    return problem


def shape_problems(config: EvaluationConfig) -> Callable[[list[str]], list[str | None]]:
    """Per answer of a task's rows, `shape_check` against all of them."""
    def problems(answers: list[str]) -> list[str | None]:
        return list(map(shape_check(config, answers), answers))

    return problems


def answer_rule(config: EvaluationConfig) -> str:
    """The settings `answer_problem` follows, and the rule of `shape_problems`, as one string (for reuse keys)."""
    settings = config.model_dump(include={"task_type", "label_field", "answer_pattern", "answer_field"})
    shape = task_metrics(config).shape_rule
    return repr(sorted(settings.items())) + (f"; {shape}" if shape else "")


def check_references(rows: list[dict], task: TaskMetrics) -> None:
    """Refuse references the metrics cannot read (before any generation)."""
    problems = [(row["id"], task.reference_problem(row["messages"][-1]["content"])) for row in rows]
    bad = [(row_id, problem) for row_id, problem in problems if problem]
    if bad:
        raise ValueError(f"{len(bad)} held-out reference(s) {bad[0][1]} (task_type {task.name}); "
                         f"ids: {[row_id for row_id, _ in bad[:5]]}")
