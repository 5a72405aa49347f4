"""The training program, run for real as a subprocess on a tiny random model, plus its pure helpers."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from ftpipe.core import training
from ftpipe.core.storage import REPO_ROOT
from ftpipe_tests.tiny_model import build_tiny_model, toy_rows, write_chat_parquet

CONTRACT_KEYS = {
    "method", "adapter_path", "train_loss", "eval_loss", "trainable_params",
    "tokens_per_second", "rows_too_long", "mlflow_run_id",
}
LONG_ROWS = 3


@pytest.fixture(scope="module")
def workspace(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("train")
    build_tiny_model(root / "base")
    long_rows = toy_rows(LONG_ROWS, seed=9)
    for row in long_rows:
        row["messages"][1]["content"] = "What color is the apple? " * 20
    write_chat_parquet(root / "train.parquet", toy_rows(40, seed=1) + long_rows)
    write_chat_parquet(root / "eval.parquet", toy_rows(8, seed=2))
    return root


def write_spec(root: Path, name: str, **training) -> Path:
    config = {"method": "lora", "max_steps": 12, "batch_size": 8, "eval_steps": 4, "logging_steps": 2,
              "learning_rate": 1e-2, "max_length": 64, "warmup_ratio": 0.0, **training}
    spec = {
        "task": "toy",
        "base_model_dir": str(root / "base"),
        "base_fingerprint": "tiny",
        "train_path": str(root / "train.parquet"),
        "eval_path": str(root / "eval.parquet"),
        "output_dir": str(root / name / "adapter"),
        "checkpoint_dir": str(root / name / "checkpoints"),
        "training": config,
        "mlflow": {"experiment": f"toy-{name}", "run_name": name, "tags": {"dagster_run_id": f"run-{name}"}},
    }
    path = root / f"{name}.json"
    path.write_text(json.dumps(spec))
    return path


def program_env(root: Path) -> dict[str, str]:
    env = {key: value for key, value in os.environ.items() if not key.startswith(("MLFLOW_", "DAGSTER_PIPES"))}
    return {**env, "FTPIPE_HOME": str(root / "home"), "PYTHONPATH": str(REPO_ROOT)}


def start(root: Path, spec: Path) -> subprocess.Popen:
    log = (root / f"{spec.stem}.stderr").open("a")
    return subprocess.Popen(
        [sys.executable, "-m", "ftpipe.core.training", str(spec)],
        cwd=REPO_ROOT, env=program_env(root), stdout=subprocess.PIPE, stderr=log, text=True,
    )


def run_to_end(root: Path, spec: Path) -> str:
    process = start(root, spec)
    stdout, _ = process.communicate(timeout=240)
    assert process.returncode == 0, stdout + (root / f"{spec.stem}.stderr").read_text()[-3000:]
    return stdout


def wait_for_line(process: subprocess.Popen, prefix: str) -> list[str]:
    lines = []
    for line in process.stdout:
        lines.append(line)
        if line.startswith(prefix):
            return lines
    pytest.fail(f"program ended before printing {prefix!r}:\n{''.join(lines)}")


def mlflow_client(root: Path):
    from mlflow import MlflowClient

    return MlflowClient(f"sqlite:///{root / 'home' / 'mlflow.db'}")


@pytest.fixture(scope="module")
def trained(workspace):
    stdout = run_to_end(workspace, write_spec(workspace, "main"))
    result = json.loads((workspace / "main" / "adapter" / training.RESULT_FILE).read_text())
    return workspace, stdout, result


def test_the_same_seed_gives_the_same_adapter_weights(trained):
    from safetensors.torch import load_file

    root, _, _ = trained
    run_to_end(root, write_spec(root, "same-seed"))
    run_to_end(root, write_spec(root, "other-seed", seed=7))
    weights = {name: (root / name / "adapter" / "adapter_model.safetensors").read_bytes()
               for name in ("main", "same-seed", "other-seed")}
    assert weights["same-seed"] == weights["main"], "byte-identical adapter for the same data, config and seed"
    main, other = (load_file(root / name / "adapter" / "adapter_model.safetensors") for name in ("main", "other-seed"))
    assert main.keys() == other.keys() and any(not main[k].equal(other[k]) for k in main)


def test_result_has_the_metadata_contract(trained):
    root, stdout, result = trained
    assert CONTRACT_KEYS <= result.keys()
    assert result["method"] == "lora" and result["adapter_path"] == str(root / "main" / "adapter")
    assert result["rows_too_long"] == LONG_ROWS
    assert result["steps"] == 12 and result["resumed_from_step"] == 0
    assert result["trainable_params"] > 0 and result["tokens_per_second"] > 0
    assert result["train_loss"] > 0 and result["eval_loss"] > 0
    assert result["loss_curve"].startswith("![loss curve](data:image/png;base64,")
    assert "step 12/12" in stdout and "resuming" not in stdout


def test_adapter_loads_and_changes_the_base_logits(trained):
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    root, _, result = trained
    adapter = Path(result["adapter_path"])
    for name in ("adapter_model.safetensors", "adapter_config.json", "tokenizer.json", "loss_curve.png"):
        assert (adapter / name).is_file(), name
    assert not list(adapter.glob("*.bin"))
    inputs = torch.tensor([[1, 5, 9, 20, 33]])
    base = AutoModelForCausalLM.from_pretrained(root / "base")
    with torch.no_grad():
        base_logits = base(inputs).logits.clone()
        tuned_logits = PeftModel.from_pretrained(base, adapter)(inputs).logits
    assert (tuned_logits - base_logits).abs().max() > 1e-4


def test_mlflow_run_has_params_metric_histories_and_finished(trained):
    root, _, result = trained
    client = mlflow_client(root)
    run = client.get_run(result["mlflow_run_id"])
    assert run.info.status == "FINISHED"
    assert run.data.params["learning_rate"] == "0.01" and run.data.params["lora.r"] == "16"
    assert run.data.tags["dagster_run_id"] == "run-main" and run.data.tags["task"] == "toy"
    train_loss = client.get_metric_history(run.info.run_id, "train_loss")
    assert len(train_loss) == 6 and [m.step for m in train_loss] == [2, 4, 6, 8, 10, 12]
    assert [m.step for m in client.get_metric_history(run.info.run_id, "eval_loss")] == [4, 8, 12]
    assert {"learning_rate", "grad_norm", "tokens_per_second"} <= run.data.metrics.keys()
    artifacts = {item.path for item in client.list_artifacts(run.info.run_id)}
    assert {"adapter", training.CONFIG_FILE, training.LOSS_CURVE_FILE} <= artifacts
    adapter_files = {Path(item.path).name for item in client.list_artifacts(run.info.run_id, "adapter")}
    assert "adapter_model.safetensors" in adapter_files


def test_loss_is_masked_on_prompt_tokens(workspace):
    from ftpipe.config import TrainingConfig

    class Quiet:
        def info(self, message):
            pass

        def log_metrics(self, metrics, step):
            pass

    spec = training.TrainingSpec.from_json(write_spec(workspace, "masking"))
    config = TrainingConfig.model_validate(spec.training)
    trainer, _, _ = training.build_trainer(spec, config, "lora", Quiet(), Quiet())
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


def test_killed_training_resumes_from_its_checkpoint_in_the_same_mlflow_run(workspace):
    spec = write_spec(workspace, "resume", max_steps=24, logging_steps=1)
    checkpoints = workspace / "resume" / "checkpoints"
    process = start(workspace, spec)
    deadline = time.monotonic() + 120
    while not any(training.is_complete_checkpoint(p) for p in checkpoints.glob("checkpoint-*")):
        assert process.poll() is None and time.monotonic() < deadline, "no checkpoint before the program ended"
        time.sleep(0.1)
    process.kill()
    process.wait()
    first_run_id = (checkpoints / training.RUN_ID_FILE).read_text()
    assert not (workspace / "resume" / "adapter").exists()

    stdout = run_to_end(workspace, spec)
    resumed = [line for line in stdout.splitlines() if line.startswith("resuming from checkpoint-")]
    assert len(resumed) == 1 and int(resumed[0].rsplit("-", 1)[1]) > 0
    result = json.loads((workspace / "resume" / "adapter" / training.RESULT_FILE).read_text())
    assert result["mlflow_run_id"] == first_run_id and result["steps"] == 24
    assert result["resumed_from_step"] == int(resumed[0].rsplit("-", 1)[1])
    assert mlflow_client(workspace).get_run(first_run_id).info.status == "FINISHED"


def test_sigterm_ends_the_mlflow_run_killed(workspace):
    spec = write_spec(workspace, "sigterm", max_steps=200, logging_steps=1)
    process = start(workspace, spec)
    wait_for_line(process, "step ")
    process.send_signal(signal.SIGTERM)
    stdout, _ = process.communicate(timeout=60)
    assert process.returncode == 128 + signal.SIGTERM
    assert "training stopped: interrupted by SIGTERM" in stdout
    run_id = (workspace / "sigterm" / "checkpoints" / training.RUN_ID_FILE).read_text()
    assert mlflow_client(workspace).get_run(run_id).info.status == "KILLED"


def test_overfitting_needs_rising_eval_and_falling_train_loss():
    def history(train, evals):
        return [{"step": s, "loss": v} for s, v in train] + [{"step": s, "eval_loss": v} for s, v in evals]

    train = [(2, 2.0), (4, 1.5), (6, 1.0), (8, 0.5)]
    assert training.detect_overfitting(history(train, [(4, 1.0), (6, 1.1), (8, 1.2)]))
    assert not training.detect_overfitting(history(train, [(4, 1.0), (6, 0.9), (8, 1.2)]))
    assert not training.detect_overfitting(history([(2, 0.5), (4, 0.6), (6, 0.7), (8, 0.8)],
                                                   [(4, 1.0), (6, 1.1), (8, 1.2)]))
    assert not training.detect_overfitting(history(train, [(6, 1.1), (8, 1.2)]))


def test_training_fingerprint_is_stable_and_sensitive():
    config = {"learning_rate": 1e-4, "lora": {"r": 8}}
    fingerprint = training.training_fingerprint("split-1", "base-1", config)
    assert fingerprint == training.training_fingerprint("split-1", "base-1", {"lora": {"r": 8}, "learning_rate": 1e-4})
    assert fingerprint != training.training_fingerprint("split-2", "base-1", config)
    assert fingerprint != training.training_fingerprint("split-1", "base-1", {**config, "lora": {"r": 16}})


def test_incomplete_checkpoints_are_ignored_and_removed(tmp_path):
    complete, partial = tmp_path / "checkpoint-4", tmp_path / "checkpoint-8"
    for path in (complete, partial):
        path.mkdir()
        (path / "adapter_model.safetensors").write_bytes(b"x")
    (complete / "optimizer.pt").write_bytes(b"x")
    (complete / "trainer_state.json").write_text(json.dumps({"global_step": 4}))
    (partial / "trainer_state.json").write_text('{"global_step": 8')  # torn write
    assert training.latest_complete_checkpoint(tmp_path) == complete
    assert not partial.exists()
