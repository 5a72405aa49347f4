"""Sizing a training before it starts: the Trainer's step schedule, the tokens of the rows it keeps (and replays),
and the rate of the most recent finished training of the task on the same base model."""

from __future__ import annotations

import json
import os
from dataclasses import replace
from pathlib import Path

import pytest

from ftpipe.config import TrainingConfig
from ftpipe.core.layout import TaskLayout
from ftpipe.core.results import Result
from ftpipe.core.storage import REPO_ROOT
from ftpipe.core.training import sizing
from ftpipe.core.modeling import chat_length
from ftpipe.core.training.sft import read_chat_rows
from ftpipe.core.training.spec import TrainingSpec
from ftpipe_tests.training_program import LONG_ROWS, SMALL_TRAINING, Quiet, toy_workspace

PROMPTS = REPO_ROOT / "data" / "general" / "replay_prompts.jsonl"
LENGTHS = list(range(1, 11))  # ten rows of 1..10 tokens: 55 tokens a pass


@pytest.mark.parametrize(("settings", "expected"), [
    # 10 rows in batches of 4: 3 batches, 2 steps a pass (the second takes the last batch alone)
    ({"batch_size": 4, "gradient_accumulation": 2, "epochs": 2.5}, sizing.Plan(steps=5, rows=28, tokens=154)),
    # 3 steps a pass: 2 passes, then one step of 4 rows at the mean length
    ({"batch_size": 4, "max_steps": 7}, sizing.Plan(steps=7, rows=24, tokens=132)),
    ({"batch_size": 16, "epochs": 3}, sizing.Plan(steps=3, rows=30, tokens=165)),
    ({"batch_size": 2, "epochs": 0.5}, sizing.Plan(steps=3, rows=6, tokens=33)),
])
def test_the_plan_follows_the_trainers_schedule(settings: dict, expected: sizing.Plan) -> None:
    assert sizing.plan(LENGTHS, TrainingConfig(**settings)) == expected


def test_the_plan_counts_an_evaluation_every_eval_steps_and_at_the_last_step() -> None:
    config = TrainingConfig(batch_size=4, max_steps=7, eval_steps=3)  # evaluations at steps 3, 6 and 7
    assert sizing.plan(LENGTHS, config, [5, 6]).eval_tokens == 3 * 11
    found = sizing.Estimate(sizing.plan(LENGTHS, config, [5, 6]), sizing.Cost(10.0, 2.0, 1.0, eval_tokens_per_second=33))
    assert found.seconds == 2.0 + 132 / 10 + 1.0, "the evaluations' time is added at their own rate"


@pytest.fixture(scope="module")
def workspace(tmp_path_factory, tiny_model_dir) -> Path:
    return toy_workspace(tmp_path_factory.mktemp("sizing"), tiny_model_dir)


def spec_of(workspace: Path, **training) -> TrainingSpec:
    return TrainingSpec(
        task="toy", base_model_dir=str(workspace / "base"), base_fingerprint="tiny", split_version="toy-split",
        train_path=str(workspace / "train.parquet"), eval_path=str(workspace / "eval.parquet"),
        output_dir=str(workspace / "out" / "adapter"), checkpoint_dir=str(workspace / "out" / "checkpoints"),
        training={**SMALL_TRAINING, **training}, replay_prompts=str(PROMPTS),
    )


def test_row_lengths_are_the_kept_rows_in_the_chat_template_then_the_replay_rows_and_the_eval_rows(workspace: Path) -> None:
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(workspace / "base")
    full = [chat_length(tokenizer, messages) for messages in read_chat_rows(workspace / "train.parquet")]
    fitting = [length for length in full if length <= 64]
    assert len(fitting) == len(full) - LONG_ROWS

    kept, evals = sizing.row_lengths(spec_of(workspace, too_long="drop"), spec_of(workspace).config())
    assert kept == fitting
    assert evals == [chat_length(tokenizer, m) for m in read_chat_rows(workspace / "eval.parquet")
                     if chat_length(tokenizer, m) <= 64] and evals, "the eval rows the evaluations run"
    truncated = spec_of(workspace, too_long="truncate")
    assert sizing.row_lengths(truncated, truncated.config())[0] == [min(length, 64) for length in full]
    replayed = spec_of(workspace, replay=0.25)
    lengths, _ = sizing.row_lengths(replayed, replayed.config())
    assert lengths[: len(fitting)] == fitting and len(lengths) == len(fitting) + 10  # round(0.25 x 40)
    assert all(sizing.REPLAY_ANSWER_TOKENS < length <= 64 for length in lengths[len(fitting):])


