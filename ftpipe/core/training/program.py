"""Fine-tuning with TRL as an ordinary program:

    python -m ftpipe.core.training SPEC.json

It reports through Dagster Pipes when Dagster launched it (and prints to stdout otherwise), tracks the run in
MLflow, resumes an interrupted training from its latest complete checkpoint, and publishes the output dir
atomically with `result.json` inside (see `outputs`). Exit status: 0 done, 2 refused before any training
(unusable spec, a method this machine cannot run, or no rows left within max_length; retrying cannot help),
128 + signal number when stopped by SIGTERM/SIGINT (the MLflow run is then KILLED, and the next attempt resumes).
Started by a run worker (which names itself in `FTPIPE_LAUNCHER_PID`), it stops the same way when that process is
gone.
"""

from __future__ import annotations

import os
import signal
import sys
import threading
import time
from contextlib import nullcontext
from dataclasses import asdict
from pathlib import Path
from typing import Any

from ftpipe.config import TrainingConfig
from ftpipe.core.readable import rounded
from ftpipe.core.launch import EXIT_REFUSED, LAUNCHER_PID_ENV, Refused, unblock_stop_signals
from ftpipe.core.results import Result
from ftpipe.core.storage import process_alive
from ftpipe.core.tracking import RunInterrupted, RunLogger, redact_uri, tracked_run, tracking_uri
from ftpipe.core.training import checkpoints, preference, replay, sizing
from ftpipe.core.training.methods import Method, leave_out_bitsandbytes, resolve_method
from ftpipe.core.training.outputs import DISPLACEMENT_WARNING, pipes_metadata, publish, trainable_parameters
from ftpipe.core.training.reporting import (
    NewStepsOnly,
    Reporter,
    pipes_reporter,
    process_rank,
    progress_callback,
    quiet_libraries,
)
from ftpipe.core.training.setup import objective_module, trainer_setup
from ftpipe.core.training.spec import TrainingSpec

LAUNCHER_POLL_SECONDS = 2.0
STOP_GRACE_SECONDS = 60.0


def prepare(spec_path: Path) -> tuple[TrainingSpec, TrainingConfig, Method]:
    """The spec, its config and the method resolved on this machine; ValueError when it cannot run here."""
    import torch

    spec = TrainingSpec.from_json(spec_path)
    config = spec.config()
    replay.check(spec, config)
    preference.check(spec, config)
    return spec, config, resolve_method(config, cuda_available=torch.cuda.is_available())


def build_trainer(spec: TrainingSpec, config: TrainingConfig, method: Method, reporter: Reporter, run):
    """(trainer, progress callback, facts: the objective's, `replay_rows` and `replay_answer_seconds`): the shared
    setup handed to the objective's module."""
    from transformers import PrinterCallback

    progress = progress_callback(reporter, run, spec.sizing if process_rank() == 0 else None)
    setup = trainer_setup(spec, config, method, callbacks=[progress], info=reporter.info, warning=reporter.warning)
    trainer, facts = objective_module(method.objective).build_trainer(setup)
    trainer.remove_callback(PrinterCallback)  # the progress callback prints one concise line instead
    return trainer, progress, {**facts, "replay_rows": setup.replay_rows,
                               "replay_answer_seconds": round(setup.replay_seconds, 1)}


def hyperparameters(spec: TrainingSpec, config: TrainingConfig, method: Method, trainer,
                    replay_rows: int) -> dict[str, Any]:
    """The MLflow params of a training: its recipe flattened (`lora.r`, `preference.beta`), the resolved method, the
    inputs' versions and the rows trained on."""
    values = {}
    for key, value in config.recipe().items():
        values.update({f"{key}.{inner}": found for inner, found in value.items()} if isinstance(value, dict)
                      else {key: value})
    values.update(
        method.facts(),
        base_fingerprint=spec.base_fingerprint,
        split_version=spec.split_version,
        training_fingerprint=spec.fingerprint,
        train_rows=len(trainer.train_dataset),
        eval_rows=len(trainer.eval_dataset),
        replay_rows=replay_rows,
        trainable_params=trainable_parameters(trainer.model),
    )
    return values


def final_eval_loss(trainer) -> float:
    """The eval loss of the model training ended with (the best checkpoint's).

    The Trainer evaluates at the last step and loads the best checkpoint at the end, so it knows that loss
    already; another pass over the eval rows would only repeat it. Evaluated only when no best checkpoint was kept.
    """
    best = trainer.state.best_model_checkpoint
    if trainer.state.best_metric is not None and best is not None and Path(best).is_dir():
        return float(trainer.state.best_metric)
    return trainer.evaluate(metric_key_prefix="final_eval")["final_eval_loss"]


def tracking(spec: TrainingSpec, resume_run_id: str | None):
    """The MLflow run of this training (rank 0), continued when resuming; a silent logger on other ranks."""
    if process_rank() != 0:
        return nullcontext(RunLogger(None, ""))
    tags = {"task": spec.task, "base_fingerprint": spec.base_fingerprint, **spec.mlflow.tags}
    return tracked_run(spec.mlflow.experiment, run_name=spec.mlflow.run_name or spec.task, tags=tags,
                       resume_run_id=resume_run_id, uri=spec.mlflow.tracking_uri or tracking_uri(),
                       discard_on=(Refused,))


