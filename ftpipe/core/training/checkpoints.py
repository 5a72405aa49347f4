"""A training's checkpoint dir: where an interrupted training resumes from, and in which MLflow run.

A finished training's dir is removed once its output is published, and a checkpoint saved as a training ended is
never resumed: the Trainer checks its step budget only after a step, so resuming one would train a step past the end.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from ftpipe.core.storage import write_text

RUN_ID_FILE = "mlflow_run_id"


def checkpoint_step(path: Path) -> int:
    return int(path.name.removeprefix("checkpoint-"))


def trainer_state(path: Path) -> dict:
    """A checkpoint's trainer state (written last); empty when it is missing or torn."""
    try:
        return json.loads((path / "trainer_state.json").read_text())
    except (OSError, ValueError):
        return {}


def is_complete_checkpoint(path: Path) -> bool:
    """A checkpoint-N dir whose trainer state parses, with weights and optimizer beside it."""
    has_weights, step = any(path.glob("*.safetensors")), trainer_state(path).get("global_step")
    return has_weights and (path / "optimizer.pt").is_file() and step == checkpoint_step(path)


def is_final_checkpoint(path: Path) -> bool:
    """A checkpoint saved as its training ended: at its last step, or when early stopping stopped it."""
    state = trainer_state(path)
    control = state.get("stateful_callbacks", {}).get("TrainerControl", {}).get("args", {})
    return 0 < state.get("max_steps", 0) <= state.get("global_step", 0) or bool(control.get("should_training_stop"))


def latest_complete_checkpoint(checkpoint_dir: Path) -> Path | None:
    """The newest complete checkpoint; incomplete ones (a killed save) are deleted."""
    for path in set(checkpoint_dir.glob("checkpoint-[0-9]*")) - set(complete := _complete(checkpoint_dir)):
        shutil.rmtree(path, ignore_errors=True)
    return complete[-1] if complete else None


def resumable(checkpoint_dir: Path, force_retrain: bool) -> Path | None:
    """The checkpoint a training in `checkpoint_dir` would resume from, found without changing the folder: the newest
    complete one unless it is final; None when forced or when there is none."""
    complete = _complete(checkpoint_dir)
    return complete[-1] if complete and not force_retrain and not is_final_checkpoint(complete[-1]) else None


def _complete(checkpoint_dir: Path) -> list[Path]:
    return sorted((path for path in checkpoint_dir.glob("checkpoint-[0-9]*") if is_complete_checkpoint(path)),
                  key=checkpoint_step)


def resume_point(checkpoint_dir: Path, force_retrain: bool) -> tuple[Path | None, str | None]:
    """(checkpoint to resume from, MLflow run id to continue), both None for a fresh start: when forced, when there is
    no complete checkpoint, or when the latest is final (a training that ended before it was published)."""
    if force_retrain:
        return None, None
    checkpoint_dir.mkdir(parents=True, exist_ok=True)
    latest_complete_checkpoint(checkpoint_dir)  # deletes the incomplete ones
    checkpoint = resumable(checkpoint_dir, force_retrain)
    if checkpoint is None:
        return None, None
    run_id_file = checkpoint_dir / RUN_ID_FILE
    run_id = run_id_file.read_text().strip() if run_id_file.is_file() else None
    return checkpoint, run_id


def start_fresh(checkpoint_dir: Path) -> None:
    """Forget every checkpoint and the MLflow run of a previous attempt (before a training with nothing to resume)."""
    shutil.rmtree(checkpoint_dir, ignore_errors=True)
    checkpoint_dir.mkdir(parents=True, exist_ok=True)


def remember_run(checkpoint_dir: Path, run_id: str) -> None:
    """Record the MLflow run of this training, so a resumed attempt continues it."""
    checkpoint_dir.mkdir(parents=True, exist_ok=True)
    write_text(checkpoint_dir / RUN_ID_FILE, run_id)


def finish(checkpoint_dir: Path) -> None:
    """Remove a finished training's checkpoints (its output is published): nothing is left to resume."""
    shutil.rmtree(checkpoint_dir, ignore_errors=True)
