"""The training program, run for real as a subprocess on the tiny random model, plus its pure helpers."""

from __future__ import annotations

import json
import re
import signal
import subprocess
import time
from pathlib import Path

import pytest

from ftpipe.core.launch import LAUNCHER_PID_ENV, Refused
from ftpipe.core.modeling import chat_length
from ftpipe.core.training import checkpoints, outputs, sizing
from ftpipe.core.training.methods import Method
from ftpipe.core.training.program import EXIT_REFUSED, build_trainer
from ftpipe.core.training.reporting import NewStepsOnly
from ftpipe.core.training.setup import trainer_setup
from ftpipe.core.training.sft import build_datasets, read_chat_rows
from ftpipe.core.training.shared_start import evaluated_lengths
from ftpipe.core.training.spec import TrainingSpec, training_fingerprint
from ftpipe_tests.tiny_model import long_system_prompt, toy_rows, with_system
from ftpipe_tests.training_program import (
    LONG_ROWS,
    Quiet,
    evaluating_trainer,
    kill_after_logging_past_a_checkpoint,
    mlflow_client,
    output_result,
    run_to_end,
    start,
    toy_workspace,
    write_spec,
)

CONTRACT_KEYS = {
    "method", "adapter_path", "train_loss", "eval_loss", "trainable_params",
    "tokens_per_second", "rows_too_long", "mlflow_run_id",
}


@pytest.fixture(scope="module")
def workspace(tmp_path_factory, tiny_model_dir) -> Path:
    return toy_workspace(tmp_path_factory.mktemp("train"), tiny_model_dir)


@pytest.fixture(scope="module")
def trained(workspace):
    """A training with the default method (auto) on this CPU-only machine, logging every 5 of its 12 steps; its stderr
    lists the modules it imported."""
    spec = write_spec(workspace, "main", logging_steps=5)
    stdout = run_to_end(workspace, spec, PYTHONPROFILEIMPORTTIME="1")
    return workspace, stdout, output_result(spec)


@pytest.mark.slow
def test_a_training_without_4bit_weights_does_not_import_bitsandbytes(trained):
    root, _, _ = trained
    imported = {line.rsplit("|", 1)[-1].strip() for line in (root / "main.stderr").read_text().splitlines()
                if line.startswith("import time:")}
    assert {"torch", "peft", "trl"} <= imported  # (transformers and peft try "bitsandbytes" itself: refused at once)
    assert not [name for name in imported if name.startswith("bitsandbytes.")]


@pytest.mark.slow
def test_the_same_seed_gives_the_same_adapter_weights_with_or_without_a_calibration_first(trained):
    from safetensors.torch import load_file

    root, _, _ = trained
    plan = {"steps": 6, "rows": 48, "tokens": 2400}
    calibrated = write_spec(root, "same-seed", sizing={"plan": plan, "seconds_left": 1.0})
    stdout = run_to_end(root, calibrated)
    assert "sizing: timing a few passes of the first batch" in stdout.split("sizing: 6 steps")[0], "said before"
    line = r"sizing: 6 steps, ~2.4k tokens at \d+ tokens/s \(calibration\): ~[\d.]+ min in all"
    assert re.search(line, stdout), stdout
    assert "but this run's dagster/max_runtime leaves 0.0 min" in stdout
    assert output_result(calibrated).produced["calibration"]["tokens_per_second"] > 0
    run_to_end(root, write_spec(root, "other-seed", seed=7))
    weights = {name: (root / name / "adapter" / "adapter_model.safetensors").read_bytes()
               for name in ("main", "same-seed", "other-seed")}
    assert weights["same-seed"] == weights["main"], "byte-identical adapter for the same data, config and seed"
    main, other = (load_file(root / name / "adapter" / "adapter_model.safetensors") for name in ("main", "other-seed"))
    assert main.keys() == other.keys() and any(not main[k].equal(other[k]) for k in main)