def kept_training(task: str, fingerprint: str, base: str, age_s: float, **facts) -> None:
    """A finished training in the task's `lora_adapter/<fingerprint>/`, published `age_s` seconds ago."""
    folder = TaskLayout(task).adapter(fingerprint)
    folder.mkdir(parents=True)
    measured = {"tokens_per_second": 100.0, "tokens_trained": 2000, "program_seconds": 50.0, "peak_memory_mb": 1536}
    written = Result(kind="lora_adapter", reuse_key=fingerprint, inputs={"base_fingerprint": base},
                     metadata={**measured, **facts}).write(folder)
    stamp = written.stat().st_mtime - age_s
    os.utime(written, (stamp, stamp))


def test_the_rate_is_the_latest_finished_training_of_the_same_base_model_from_step_0() -> None:
    kept = TaskLayout("toy").path("lora_adapter")
    assert sizing.previous_cost(kept, "base-a") is None
    kept_training("toy", "aaaa0000aaaa0000", "base-a", age_s=300, tokens_per_second=80.0)
    kept_training("toy", "bbbb0000bbbb0000", "base-a", age_s=200)
    kept_training("toy", "cccc0000cccc0000", "base-a", age_s=100, resumed_from_step=4)
    kept_training("toy", "dddd0000dddd0000", "base-b", age_s=0, tokens_per_second=500.0)

    cost = sizing.previous_cost(kept, "base-a")
    # 2000 tokens at 100 tokens/s explain 20 of its 50 seconds
    assert cost == sizing.Cost(tokens_per_second=100.0, overhead_seconds=30.0, peak_memory_gib=1.5,
                               source="previous training bbbb0000")
    found = sizing.Estimate(sizing.Plan(steps=12, rows=96, tokens=9000), cost)
    assert found.seconds == 120.0
    assert found.line() == ("sizing: 12 steps, ~9.0k tokens at 100 tokens/s (previous training bbbb0000): ~2 min in "
                            "all, peak ~1.5 GiB"), "as estimated_minutes gives it"
    calibrated = sizing.Estimate(sizing.Plan(steps=12, rows=96, tokens=9000, eval_tokens=3000),
                                 sizing.Cost(100.0, 30.0, 1.5, eval_tokens_per_second=300.0))
    assert calibrated.seconds == 130.0 and calibrated.line() == (
        "sizing: 12 steps, ~9.0k tokens at 100 tokens/s (calibration), evaluations ~3.0k tokens at 300 tokens/s: "
        "~2.2 min in all, peak ~1.5 GiB")
    kept_training("toy", "eeee0000eeee0000", "base-a", age_s=0, replay_answer_seconds=12.5, calibration_seconds=5.0)
    cached = sizing.previous_cost(kept, "base-a")
    assert cached.overhead_seconds == 12.5, "its replay answers are cached now, and the next one does not calibrate"
    # a warm start's one evaluation of 2,000 eval tokens (10 of its 50 seconds), then a whole training's three of a
    # grown eval split: priced by the tokens they read
    kept_training("toy", "ffff0000ffff0000", "base-a", age_s=0, eval_seconds=10.0, evaluations=1,
                  eval_tokens_per_evaluation=2000)
    timed = sizing.previous_cost(kept, "base-a")
    assert (timed.overhead_seconds, timed.eval_tokens_per_second) == (20.0, 200.0)
    whole = sizing.Estimate(sizing.Plan(steps=36, rows=288, tokens=9000, eval_tokens=3 * 2400), timed)
    assert whole.seconds == 20.0 + 90.0 + 36.0 and whole.line() == (
        "sizing: 36 steps, ~9.0k tokens at 100 tokens/s (previous training ffff0000), evaluations ~7.2k tokens at 200 "
        "tokens/s: ~2.4 min in all, peak ~1.5 GiB")
    assert found.metadata() == {"estimated_steps": 12, "estimated_tokens": 9000, "estimated_minutes": 2.0,
                                "estimate_source": "previous training bbbb0000",
                                "estimated_peak_memory": "1.5 GiB (previous training bbbb0000)"}


