"""The `distill` objective for real: a fine-tuned tiny model is distilled into a fresh copy of its base with TRL's
GKD trainer (supervised, as on a CPU by default), and the student's held-out loss moves toward the teacher's."""

from __future__ import annotations

from pathlib import Path

import pytest

from ftpipe.config import TaskConfigError, parse_task_config
from ftpipe.core.evaluation.generation import conversation_logprobs, load_finetuned, load_model, loss_of
from ftpipe.core.records import read_examples
from ftpipe_tests.tiny_model import toy_rows
from ftpipe_tests.trained_models import full_finetune
from ftpipe_tests.training_program import output_result, run_to_end, toy_workspace, write_spec


def held_out_loss(model_and_tokenizer, root: Path) -> float:
    model, tokenizer = model_and_tokenizer
    rows = read_examples(root / "eval.parquet")
    return loss_of(conversation_logprobs(model, tokenizer, [r["messages"] for r in rows], 8))[0]


@pytest.mark.slow
def test_a_student_distilled_from_a_fine_tuned_teacher_approaches_its_held_out_loss(tmp_path, tiny_model_dir):
    root = toy_workspace(tmp_path / "work", tiny_model_dir)
    teacher = full_finetune(tiny_model_dir, tmp_path / "teacher", toy_rows(40, seed=1), steps=60)
    spec = write_spec(root, "student", objective="distill", teacher_model=str(teacher), adapter="none", max_steps=30)
    run_to_end(root, spec)
    result = output_result(spec)
    assert result.produced["method"] == "full" and result.metadata["on_policy_share"] == 0.0

    before = held_out_loss(load_model(tiny_model_dir), root)
    after = held_out_loss(load_finetuned(result.metadata["adapter_path"], lambda: load_model(tiny_model_dir)), root)
    target = held_out_loss(load_model(teacher), root)
    assert target < before, "the teacher knows the task better than its base"
    assert abs(after - target) < 0.5 * abs(before - target), (before, after, target)


def test_distill_needs_a_teacher_and_comes_first():
    with pytest.raises(TaskConfigError, match="need teacher_model"):
        parse_task_config("training: {stages: [distill]}", "task.yaml")
    with pytest.raises(TaskConfigError, match=r"stages must be \[sft \| distill\]"):
        parse_task_config("training: {stages: [dpo, distill], teacher_model: x}", "task.yaml")
    config = parse_task_config("training: {stages: [distill, dpo], teacher_model: x}", "task.yaml").training
    assert config.for_stage("distill").recipe()["teacher_model"] == "x"
    assert "teacher_model" not in config.for_stage("sft").recipe()  # an SFT fingerprint is as before
