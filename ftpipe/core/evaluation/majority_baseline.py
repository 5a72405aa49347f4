"""The majority baseline of classification tasks: every held-out row answered with the train rows' most common label.

On skewed labels, answering the largest label every time scores well on accuracy while telling nothing apart. The
report scores that answer beside the models, so a gain over a base model that answers in prose (or not at all) is
seen against what no model at all would score."""

from __future__ import annotations

from ftpipe.core.evaluation.metrics import TaskMetrics
from ftpipe.core.evaluation.metrics.classification import most_common
from ftpipe.core.evaluation.outputs import ModelOutputs


def majority_answer(train_rows: list[dict], task: TaskMetrics) -> str:
    """The answer most given among the train rows of the most common label, written as they write it (a JSON
    answer keeps its other fields)."""
    answers = [row["messages"][-1]["content"] for row in train_rows]
    labels = [task.expected_label(answer) for answer in answers]
    top = most_common(labels)
    return most_common([answer for answer, label in zip(answers, labels) if label == top])


def majority_outputs(heldout_rows: list[dict], train_rows: list[dict], task: TaskMetrics) -> ModelOutputs | None:
    """`majority_answer` as a model's answer to every held-out row; None without train rows."""
    if not train_rows:
        return None
    answer = majority_answer(train_rows, task)
    return ModelOutputs(ids=[row["id"] for row in heldout_rows], answers=[answer] * len(heldout_rows),
                        prompt_tokens=0.0)