def test_a_training_that_will_resume_from_a_checkpoint_is_sized_for_the_steps_it_has_left(workspace: Path) -> None:
    spec = spec_of(workspace, max_steps=8)
    whole = sizing.estimate(spec).plan
    checkpoint = Path(spec.checkpoint_dir) / "checkpoint-6"
    checkpoint.mkdir(parents=True)
    (checkpoint / "adapter_model.safetensors").write_bytes(b"x")
    (checkpoint / "optimizer.pt").write_bytes(b"x")
    (checkpoint / "trainer_state.json").write_text(json.dumps({"global_step": 6, "max_steps": 8}))
    left = sizing.estimate(spec).plan
    assert (left.steps, left.done_steps) == (8, 6) and left.tokens == round(whole.tokens / 4)
    assert left.eval_tokens == round(whole.eval_tokens / 4)
    priced = sizing.Estimate(left, sizing.Cost(100.0, 30.0, 1.5))
    assert priced.line().startswith(f"sizing: 2 steps of 8 left, resuming at step 6, ~{left.tokens} tokens at 100 ")
    assert priced.metadata()["estimated_steps"] == 2
    four = sizing.Estimate(sizing.Plan(steps=12, rows=96, tokens=21_000), sizing.Cost(100.0, 35.0, 1.5))
    assert four.seconds == 245.0 and four.metadata()["estimated_minutes"] == 4.1, "an estimate: two digits, not 4.083"
    assert sizing.estimate(replace(spec, force_retrain=True)).plan == whole
    (checkpoint / "trainer_state.json").write_text(json.dumps({"global_step": 6, "max_steps": 6}))
    assert sizing.estimate(spec).plan == whole, "a final checkpoint: the training starts over"
    assert checkpoint.is_dir(), "sizing changes nothing in the folder"


def test_an_estimate_past_the_time_the_run_has_left_warns() -> None:
    found = sizing.Estimate(sizing.Plan(steps=12, rows=96, tokens=9000), sizing.Cost(100.0, 30.0, 1.5))
    assert sizing.over_runtime(found.seconds, None) is None and sizing.over_runtime(found.seconds, 121) is None
    assert sizing.over_runtime(found.seconds, 60) == (
        "sizing: the training needs ~2.0 min but this run's dagster/max_runtime leaves 1.0 min: it will be stopped "
        "first; lower training.max_steps or raise the limit")


def test_a_peak_past_the_memory_here_warns() -> None:
    import psutil

    free = psutil.virtual_memory().available / 2**30
    assert sizing.over_memory(0.5) is None
    warning = sizing.over_memory(free * 4)
    assert warning.startswith("sizing: the training needs ~") and " at its peak but this machine has free " in warning
    assert warning.endswith(": it may be killed for memory; lower training.max_length or training.batch_size, or set "
                            "training.micro_batch_size: 1")


