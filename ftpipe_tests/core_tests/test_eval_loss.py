"""The training's eval loss is the mean over every scored token of the eval rows, whatever the eval batch size, and
also when the rows share a long system prompt read once an evaluation: the eval report's held-out loss."""

from __future__ import annotations

import pytest

from ftpipe.core.evaluation.generation import conversation_logprobs, loss_of
from ftpipe.core.training import sft, shared_start
from ftpipe.core.training.eval_loss import scored_tokens
from ftpipe_tests.tiny_model import long_system_prompt, toy_rows, with_system
from ftpipe_tests.trained_models import competent_base
from ftpipe_tests.training_program import evaluating_trainer, toy_workspace

LONG_ANSWER = "It is mostly red, sometimes with a little yellow or green near the stem, and brown when it is old."


@pytest.fixture(scope="module")
def workspace(tmp_path_factory, tiny_model_dir):
    made = tmp_path_factory.mktemp("eval-loss")
    return toy_workspace(made, competent_base(tiny_model_dir, made / "competent"))


def skewed_rows(system: str | None) -> list[dict]:
    """One-word answers, and every fourth a long one: rows that score very different numbers of tokens (after the
    `system` prompt, if given)."""
    rows = toy_rows(12, seed=4)
    for row in rows[::4]:
        row["messages"][-1]["content"] = LONG_ANSWER
    return [{**row, "messages": with_system(row["messages"], system)} for row in rows] if system else rows


def direct_loss(trainer) -> tuple[float, list[float]]:
    """(the mean loss over every scored token, each row's own mean), one row at a time without the trainer's step."""
    import torch

    trainer.args.per_device_eval_batch_size = 1
    sums, counts = [], []
    with torch.no_grad():
        for batch in trainer.get_eval_dataloader():
            labels = batch.pop("labels")
            logits = trainer.model(**batch).logits[:, :-1].float()
            loss = torch.nn.functional.cross_entropy(logits.flatten(0, 1), labels[:, 1:].flatten(), reduction="sum")
            sums.append(float(loss))
            counts.append(scored_tokens(labels))
    return sum(sums) / sum(counts), [total / count for total, count in zip(sums, counts)]


@pytest.mark.parametrize("system", [None, long_system_prompt(3)])  # a long one is read once an evaluation
@pytest.mark.parametrize("flat", [True, False])  # padding-free batches, as on a CPU; padded ones, as on a GPU
def test_the_eval_loss_weighs_every_scored_token_alike_at_any_eval_batch_size(workspace, monkeypatch, flat,
                                                                              system) -> None:
    if not flat:
        monkeypatch.setattr(sft, "padding_free", lambda *args: False)
    starts_read, read = [], shared_start.read_prefix
    monkeypatch.setattr(shared_start, "read_prefix", lambda model, ids: starts_read.append(ids) or read(model, ids))
    rows = skewed_rows(system)
    trainer = evaluating_trainer(workspace, f"skewed-{flat}-{bool(system)}", rows, max_length=400)
    expected, per_row = direct_loss(trainer)
    row_mean = sum(per_row) / len(per_row)
    assert abs(row_mean - expected) > 0.05 * expected, "rows scoring few tokens would weigh more"
    for batch in (1, 3, 12):
        trainer.args.per_device_eval_batch_size = batch
        assert trainer.evaluate()["eval_loss"] == pytest.approx(expected, rel=1e-5), batch
    assert len(starts_read) == (2 if system else 0), "the start read once in each evaluation of several rows a pass"
    reported, _ = loss_of(conversation_logprobs(trainer.model.eval(), trainer.processing_class,
                                                [row["messages"] for row in rows], 4))
    assert reported == pytest.approx(expected, rel=1e-4), "the eval report's held-out loss is the same mean"
