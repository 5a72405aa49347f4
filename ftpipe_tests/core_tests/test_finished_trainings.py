"""A finished training is never resumed: a checkpoint saved as a training ended is not a resume point, and finished
trainings are kept by fingerprint (the current one and the most recently current others)."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import pytest

from ftpipe.core.layout import ADAPTERS_KEPT, TaskLayout
from ftpipe.core.storage import atomic_dir
from ftpipe.core.training import checkpoints
from ftpipe_tests.training_program import output_result, run_to_end, start, toy_workspace, write_spec

LONG_AGO = time.time() - 24 * 3600


def saved_checkpoint(folder: Path, step: int, max_steps: int, stopped: bool = False) -> Path:
    """A complete checkpoint-<step> of a training of `max_steps` steps (`stopped`: early stopping ended it)."""
    checkpoint = folder / f"checkpoint-{step}"
    checkpoint.mkdir(parents=True)
    for name in ("adapter_model.safetensors", "optimizer.pt"):
        (checkpoint / name).write_bytes(b"x")
    control = {"TrainerControl": {"args": {"should_training_stop": stopped}, "attributes": {}}}
    state = {"global_step": step, "max_steps": max_steps, "stateful_callbacks": control}
    (checkpoint / "trainer_state.json").write_text(json.dumps(state))
    return checkpoint


def test_only_a_checkpoint_of_an_unfinished_training_is_resumed(tmp_path: Path) -> None:
    checkpoints.remember_run(tmp_path / "midway", "run-1")
    midway = saved_checkpoint(tmp_path / "midway", 8, max_steps=12)
    assert checkpoints.resume_point(tmp_path / "midway", force_retrain=False) == (midway, "run-1")
    checkpoints.remember_run(tmp_path / "ended", "run-2")
    saved_checkpoint(tmp_path / "ended", 12, max_steps=12)
    assert checkpoints.resume_point(tmp_path / "ended", force_retrain=False) == (None, None)
    saved_checkpoint(tmp_path / "stopped", 8, max_steps=12, stopped=True)
    assert checkpoints.resume_point(tmp_path / "stopped", force_retrain=False) == (None, None)


def finished_training(paths: TaskLayout, fingerprint: str, age_s: float) -> Path:
    folder = paths.adapter(fingerprint)
    with atomic_dir(folder) as tmp:
        (tmp / "adapter_model.safetensors").write_text(fingerprint)
    then = time.time() - age_s
    os.utime(folder, (then, then))
    return folder


def test_pruning_keeps_the_current_adapter_the_most_recent_others_and_any_just_published() -> None:
    paths = TaskLayout("shop")
    by_age = [finished_training(paths, f"{age:016x}", age_s=3600 * (age + 1)) for age in range(ADAPTERS_KEPT + 2)]
    oldest, current = by_age[-1], by_age[-2]
    paths.mark_current_adapter(current)
    os.utime(by_age[0], (LONG_AGO, LONG_AGO))  # stopped being current long ago: older than the rest
    just_published = finished_training(paths, "f" * 16, age_s=0)
    removed = paths.prune_adapters()
    assert removed == [oldest.name, by_age[0].name]
    assert all(folder.is_dir() for folder in (current, just_published, *by_age[1:ADAPTERS_KEPT]))
    assert paths.output("lora_adapter").resolve() == current.resolve()
    assert not any(p.name.startswith(f".{oldest.name}.") for p in paths.path("lora_adapter").iterdir())


@pytest.fixture(scope="module")
def workspace(tmp_path_factory, tiny_model_dir) -> Path:
    return toy_workspace(tmp_path_factory.mktemp("ended"), tiny_model_dir)


@pytest.mark.slow
def test_a_training_that_ended_before_it_was_published_is_trained_again_not_resumed(workspace: Path) -> None:
    """The Trainer resumed from a training's last checkpoint trains one step past the end (`step 13/12`)."""
    spec = write_spec(workspace, "ended")
    (workspace / "ended").mkdir()
    (workspace / "ended" / "blocked").write_text("a file where the output's folder should be")
    unpublishable = workspace / "unpublishable.json"
    unpublishable.write_text(json.dumps({**json.loads(spec.read_text()),
                                         "output_dir": str(workspace / "ended" / "blocked" / "adapter")}))
    process = start(workspace, unpublishable)
    process.communicate(timeout=240)
    left = checkpoints.latest_complete_checkpoint(workspace / "ended" / "checkpoints")
    assert process.returncode != 0 and left is not None and checkpoints.checkpoint_step(left) == 12

    stdout = run_to_end(workspace, spec)
    metadata = output_result(spec).metadata
    assert "resuming" not in stdout and "step 12/12" in stdout and "step 13/" not in stdout
    assert metadata["steps"] == 12 and metadata["resumed_from_step"] == 0
    stderr = (workspace / "ended.stderr").read_text()
    assert "gemm_4bit_forward" not in stderr and "is_gradient_checkpointing" not in stderr, stderr[-2000:]