def test_without_a_previous_training_the_program_calibrates_on_its_trainer_and_leaves_it_as_it_was(
        workspace: Path) -> None:
    import torch

    from ftpipe.core.training.methods import Method
    from ftpipe.core.training.program import build_trainer

    spec = spec_of(workspace)
    unmeasured = sizing.estimate(spec)
    assert unmeasured.cost is None and "no time estimate: no earlier training" in unmeasured.line()
    assert "estimated_minutes" not in unmeasured.metadata()

    spec.sizing = sizing.deferred(unmeasured, seconds_left=None)
    trainer, _, _ = build_trainer(spec, spec.config(), Method("sft", "lora", "none"), Quiet(), Quiet())
    trained = {name: p.detach().clone() for name, p in trainer.model.named_parameters() if p.requires_grad}
    torch.manual_seed(7)
    expected = torch.rand(3)
    torch.manual_seed(7)
    found = sizing.calibrated(spec, trainer)
    assert torch.equal(torch.rand(3), expected), "the random state the training starts from (adapter dropout drew)"
    assert all(torch.equal(p, trained[name]) and p.grad is None
               for name, p in trainer.model.named_parameters() if p.requires_grad), "weights as loaded, no gradients"
    assert found.cost.source == "calibration" and found.cost.tokens_per_second > 0
    assert found.cost.overhead_seconds > 0 and 0.1 < found.cost.peak_memory_gib < 8  # torch and a 2-layer model
    assert found.plan == unmeasured.plan and found.plan.steps == SMALL_TRAINING["max_steps"]
    assert found.seconds > found.cost.overhead_seconds
    assert found.cost.eval_tokens_per_second > 0  # timed apart (which is faster depends on the machine's load)
    assert found.plan.eval_tokens > 0 and "eval_tokens" in spec.sizing["plan"]


def test_the_calibration_times_the_passes_with_the_activation_checkpointing_the_training_uses(workspace: Path) -> None:
    from ftpipe.core.training.methods import Method
    from ftpipe.core.training.program import build_trainer

    spec = spec_of(workspace)
    spec.sizing = sizing.deferred(sizing.estimate(spec), seconds_left=None)
    trainer, _, _ = build_trainer(spec, spec.config(), Method("sft", "lora", "none"), Quiet(), Quiet())
    assert not trainer.model.is_activation_checkpointing
    trainer.args.activation_checkpointing = True  # as on a GPU (setup.trainer_arguments)
    found = sizing.calibrated(spec, trainer)
    assert trainer.model.is_activation_checkpointing, "the passes timed as the training runs them"
    assert found.cost.tokens_per_second > 0 and all(p.grad is None for p in trainer.model.parameters())


def test_the_calibration_runs_the_first_batch_in_the_passes_the_training_runs_it_in(workspace: Path) -> None:
    from transformers import AutoTokenizer
    from trl.data_utils import common_prefix_length

    from ftpipe.core.training.methods import Method
    from ftpipe.core.training.program import build_trainer

    spec = spec_of(workspace, batch_size=16)
    tokenizer = AutoTokenizer.from_pretrained(spec.base_model_dir)
    trainer, _, _ = build_trainer(spec, spec.config(), Method("sft", "lora", "none"), Quiet(), Quiet())
    trainer.pass_tokens = 120  # the toy rows are short: passes of a few rows
    passes = sizing._first_step(spec, trainer)
    assert len(passes) > 2 and all(tokens <= 120 for _, tokens in passes)
    assert all("attention_mask" not in inputs for inputs, _ in passes), "padding-free, as the training"
    assert all(tokens == inputs["input_ids"].numel() for inputs, tokens in passes)
    tokens = sum(tokens for _, tokens in passes)
    rows = sizing.task_rows(spec, spec.config(), tokenizer)[:16]
    assert tokens == sum(len(ids) for _, ids in rows)
    prompts = [sizing._encode(tokenizer, messages[:-1], add_generation_prompt=True) for messages, _ in rows]
    completions = sum(len(ids) - common_prefix_length(prompt, ids) for prompt, (_, ids) in zip(prompts, rows))
    labelled = sum(int((inputs["labels"] != -100).sum()) for inputs, _ in passes)
    assert labelled == completions, "the loss on the completions only"
    [(longest, tokens)] = sizing._longest_row(trainer)  # the warm-up's candidate for the peak memory
    all_rows = sizing.task_rows(spec, spec.config(), tokenizer)
    assert tokens == longest["input_ids"].numel() == max(len(ids) for _, ids in all_rows) > max(
        len(ids) for _, ids in rows[:3]), "the longest train row, wherever it is"