@pytest.mark.slow
def test_result_has_the_metadata_contract(trained):
    from transformers import AutoTokenizer

    root, stdout, result = trained
    metadata = result.metadata
    assert CONTRACT_KEYS <= metadata.keys()
    assert metadata["method"] == "lora" and metadata["adapter_path"] == str(root / "main" / "adapter")
    assert metadata["rows_too_long"] == LONG_ROWS and metadata["replay_rows"] == 0
    assert metadata["steps"] == 12 and metadata["resumed_from_step"] == 0
    assert metadata["evaluations"] == 3, "at steps 4, 8 and 12"
    spec = TrainingSpec.from_json(root / "main.json")
    sized = sizing.task_rows(spec, spec.config(), AutoTokenizer.from_pretrained(root / "base"), evals=True)
    assert metadata["eval_tokens_per_evaluation"] == sum(evaluated_lengths([ids for _, ids in sized])), \
        "as the sizing counts them"
    assert metadata["trainable_params"] > 0 and metadata["tokens_per_second"] > 0
    assert metadata["train_loss"] > 0 and metadata["eval_loss"] > 0
    assert metadata["loss_curve"].startswith("![loss curve](data:image/png;base64,")
    assert "step 12/12" in stdout and "resuming" not in stdout


@pytest.mark.slow
def test_result_names_what_was_trained_and_its_inputs(trained):
    root, _, result = trained
    spec = TrainingSpec.from_json(root / "main.json")
    assert result.kind == "lora_adapter" and result.reuse_key == spec.fingerprint
    assert result.reuse_key == training_fingerprint("toy-split", "tiny", spec.config().recipe())
    assert result.inputs == {"split_version": "toy-split", "base_fingerprint": "tiny"}
    produced = result.produced
    assert produced["weights"] == ["adapter_model.safetensors"] and produced["peft_adapter"] is True
    assert (produced["objective"], produced["adapter"], produced["quantization"]) == ("sft", "lora", "none")
    assert produced["training"]["quantization"] == "none", "the config as it ran: auto resolved on this machine"
    assert produced["training"]["learning_rate"] == 0.01
    assert re.fullmatch(r"[0-9a-f]{16}", produced["data_version"])
    assert (root / "main" / "adapter" / produced["loss_curve"]).is_file()
    readme = (root / "main" / "adapter" / "README.md").read_text()
    assert readme.startswith("# ftpipe-toy: lora (sft): LoRA adapter") and "on split toy-split for 12 steps" in readme
    assert f"train loss {result.metadata['train_loss']:.3f}" in readme and "Model Card for" not in readme


@pytest.mark.slow
def test_adapter_loads_and_changes_the_base_logits(trained):
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    root, _, result = trained
    adapter = Path(result.metadata["adapter_path"])
    for name in ("adapter_model.safetensors", "adapter_config.json", "tokenizer.json", "loss_curve.png"):
        assert (adapter / name).is_file(), name
    assert not list(adapter.glob("*.bin"))
    inputs = torch.tensor([[1, 5, 9, 20, 33]])
    base = AutoModelForCausalLM.from_pretrained(root / "base")
    with torch.no_grad():
        base_logits = base(inputs).logits.clone()
        tuned_logits = PeftModel.from_pretrained(base, adapter)(inputs).logits
    assert (tuned_logits - base_logits).abs().max() > 1e-4


@pytest.mark.slow
def test_mlflow_run_has_params_metric_histories_and_finished(trained):
    root, _, result = trained
    client = mlflow_client(root)
    run = client.get_run(result.metadata["mlflow_run_id"])
    assert run.info.status == "FINISHED"
    params = run.data.params
    assert params["learning_rate"] == "0.01" and params["lora.r"] == "16"
    assert (params["method"], params["quantization"], params["split_version"]) == ("lora", "none", "toy-split")
    assert (params["train_rows"], params["replay_rows"]) == ("40", "0") and "replay" not in params
    assert run.data.tags["dagster_run_id"] == "run-main" and run.data.tags["task"] == "toy"
    train_loss = client.get_metric_history(run.info.run_id, "train_loss")
    assert [m.step for m in train_loss] == [5, 10, 12], "every 5 steps and the last"
    assert train_loss[-1].value == pytest.approx(result.metadata["train_loss"])
    assert [m.step for m in client.get_metric_history(run.info.run_id, "eval_loss")] == [4, 8, 12]
    assert {"learning_rate", "grad_norm", "tokens_per_second"} <= run.data.metrics.keys()
    assert "final_eval_loss" not in run.data.metrics, "one number is a tag, not a one-point chart"
    assert float(run.data.tags["final_eval_loss"]) == pytest.approx(result.metadata["eval_loss"], rel=1e-3)
    adapter_files = {Path(item.path).name for item in client.list_artifacts(run.info.run_id, "adapter")}
    assert {"adapter_model.safetensors", "result.json", outputs.LOSS_CURVE_FILE} <= adapter_files