def calibrate(spec: TrainingSpec, trainer, reporter: Reporter) -> dict[str, Any]:
    """Log the sizing of a training with no earlier one to take its rate from, timed on `trainer` before its first
    step (`sizing.calibrated`), and warn when it outlasts the run's limit or the memory here; the measured cost."""
    reporter.info("sizing: timing a few passes of the first batch (no earlier training of this task here)")
    found = sizing.calibrated(spec, trainer)
    reporter.info(found.line())
    for warning in (sizing.over_runtime(found.seconds, spec.sizing["seconds_left"]),
                    sizing.over_memory(found.cost.peak_memory_gib)):
        if warning:
            reporter.warning(warning)
    return asdict(found.cost)


def train(spec: TrainingSpec, config: TrainingConfig, method: Method, reporter: Reporter) -> Result | None:
    """Run one training (resuming when possible); the published result on rank 0, None on other ranks."""
    quiet_libraries()
    checkpoint_dir, lead = Path(spec.checkpoint_dir), process_rank() == 0
    checkpoint, resume_run_id = checkpoints.resume_point(checkpoint_dir, spec.force_retrain)
    if checkpoint is None and lead:
        checkpoints.start_fresh(checkpoint_dir)  # nothing to resume: forget what an earlier attempt left
    with tracking(spec, resume_run_id) as run:
        if lead:
            checkpoints.remember_run(checkpoint_dir, run.run_id)
        uri = redact_uri(spec.mlflow.tracking_uri or tracking_uri())
        reporter.info(f"mlflow run {run.run_id} in experiment {spec.mlflow.experiment!r} at {uri}")
        trainer, progress, facts = build_trainer(spec, config, method, reporter, NewStepsOnly(run, bool(resume_run_id)))
        calibrating = time.monotonic()
        calibration = calibrate(spec, trainer, reporter) if spec.sizing and spec.sizing["plan"] and lead else None
        facts["calibration_seconds"] = round(time.monotonic() - calibrating, 1)
        eval_rate = calibration["eval_tokens_per_second"] if calibration else spec.eval_tokens_per_second
        progress.price_evaluations(facts.get("eval_tokens_per_evaluation", 0), eval_rate)
        if resume_run_id is None:
            run.log_params(hyperparameters(spec, config, method, trainer, facts["replay_rows"]))
        if checkpoint:
            reporter.info(f"resuming from {checkpoint.name}")
        reporter.info(f"training: method {method.described()} on {trainer.args.device}, "
                      f"{trainable_parameters(trainer.model):,} trainable parameters")
        trainer.train(resume_from_checkpoint=str(checkpoint) if checkpoint else None)
        eval_loss = final_eval_loss(trainer)
        if not lead:
            return None
        facts.update(
            eval_loss=eval_loss,
            tokens_per_second=round(progress.session_tokens_per_second, 1),
            eval_seconds=round(progress.eval_seconds, 1),
            evaluations=progress.evaluations,
            mlflow_run_id=run.run_id,
            resumed_from_step=checkpoints.checkpoint_step(checkpoint) if checkpoint else 0,
        )
        result = publish(trainer, spec, config, method, facts, calibration)
        checkpoints.finish(checkpoint_dir)  # before the MLflow run is FINISHED: a finished training is never resumed
        run.set_tags({"final_eval_loss": rounded(eval_loss)})  # one number: a tag, not a one-point chart
        run.log_artifact(Path(spec.output_dir), "adapter")
    train_loss = result.metadata["train_loss"]
    reporter.info(f"done: train_loss {train_loss:.4f}, eval_loss {eval_loss:.4f} -> {spec.output_dir}")
    if result.metadata.get("likelihood_displacement"):
        reporter.warning(DISPLACEMENT_WARNING)
    return result


def stop_with_launcher() -> None:
    """When `FTPIPE_LAUNCHER_PID` names the process that started this training (its run worker), stop once that
    process is gone, as on SIGTERM (the MLflow run ends KILLED, the next attempt resumes); exit outright if that has
    not ended the program `STOP_GRACE_SECONDS` later. No training outlives the run that started it."""
    launcher = os.environ.get(LAUNCHER_PID_ENV, "")
    if not launcher.isdigit():
        return

    def watch() -> None:
        while process_alive(int(launcher)):
            time.sleep(LAUNCHER_POLL_SECONDS)
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(STOP_GRACE_SECONDS)
        os._exit(128 + signal.SIGTERM)

    threading.Thread(target=watch, name="launcher-watch", daemon=True).start()


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    unblock_stop_signals()
    stop_with_launcher()
    if len(args) != 1:
        print("usage: python -m ftpipe.core.training SPEC.json", file=sys.stderr)
        return EXIT_REFUSED
    with pipes_reporter() as reporter:
        try:
            spec, config, method = prepare(Path(args[0]))
        except (OSError, TypeError, ValueError) as error:
            reporter.refused(f"training refused: {' '.join(str(error).split())}")
            return EXIT_REFUSED
        leave_out_bitsandbytes(method)
        try:
            result = train(spec, config, method, reporter)
        except RunInterrupted as interrupted:
            reporter.info(f"training stopped: {interrupted}")
            return 128 + interrupted.signum
        except Refused as refused:
            reporter.refused(f"training refused: {refused}")
            return EXIT_REFUSED
        if result is not None:
            reporter.materialization(pipes_metadata(result.metadata), result.produced["data_version"])
    return 0
