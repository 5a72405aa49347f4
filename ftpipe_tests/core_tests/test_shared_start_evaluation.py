"""The training's evaluation passes on rows that share a long system prompt: the start runs once an evaluation, and
the eval loss, token accuracy and entropy are TRL's own, padding-free or padded."""

from __future__ import annotations

import pytest

from ftpipe.core.training import sft, shared_start
from ftpipe_tests.tiny_model import long_system_prompt, toy_rows, with_system
from ftpipe_tests.trained_models import competent_base
from ftpipe_tests.training_program import evaluating_trainer, toy_workspace

METRICS = ("eval_loss", "eval_mean_token_accuracy", "eval_entropy")


def with_system_prompt(rows: list[dict]) -> list[dict]:
    return [{**row, "messages": with_system(row["messages"], long_system_prompt(8))} for row in rows]


@pytest.fixture(scope="module")
def workspace(tmp_path_factory, tiny_model_dir):
    made = tmp_path_factory.mktemp("shared-start")
    return toy_workspace(made, competent_base(tiny_model_dir, made / "competent"))  # it names colors: scores to match


def trainer_on_long_system_prompts(workspace, name: str):
    import torch

    said = []  # the train rows too carry the long system prompt: a pass holds one whole row, but 8 rows' rests
    trainer = evaluating_trainer(workspace, name, with_system_prompt(toy_rows(10, seed=9)),
                                 with_system_prompt(toy_rows(40, seed=1)), said=said.append, max_length=400)
    assert trainer.args.per_device_eval_batch_size == 8
    assert any(line.startswith("evaluations: the ") and line.endswith("start every eval row shares read once, each "
                                                                       "row's rest after it (8 rows a pass)")
               for line in said), said
    torch.manual_seed(0)
    with torch.no_grad():  # an adapter that changes the scores a little
        for parameter in trainer.model.parameters():
            if parameter.requires_grad:
                parameter.normal_(0, 0.01)
    return trainer


def evaluate(trainer) -> tuple[dict[str, float], list[tuple[int, int]]]:
    """The evaluation's metrics and the (rows, tokens) shapes of the model's passes."""
    shapes = []
    hook = trainer.model.get_input_embeddings().register_forward_hook(
        lambda module, inputs, output: shapes.append(tuple(inputs[0].shape)))
    try:
        return trainer.evaluate(), shapes
    finally:
        hook.remove()


@pytest.mark.parametrize("flat", [True, False])  # padding-free batches, as on a CPU; padded ones, as on a GPU
def test_a_long_shared_system_prompt_runs_once_an_evaluation_for_trls_loss_accuracy_and_entropy(
        workspace, monkeypatch, flat) -> None:
    if not flat:
        monkeypatch.setattr(sft, "padding_free", lambda *args: False)
    trainer = trainer_on_long_system_prompts(workspace, f"shared-{flat}")
    assert trainer.args.padding_free == flat
    shared, shared_passes = evaluate(trainer)
    minimum = shared_start.MIN_SHARED_TOKENS
    monkeypatch.setattr(shared_start, "MIN_SHARED_TOKENS", 10**9)  # every row read whole, by TRL's step
    whole, whole_passes = evaluate(trainer)
    assert {key: shared[key] for key in METRICS} == pytest.approx({key: whole[key] for key in METRICS}, rel=1e-4)
    assert 0 < shared["eval_mean_token_accuracy"] < 1 and shared["eval_loss"] > 0.1
    [start] = [tokens for rows, tokens in shared_passes if tokens >= minimum]
    assert shared_passes[0] == (1, start) and len(shared_passes) == 3, "the start once, then 8 rows' rests and 2"
    read = sum(rows * tokens for rows, tokens in shared_passes)
    assert read < sum(rows * tokens for rows, tokens in whole_passes) / 4


def test_the_time_estimate_counts_a_long_shared_start_once_and_short_ones_with_every_row() -> None:
    long_start = [[7] * 100 + [i, i] for i in range(5)]
    assert shared_start.evaluated_lengths(long_start) == [100] + [2] * 5
    short_start = [[7] * 10 + [i] * 50 for i in range(5)]
    assert shared_start.evaluated_lengths(short_start) == [60] * 5
    assert shared_start.evaluated_lengths(long_start[:1]) == [102]