@pytest.mark.slow
def test_a_finished_training_leaves_nothing_to_resume(trained):
    root, _, _ = trained
    assert not (root / "main" / "checkpoints").exists()


@pytest.mark.slow
def test_a_full_fine_tune_publishes_whole_model_weights_named_in_its_result(workspace):
    from transformers import AutoModelForCausalLM

    spec = write_spec(workspace, "full", method="full", max_steps=4, eval_steps=2)
    run_to_end(workspace, spec)
    result = output_result(spec)
    assert result.produced["weights"] == ["model.safetensors"] and result.produced["peft_adapter"] is False
    assert result.metadata["method"] == "full" and result.produced["adapter"] == "none"
    assert result.produced["training"]["adapter"] == "none"
    model_dir = Path(result.metadata["adapter_path"])
    assert not (model_dir / "adapter_config.json").exists()
    model = AutoModelForCausalLM.from_pretrained(model_dir)
    assert sum(p.numel() for p in model.parameters()) == result.metadata["trainable_params"]


def test_4bit_without_cuda_is_refused_by_the_program_in_one_line(workspace):
    spec = write_spec(workspace, "qlora-on-cpu", method="qlora")
    process = start(workspace, spec)
    stdout, _ = process.communicate(timeout=120)
    stderr = (workspace / "qlora-on-cpu.stderr").read_text().strip()
    assert process.returncode == EXIT_REFUSED, stdout + stderr
    assert stderr.splitlines() == [stderr] and "Traceback" not in stderr
    assert stderr.startswith("training refused: quantization 4bit (method qlora) needs a CUDA GPU")
    assert not (workspace / "qlora-on-cpu" / "adapter").exists()


@pytest.mark.slow
def test_a_split_with_no_row_within_max_length_is_refused_in_one_line_not_retried(workspace):
    from mlflow.entities import ViewType

    spec = write_spec(workspace, "too-short", max_length=16)
    process = start(workspace, spec)
    stdout, _ = process.communicate(timeout=120)
    stderr = (workspace / "too-short.stderr").read_text().strip()
    assert process.returncode == EXIT_REFUSED, stdout + stderr
    rows = 40 + LONG_ROWS
    assert "Traceback" not in stderr and re.fullmatch(
        f"training refused: {rows} of {rows} train rows \\(100%\\) are longer than training.max_length=16 tokens "
        r"\(those rows: median \d+, longest \d+\), so the training would learn from 0 rows; raise training.max_length "
        r"to \d+ to keep them all, or \d+ to keep \d+ of \d+ \(too_long: truncate would cut off the answers, which end "
        r"each row\)",
        stderr.splitlines()[-1]), stderr
    assert not (workspace / "too-short" / "adapter").exists()
    experiment = mlflow_client(workspace).get_experiment_by_name("toy-too-short").experiment_id
    runs = mlflow_client(workspace).search_runs([experiment], run_view_type=ViewType.ALL)
    assert [run.info.lifecycle_stage for run in runs] == ["deleted"], "the run of a refused spec is not left FAILED"


def test_a_training_that_would_drop_most_train_rows_is_refused_with_the_max_length_that_keeps_them(workspace):
    system = long_system_prompt(3)  # most rows carry a long system prompt, as a real task's rows all do
    long = [{**row, "messages": with_system(row["messages"], system)} for row in toy_rows(30, seed=5)]
    with pytest.raises(Refused) as refused:
        evaluating_trainer(workspace, "mostly-long", toy_rows(4, seed=7), long + toy_rows(10, seed=6), max_length=64)
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(workspace / "base"))
    lengths = sorted(chat_length(tokenizer, row["messages"]) for row in long)
    assert str(refused.value) == (
        f"30 of 40 train rows (75%) are longer than training.max_length=64 tokens (those rows: median {lengths[15]}, "
        f"longest {lengths[-1]}), so the training would learn from 10 rows; raise training.max_length to "
        f"{-(-lengths[-1] // 64) * 64} to keep them all (too_long: truncate would cut off the answers, which end each "
        "row)")


