"""Running the training program for real in tests: toy data beside a (shared, read-only) tiny base model, a spec,
the program's environment, and starting or waiting for it."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest

from ftpipe.core.results import Result, read_result
from ftpipe.core.training import checkpoints
from ftpipe.core.storage import REPO_ROOT
from ftpipe_tests.tiny_model import toy_rows, write_chat_parquet

LONG_ROWS = 3  # training rows over the specs' max_length of 64 tokens
SMALL_TRAINING = {"max_steps": 12, "batch_size": 8, "eval_steps": 4, "logging_steps": 2, "learning_rate": 1e-2,
                  "max_length": 64, "warmup_ratio": 0.0}
STEP_LINE = re.compile(r"^step (\d+)/")  # the progress line of an optimizer step


class Quiet:
    """The program's progress and metrics sinks, saying nothing (its warnings kept in `warnings`): for building a
    trainer in a test."""

    def __init__(self):
        self.warnings = []

    def info(self, message):
        pass

    def warning(self, message):
        self.warnings.append(message)

    def log_metrics(self, metrics, step):
        pass


def toy_workspace(root: Path, base_model_dir: Path) -> Path:
    """`root` with `base` (a link to the base model), `train.parquet` (40 rows + LONG_ROWS long ones), `eval.parquet`."""
    root.mkdir(parents=True, exist_ok=True)
    (root / "base").symlink_to(base_model_dir)
    long_rows = toy_rows(LONG_ROWS, seed=9)
    for row in long_rows:
        row["messages"][1]["content"] = "What color is the apple? " * 20
    write_chat_parquet(root / "train.parquet", toy_rows(40, seed=1) + long_rows)
    write_chat_parquet(root / "eval.parquet", toy_rows(8, seed=2))
    return root


def write_spec(root: Path, name: str, *, force_retrain: bool = False, tracking_uri: str | None = None,
               sizing: dict | None = None, **training) -> Path:
    """`root/<name>.json`: a training of the workspace's base on its toy split; outputs under `root/<name>/`."""
    spec = {
        "task": "toy",
        "base_model_dir": str(root / "base"),
        "base_fingerprint": "tiny",
        "split_version": "toy-split",
        "train_path": str(root / "train.parquet"),
        "eval_path": str(root / "eval.parquet"),
        "output_dir": str(root / name / "adapter"),
        "checkpoint_dir": str(root / name / "checkpoints"),
        "training": {**SMALL_TRAINING, **training},
        "force_retrain": force_retrain,
        "mlflow": {"experiment": f"toy-{name}", "run_name": name, "tags": {"dagster_run_id": f"run-{name}"},
                   "tracking_uri": tracking_uri},
        "sizing": sizing,
    }
    path = root / f"{name}.json"
    path.write_text(json.dumps(spec))
    return path


def evaluating_trainer(root: Path, name: str, eval_rows: list[dict], train_rows: list[dict] | None = None,
                       said=None, **training):
    """The trainer the program builds for a training of the workspace `root` (on `train_rows` instead of its own)
    evaluated on `eval_rows`, ready for `evaluate()` outside a training run (without the progress reports of one);
    `said` gets its progress lines."""
    from ftpipe.core.training.methods import Method
    from ftpipe.core.training.program import build_trainer
    from ftpipe.core.training.spec import TrainingSpec

    paths = {"eval_path": str(write_chat_parquet(root / f"{name}-eval.parquet", eval_rows))}
    if train_rows:
        paths["train_path"] = str(write_chat_parquet(root / f"{name}-train.parquet", train_rows))
    path = write_spec(root, name, **training)
    path.write_text(json.dumps({**json.loads(path.read_text()), **paths}))
    spec = TrainingSpec.from_json(path)
    progress = Quiet()
    progress.info = said or progress.info
    trainer, _, _ = build_trainer(spec, spec.config(), Method("sft", "lora", "none"), progress, Quiet())
    trainer.remove_callback(next(c for c in trainer.callback_handler.callbacks if type(c).__name__ == "Progress"))
    return trainer


def output_result(spec: Path) -> Result:
    """The result the training of `spec` published."""
    return read_result(Path(json.loads(spec.read_text())["output_dir"]), "lora_adapter")


def program_env(root: Path) -> dict[str, str]:
    env = {key: value for key, value in os.environ.items() if not key.startswith(("MLFLOW_", "DAGSTER_PIPES"))}
    return {**env, "FTPIPE_HOME": str(root / "home"), "PYTHONPATH": str(REPO_ROOT)}


def start(root: Path, spec: Path, **env: str) -> subprocess.Popen:
    """The program training `spec`, with `env` added to its environment."""
    log = (root / f"{spec.stem}.stderr").open("a")
    return subprocess.Popen(
        [sys.executable, "-m", "ftpipe.core.training", str(spec)],
        cwd=REPO_ROOT, env={**program_env(root), **env}, stdout=subprocess.PIPE, stderr=log, text=True,
    )


def run_to_end(root: Path, spec: Path, **env: str) -> str:
    """Run the program on `spec` to a successful end, with `env` added to its environment; its stdout."""
    process = start(root, spec, **env)
    stdout, _ = process.communicate(timeout=240)
    assert process.returncode == 0, stdout + (root / f"{spec.stem}.stderr").read_text()[-3000:]
    return stdout


def mlflow_client(root: Path):
    from mlflow import MlflowClient

    return MlflowClient(f"sqlite:///{root / 'home' / 'mlflow.db'}")


def kill_after_logging_past_a_checkpoint(root: Path, spec: Path, checkpoint_dir: Path) -> int:
    """Start a training and SIGKILL it once it logged two steps past a complete checkpoint; that checkpoint's step."""
    process = start(root, spec)
    deadline = time.monotonic() + 120
    for line in process.stdout:
        assert time.monotonic() < deadline, "no checkpoint in time"
        complete = [p for p in checkpoint_dir.glob("checkpoint-*") if checkpoints.is_complete_checkpoint(p)]
        step = STEP_LINE.match(line)
        if complete and step and int(step.group(1)) >= checkpoints.checkpoint_step(max(complete)) + 2:
            process.kill()
            process.wait()
            return checkpoints.checkpoint_step(max(complete))
    pytest.fail("the training ended before it could be killed")