def test_the_calibration_times_enough_tokens_in_a_few_passes_however_long_the_batch() -> None:
    long_rows = [("row", 900)] * 8  # a batch of 8 rows with a long shared system prompt, one row per pass
    assert sizing._timed(long_rows) == long_rows[:2]
    short = [("a", 300), ("b", 200)]
    assert sizing._timed(short) == [("a", 300), ("b", 200), ("a", 300), ("b", 200), ("a", 300)], "again from the first"
    assert sum(tokens for _, tokens in sizing._timed(short)) >= sizing.CALIBRATION_TOKENS


def four_steps(monkeypatch, eval_rate: float | None = None):
    """(a progress callback, its lines, the trainer state, the clock) after steps 1 to 4 of 6, each 10 s and 100
    tokens, every step logged and an evaluation of 30 s after step 3 (eval_steps 3); evaluations priced before one is
    timed at 300 eval tokens at `eval_rate`."""
    from types import SimpleNamespace

    from ftpipe.core.training import reporting

    clock = [0.0]
    monkeypatch.setattr(reporting.time, "monotonic", lambda: clock[0])
    lines = []
    progress = reporting.progress_callback(SimpleNamespace(info=lines.append),
                                           SimpleNamespace(log_metrics=lambda metrics, step: None))
    progress.price_evaluations(300, eval_rate)
    state = SimpleNamespace(global_step=0, max_steps=6, num_input_tokens_seen=0)
    progress.on_train_begin(SimpleNamespace(eval_steps=3), state, None)
    for step in range(1, 5):
        control = SimpleNamespace(should_log=True, should_evaluate=step == 3)
        clock[0] += 10
        state.global_step, state.num_input_tokens_seen = step, 100 * step
        progress.on_step_end(None, state, control)
        progress.on_log(None, state, control, logs={"loss": 1.0})
        if step == 3:
            clock[0] += 30
            progress.on_evaluate(None, state, control)
    return progress, lines, state, clock


def test_the_speeds_and_time_left_count_evaluations_at_their_own_pace(monkeypatch) -> None:
    from types import SimpleNamespace

    from ftpipe.core.training import reporting

    assert [reporting.evaluations_left(step, 7, 3) for step in (1, 3, 4, 6, 7)] == [3, 3, 2, 2, 1]
    progress, lines, state, clock = four_steps(monkeypatch)
    assert lines[1].endswith("10 tokens/s, ETA 40 s"), "4 steps left, no evaluation timed yet"
    assert lines[2:4] == [lines[2], "step 3/6: evaluating on the eval rows"], "said as the evaluation starts"
    assert lines[4].endswith("10 tokens/s, ETA 50 s"), "2 steps and the last evaluation: 20 s + 30 s"
    state.global_step = 5
    progress.on_step_end(None, state, SimpleNamespace(should_log=False, should_evaluate=True))
    assert lines[-1] == "step 5/6: evaluating on the eval rows", "said on a step without a line of its own too"
    for _ in range(4):  # 4 of 10 batches, 10 s each: a line 30 s after the first, at the pace since it
        clock[0] += 10
        progress.on_prediction_step(None, state, None, eval_dataloader=range(10))
    assert lines[-1] == "step 5/6: evaluated 4 of 10 batches, ~60 s left" and len(lines) == 7
    progress.on_evaluate(None, state, None)
    for seconds in (5, 20, 15):  # the final evaluation, which no step line announces, counts its own batches
        clock[0] += seconds
        progress.on_prediction_step(None, state, None, eval_dataloader=range(5))
    assert lines[-1] == "step 5/6: evaluated 3 of 5 batches, ~35 s left" and len(lines) == 8
    assert progress.session_tokens_per_second == 10, "the training's speed (its metadata): evaluations left out"


def test_the_time_left_prices_the_evaluations_until_one_is_timed(monkeypatch) -> None:
    lines = four_steps(monkeypatch, eval_rate=20.0)[1]  # 15 s an evaluation
    assert lines[0].endswith("ETA 80 s"), "5 steps and 2 evaluations as priced: 50 s + 2 x 15 s"
    assert lines[4].endswith("ETA 50 s"), "2 steps and the last evaluation, as timed: 20 s + 30 s"
    assert four_steps(monkeypatch)[1][0].endswith("ETA 50 s"), "no rate known: evaluations left out until timed"