def test_a_split_without_rows_of_the_stages_kind_is_refused_as_such():
    from ftpipe.config import TrainingConfig
    from ftpipe.core.training.setup import require_rows

    with pytest.raises(Refused, match=r"^no training rows: the task's held-out split has none \(its raw files give "
                                      r"no chat rows that cleaning kept\)$"):
        require_rows([], [], [], TrainingConfig())
    with pytest.raises(Refused, match=r"^no training preference rows: the task's held-out split has none"):
        require_rows([], [], [], TrainingConfig(), "preference ")


def test_loss_is_masked_on_prompt_tokens(workspace):
    spec = TrainingSpec.from_json(write_spec(workspace, "masking"))
    reporter = Quiet()
    trainer, _, facts = build_trainer(spec, spec.config(), Method("sft", "lora", "none"), reporter, Quiet())
    assert facts == {"rows_too_long": LONG_ROWS, "replay_rows": 0, "replay_answer_seconds": 0.0,
                     "eval_tokens_per_evaluation": sum(len(row["input_ids"]) for row in trainer.eval_dataset)}
    [left_out] = reporter.warnings
    assert left_out.startswith(f"rows longer than training.max_length=64 tokens: {LONG_ROWS} of "
                               f"{len(trainer.train_dataset) + LONG_ROWS} train rows (") and "eval rows" not in left_out
    rows = read_chat_rows(workspace / "train.parquet")
    longest = max(chat_length(trainer.processing_class, messages) for messages in rows)
    assert left_out.endswith(f"Raise training.max_length to {-(-longest // 64) * 64} to keep them all (a pass's "
                             "memory grows with it)")
    assert "truncate" not in left_out, "truncating would cut off the answers"
    tokenizer = trainer.processing_class
    example = trainer.train_dataset[0]
    labels, input_ids = example["labels"], example["input_ids"]
    first_trained = next(index for index, label in enumerate(labels) if label != -100)
    trained_text = tokenizer.decode([token for token in labels if token != -100])
    prompt_text = tokenizer.decode(input_ids[:first_trained])
    assert prompt_text.endswith("<|im_start|>assistant\n") and "<|im_start|>user\n" in prompt_text
    assert trained_text in {f"{color}<|im_end|>\n" for color in ("red", "yellow", "purple", "green", "violet", "brown")}
    assert all(label == -100 for label in labels[:first_trained])
    assert labels[first_trained:] == input_ids[first_trained:]


def test_short_rows_share_a_pass_as_one_sequence_without_padding_and_the_loss_of_padded_rows(workspace):
    import torch
    from trl.trainer.sft_trainer import DataCollatorForLanguageModeling

    said, progress = [], Quiet()
    progress.info = said.append
    spec = TrainingSpec.from_json(write_spec(workspace, "padding-free"))
    trainer, _, _ = build_trainer(spec, spec.config(), Method("sft", "lora", "none"), progress, Quiet())
    assert trainer.args.padding_free and trainer.args.per_device_train_batch_size > 1
    assert any(line.endswith("each row attending only to itself, no padding") for line in said), said
    assert trainer.args.include_num_input_tokens_seen == "all", "no pad token in a pass: every token is counted"
    rows = [trainer.train_dataset[i] for i in range(trainer.args.per_device_train_batch_size)]
    flat = trainer.data_collator(rows)
    assert "attention_mask" not in flat and flat["input_ids"].shape == (1, sum(len(r["input_ids"]) for r in rows))
    padded = DataCollatorForLanguageModeling(pad_token_id=trainer.processing_class.pad_token_id)(rows)
    assert int(padded["attention_mask"].eq(0).sum()) > 0, "rows of different lengths: padding to save"
    trainer.model.eval()
    with torch.no_grad():
        losses = [float(trainer.compute_loss(trainer.model, dict(batch))) for batch in (flat, padded)]
    assert losses[0] == pytest.approx(losses[1], rel=1e-4), "a row attended to another row of its pass"

    truncating = TrainingSpec.from_json(write_spec(workspace, "truncating", too_long="truncate"))
    trainer, _, _ = build_trainer(truncating, truncating.config(), Method("sft", "lora", "none"), progress, Quiet())
    assert not trainer.args.padding_free and trainer.args.max_length == 64, "TRL truncates the long rows"
    assert said[-1].endswith("padded to their longest row"), said


def test_a_batch_goes_in_passes_of_the_token_budget_each_as_collated_with_the_gradients_of_one_pass(workspace):
    import torch

    from ftpipe.core.training.setup import CPU_PASS_TOKENS

    said, progress = [], Quiet()
    progress.info = said.append
    spec = TrainingSpec.from_json(write_spec(workspace, "passes", lora={"dropout": 0.0}))
    trainer, _, _ = build_trainer(spec, spec.config(), Method("sft", "lora", "none"), progress, Quiet())
    assert trainer.pass_tokens == CPU_PASS_TOKENS and trainer.args.per_device_train_batch_size == 8, "a whole batch"
    assert any(f"passes of whole rows up to {CPU_PASS_TOKENS} tokens" in line for line in said), said
    rows = [trainer.train_dataset[i] for i in range(8)]
    batch = trainer.data_collator(rows)
    trainer.pass_tokens = batch["input_ids"].numel() // 3  # the toy rows are short: a budget a third of the batch
    parts = trainer.forward_passes(batch)
    assert len(parts) >= 3 and all(part["input_ids"].numel() <= trainer.pass_tokens for part in parts)
    first = 0
    for part in parts:  # each pass is what the collator makes of its rows alone
        count = int((part["position_ids"] == 0).sum())
        alone = trainer.data_collator(rows[first:first + count])
        assert part.keys() == alone.keys()
        assert all(torch.equal(torch.as_tensor(part[key]), torch.as_tensor(alone[key])) for key in alone), count
        first += count
    assert first == 8

    trainer.current_gradient_accumulation_steps = 1  # as the training loop sets it

    def step(pass_tokens):
        trainer.pass_tokens = pass_tokens
        trainer.model.zero_grad(set_to_none=True)
        loss = float(trainer.training_step(trainer.model, dict(batch)))
        return loss, [p.grad.clone() for p in trainer.model.parameters() if p.requires_grad]

    (split_loss, split_grads), (one_loss, one_grads) = step(batch["input_ids"].numel() // 3), step(None)
    assert split_loss == pytest.approx(one_loss, rel=1e-5)
    assert all(torch.allclose(a, b, rtol=1e-4, atol=1e-7) for a, b in zip(split_grads, one_grads))
    assert any(float(g.abs().sum()) > 0 for g in one_grads)


def test_on_a_cpu_the_lm_head_scores_only_the_completion_positions_for_the_same_loss(workspace, monkeypatch):
    import torch
    import trl.trainer.utils as fused_head

    spec = TrainingSpec.from_json(write_spec(workspace, "labelled-only"))
    trainer, _, _ = build_trainer(spec, spec.config(), Method("sft", "lora", "none"), Quiet(), Quiet())
    scored, score = [], fused_head._ChunkedLogProbFunction.apply
    monkeypatch.setattr(fused_head._ChunkedLogProbFunction, "apply",
                        lambda hidden, *rest: scored.append(len(hidden)) or score(hidden, *rest))
    batch = trainer.data_collator([trainer.train_dataset[i] for i in range(trainer.args.per_device_train_batch_size)])
    trainer.model.eval()
    with torch.no_grad():
        fused = float(trainer.compute_loss(trainer.model, dict(batch)))
        full_logits = float(trainer.model(**batch).loss)  # the model's own loss, over every position's logits
    labelled = int(batch["labels"][:, 1:].ne(-100).sum())
    assert scored == [labelled] and labelled < batch["input_ids"].numel() / 2, "the prompt positions were scored"
    assert fused == pytest.approx(full_logits, rel=1e-5)


def test_a_model_that_attends_across_packed_rows_trains_on_padded_passes(tiny_model_dir):
    from transformers import AutoModelForCausalLM

    from ftpipe.config import TrainingConfig
    from ftpipe.core.training.sft import packed_rows_stay_apart, padding_free

    config, arguments = TrainingConfig(), {"use_cpu": True, "per_device_train_batch_size": 4}
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    assert padding_free(config, arguments, 0, model) and model.training is False
    model.train()
    original = model.forward
    model.forward = lambda *args, position_ids=None, **kwargs: original(*args, **kwargs)  # as custom code may do
    assert not padding_free(config, arguments, 0, model) and not packed_rows_stay_apart(model)
    assert model.training, "the check leaves the model as it was"


def killed_training(workspace, name: str) -> tuple:
    """(spec, the MLflow run id) of a 24-step training killed after it logged past a checkpoint."""
    spec = write_spec(workspace, name, max_steps=24, logging_steps=1)
    checkpoint_dir = workspace / name / "checkpoints"
    kill_after_logging_past_a_checkpoint(workspace, spec, checkpoint_dir)
    return spec, (checkpoint_dir / checkpoints.RUN_ID_FILE).read_text()


@pytest.mark.slow
def test_killed_training_resumes_in_the_same_mlflow_run_with_one_point_per_step(workspace):
    spec, first_run_id = killed_training(workspace, "resume")
    assert not (workspace / "resume" / "adapter").exists()

    stdout = run_to_end(workspace, spec)
    resumed = [line for line in stdout.splitlines() if line.startswith("resuming from checkpoint-")]
    assert len(resumed) == 1 and int(resumed[0].rsplit("-", 1)[1]) > 0
    metadata = output_result(spec).metadata
    assert metadata["mlflow_run_id"] == first_run_id and metadata["steps"] == 24
    assert metadata["resumed_from_step"] == int(resumed[0].rsplit("-", 1)[1])
    client = mlflow_client(workspace)
    assert client.get_run(first_run_id).info.status == "FINISHED"
    assert [m.step for m in client.get_metric_history(first_run_id, "train_loss")] == list(range(1, 25))
    assert [m.step for m in client.get_metric_history(first_run_id, "eval_loss")] == [4, 8, 12, 16, 20, 24]


@pytest.mark.slow
def test_force_retrain_starts_from_step_zero_in_a_new_mlflow_run(workspace):
    spec, first_run_id = killed_training(workspace, "forced")

    stdout = run_to_end(workspace, write_spec(workspace, "forced", force_retrain=True, max_steps=24, logging_steps=1))
    assert "resuming" not in stdout and "step 1/24" in stdout
    metadata = output_result(spec).metadata
    assert metadata["mlflow_run_id"] != first_run_id and metadata["resumed_from_step"] == 0
    assert mlflow_client(workspace).get_run(first_run_id).info.status == "KILLED"


@pytest.mark.slow
def test_a_training_stops_when_the_process_that_started_it_is_gone(workspace):
    """A run worker killed outright (`kill -9`, an OOM kill) leaves no training behind: the training sends itself the
    SIGTERM a Terminate sends, and stops as it does."""
    launcher = subprocess.Popen(["sleep", "600"])
    spec = write_spec(workspace, "orphan", max_steps=2000, logging_steps=1)
    process = start(workspace, spec, **{LAUNCHER_PID_ENV: str(launcher.pid)})
    next(line for line in process.stdout if line.startswith("step "))
    launcher.kill()
    launcher.wait()
    stopped = time.monotonic()
    stdout, _ = process.communicate(timeout=60)
    assert time.monotonic() - stopped < 10 and process.returncode == 128 + signal.SIGTERM
    assert "training stopped: interrupted by SIGTERM" in stdout
    run_id = (workspace / "orphan" / "checkpoints" / checkpoints.RUN_ID_FILE).read_text()
    assert mlflow_client(workspace).get_run(run_id).info.status == "KILLED"


def test_overfitting_needs_rising_eval_and_falling_train_loss():
    def history(train, evals):
        return [{"step": s, "loss": v} for s, v in train] + [{"step": s, "eval_loss": v} for s, v in evals]

    train = [(2, 2.0), (4, 1.5), (6, 1.0), (8, 0.5)]
    assert outputs.detect_overfitting(history(train, [(4, 1.0), (6, 1.1), (8, 1.2)]))
    assert not outputs.detect_overfitting(history(train, [(4, 1.0), (6, 0.9), (8, 1.2)]))
    assert not outputs.detect_overfitting(history([(2, 0.5), (4, 0.6), (6, 0.7), (8, 0.8)],
                                                  [(4, 1.0), (6, 1.1), (8, 1.2)]))
    assert not outputs.detect_overfitting(history(train, [(6, 1.1), (8, 1.2)]))


def test_training_fingerprint_is_stable_and_sensitive():
    config = {"learning_rate": 1e-4, "lora": {"r": 8}}
    fingerprint = training_fingerprint("split-1", "base-1", config)
    assert fingerprint == training_fingerprint("split-1", "base-1", {"lora": {"r": 8}, "learning_rate": 1e-4})
    assert fingerprint != training_fingerprint("split-2", "base-1", config)
    assert fingerprint != training_fingerprint("split-1", "base-1", {**config, "lora": {"r": 16}})


def test_incomplete_checkpoints_are_ignored_and_removed(tmp_path):
    complete, partial = tmp_path / "checkpoint-4", tmp_path / "checkpoint-8"
    for path in (complete, partial):
        path.mkdir()
        (path / "adapter_model.safetensors").write_bytes(b"x")
    (complete / "optimizer.pt").write_bytes(b"x")
    (complete / "trainer_state.json").write_text(json.dumps({"global_step": 4}))
    (partial / "trainer_state.json").write_text('{"global_step": 8')  # torn write
    assert checkpoints.latest_complete_checkpoint(tmp_path) == complete
    assert not partial.exists()


def test_a_forced_retraining_ignores_checkpoints_and_the_previous_run(tmp_path):
    checkpoint = tmp_path / "checkpoint-4"
    checkpoint.mkdir()
    for name in ("adapter_model.safetensors", "optimizer.pt"):
        (checkpoint / name).write_bytes(b"x")
    (checkpoint / "trainer_state.json").write_text(json.dumps({"global_step": 4}))
    checkpoints.remember_run(tmp_path, "run-1")
    assert checkpoints.resume_point(tmp_path, force_retrain=False) == (checkpoint, "run-1")
    assert checkpoints.resume_point(tmp_path, force_retrain=True) == (None, None)
    checkpoints.start_fresh(tmp_path)
    assert list(tmp_path.iterdir()) == []


def test_a_resumed_run_logs_only_steps_it_does_not_have_yet():
    class Metric:
        def __init__(self, step):
            self.step = step

    class Client:
        def get_metric_history(self, run_id, key):
            return [Metric(step) for step in {"train_loss": [1, 2, 3, 4, 5], "eval_loss": [4]}.get(key, [])]

    class Run:
        client, run_id, logged = Client(), "run", []

        def log_metrics(self, metrics, step):
            self.logged.append((step, sorted(metrics)))

    run = Run()
    filtered = NewStepsOnly(run, resumed=True)
    for step in (5, 6):
        filtered.log_metrics({"train_loss": 1.0, "grad_norm": 0.1}, step=step)
    filtered.log_metrics({"eval_loss": 1.0}, step=8)
    assert run.logged == [(5, ["grad_norm"]), (6, ["grad_norm", "train_loss"]), (8, ["eval_loss"])]
    assert NewStepsOnly(Run(), resumed=False).logged_through == {}


def test_lora_target_modules_that_match_no_layer_are_refused_and_a_partial_miss_is_named(tiny_model_dir):
    from transformers import AutoModelForCausalLM

    from ftpipe.config import TrainingConfig
    from ftpipe.core.launch import Refused
    from ftpipe.core.training.setup import checked_lora_config

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    warnings = []

    def config(targets):
        return TrainingConfig.model_validate({"lora": {"target_modules": targets}})

    layers = "down_proj, gate_proj, k_proj, lm_head, o_proj, q_proj, up_proj, v_proj"
    with pytest.raises(Refused, match=re.escape(f"training.lora.target_modules: no_such_layer matches no layer of the "
                                                f"model (its linear layers: {layers})")):
        checked_lora_config(config(["no_such_layer"]), model, warnings.append)
    assert checked_lora_config(config(["q_proj", "vproj"]), model, warnings.append).target_modules == {"q_proj", "vproj"}
    assert warnings == [f"training.lora.target_modules: vproj matches no layer of the model (its linear layers: "
                        f"{layers}); the adapter trains the others only"]
    checked_lora_config(config("all-linear"), model, warnings.append)
    checked_lora_config(config(["self_attn.q_proj"]), model, warnings.append)
    assert len(warnings) == 1


def test_a_few_very_long_rows_do_not_set_the_only_max_length_offered():
    from ftpipe.core.training.setup import max_length_advice

    ordinary = [530 + 9 * i for i in range(50)]  # chats just over 512 tokens after a long system prompt
    pasted = [4000, 5200, 6100, 7500, 7510]  # and a few with a pasted log
    assert max_length_advice(ordinary + pasted) == "7552 to keep them all, or 1024 to keep 50 of 55"
    assert max_length_advice(ordinary) == "1024 to keep them all", "no second choice when it saves little"


def test_a_chat_over_max_length_loses_its_earliest_turns_with_trim_turns_and_drop_says_so(workspace):
    from transformers import AutoTokenizer

    from ftpipe.core.training.sft import fit_rows, left_out_warning

    tokenizer = AutoTokenizer.from_pretrained(str(workspace / "base"))
    system = {"role": "system", "content": "You answer questions about fruit in a few words."}
    turns = [message for number in range(6) for message in (
        {"role": "user", "content": f"What color is fruit number {number} when it is ripe and ready to eat?"},
        {"role": "assistant", "content": f"Fruit {number} is red when ripe."})]
    chat, short = [system, *turns], [system, *turns[-2:]]
    pasted = [system, {"role": "user", "content": "ripe " * 300}, {"role": "assistant", "content": "Yellow."}]
    max_length = chat_length(tokenizer, [system, *turns[-4:]])  # the last two exchanges fit, not three
    trimmed = fit_rows([chat, short, pasted], tokenizer, max_length, "trim_turns", as_row=lambda messages: messages)
    assert trimmed.rows == [[system, *turns[-4:]], short] and trimmed.trimmed == 1
    assert trimmed.lengths == [max_length, chat_length(tokenizer, short)] and len(trimmed.over) == 1
    dropped = fit_rows([chat, short, pasted], tokenizer, max_length, "drop", as_row=lambda messages: messages)
    assert dropped.rows == [short] and dropped.trimmed == 0 and dropped.trimmable == 1 and len(dropped.over) == 2
    assert left_out_warning(dropped.over, 3, [], 0, max_length, dropped.trimmable).endswith(
        "(a pass's memory grows with it); too_long: trim_turns would keep 1 of them (multi-turn rows) without their "
        "earliest turns")
    kept = fit_rows([chat, short, pasted], tokenizer, max_length, "truncate", as_row=lambda messages: messages)
    assert kept.rows == [chat, short, pasted] and kept.trimmable == 0 and len(kept.over) == 2


def test_every_turn_learns_each_assistant_message_after_the_conversation_before_it(workspace):
    from ftpipe.core.training import sizing
    from ftpipe.core.training.spec import TrainingSpec

    def chat(number: int, exchanges: int) -> dict:
        turns = [message for turn in range(exchanges) for message in (
            {"role": "user", "content": f"Chat {number}, question {turn}: what color is the apple?"},
            {"role": "assistant", "content": f"Red, answer {turn}."})]
        return {"id": f"c{number:02d}", "messages": [{"role": "system", "content": "Name colors."}, *turns]}

    rows = [chat(number, 1 + number % 3) for number in range(12)]  # 1, 2 or 3 assistant turns each
    said = []
    trainer = evaluating_trainer(workspace, "every-turn", toy_rows(4, seed=7), rows, said=said.append, every_turn=True,
                                 max_length=256)
    turns = sum(1 + number % 3 for number in range(12))
    assert len(trainer.train_dataset) == turns and len(trainer.eval_dataset) == 4
    assert any(line.startswith(f"data: {turns} train rows (every assistant turn a row) + 0 general") for line in said)
    spec = TrainingSpec.from_json(workspace / "every-turn.json")
    learnt = [messages for messages, _ in sizing.task_rows(spec, spec.config(), trainer.processing_class)]
    assert learnt[:3] == [rows[0]["messages"], rows[1]["messages"][:3], rows[1]["messages"]]
    trainer = evaluating_trainer(workspace, "final-turn", toy_rows(4, seed=7), rows, max_length=256)
    assert len(trainer.train_dataset) == 12
    two_exchanges = max(chat_length(trainer.processing_class, row["messages"]) for row in rows[1::3])
    said.clear()
    trainer = evaluating_trainer(workspace, "trimmed", toy_rows(4, seed=7), rows, said=said.append,
                                 too_long="trim_turns", max_length=two_exchanges)
    assert len(trainer.train_dataset) == 12, "the chats of three exchanges lose their first"
    assert any(line.endswith("; 4 multi-turn rows kept without their earliest turns") for line in said), said
    spec = TrainingSpec.from_json(workspace / "trimmed.json")
    setup = trainer_setup(spec, spec.config(), Method("sft", "lora", "none"), callbacks=[], info=lambda line: None)
    assert build_datasets(setup)[2] == {"rows_too_long": 0, "rows_trimmed": 4}, "facts for the metadata and the card"
