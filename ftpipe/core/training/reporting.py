"""What the training tells people and Dagster: log lines through Pipes (or stdout), progress as MLflow metrics."""

from __future__ import annotations

import logging
import os
import sys
import time
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from ftpipe.core import readable
from ftpipe.core.launch import REFUSAL_NOTE_ENV

REWARD_METRICS = ("rewards/chosen", "rewards/rejected", "rewards/accuracies", "rewards/margins", "logps/chosen",
                  "logps/rejected")  # logged by TRL's preference trainers (kto: no accuracies), and with eval_ in front
PROGRESS_METRICS = ("train_loss", "learning_rate", "grad_norm", "tokens_per_second", "eval_loss", *REWARD_METRICS,
                    *(f"eval_{name}" for name in REWARD_METRICS))


def process_rank() -> int:
    """This process's rank under torchrun (0 when launched alone)."""
    return int(os.environ.get("RANK", "0"))


class Reporter:
    """Log lines and the final materialization through Dagster Pipes (rank 0 only); echoed to stdout outside Dagster."""

    def __init__(self, pipes, echo: bool):
        self.pipes = pipes
        self.echo = echo

    def info(self, message: str) -> None:
        self._log("info", message)

    def warning(self, message: str) -> None:
        self._log("warning", message)

    def _log(self, level: str, message: str) -> None:
        if self.pipes is not None:
            getattr(self.pipes.log, level)(message)
        if self.echo:
            print(message, flush=True)

    def refused(self, message: str) -> None:
        """Why the spec was refused, in one line said once: in the launcher's note file when it gave one (its step
        failure states it), else in the Dagster log under Dagster, else on stderr."""
        if note := os.environ.get(REFUSAL_NOTE_ENV):
            try:
                Path(note).write_text(message, encoding="utf-8")
                return
            except OSError:
                pass
        if self.pipes is not None and not self.echo:
            self.pipes.log.error(message)
        else:
            print(message, file=sys.stderr, flush=True)

    def materialization(self, metadata: dict[str, Any], data_version: str) -> None:
        if self.pipes is not None:
            self.pipes.report_asset_materialization(metadata=metadata, data_version=data_version)


@contextmanager
def pipes_reporter() -> Iterator[Reporter]:
    """Rank 0 talks to Dagster through Pipes; other torchrun ranks stay silent."""
    from dagster_pipes import PipesEnvVarParamsLoader, open_dagster_pipes

    if process_rank() != 0:
        yield Reporter(None, echo=False)
        return
    under_dagster = PipesEnvVarParamsLoader().is_dagster_pipes_process()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # outside Dagster it warns and returns a no-op mock
        context = open_dagster_pipes()
    with context as pipes:
        yield Reporter(pipes, echo=not under_dagster)


def quiet_libraries() -> None:
    """Keep the log readable: errors only from transformers / TRL / datasets, no progress bars."""
    import datasets
    import transformers

    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    transformers.logging.set_verbosity_error()
    transformers.logging.disable_progress_bar()
    datasets.disable_progress_bars()
    datasets.logging.set_verbosity_error()
    logging.getLogger("trl").setLevel(logging.ERROR)
    warnings.filterwarnings("ignore", category=UserWarning, module=r"(torch|transformers|trl|peft)\.")
    warnings.filterwarnings("ignore", category=FutureWarning)


class NewStepsOnly:
    """Logs a metric only at steps past the last one the MLflow run already has for it.

    A resumed training repeats the steps between its checkpoint and the moment the previous attempt stopped;
    those were logged then, so every metric history keeps one point per step however often the run resumes.
    """

    def __init__(self, run, resumed: bool):
        self.run = run
        self.logged_through = last_logged_steps(run) if resumed else {}

    def log_metrics(self, metrics: dict[str, float], step: int) -> None:
        fresh = {key: value for key, value in metrics.items() if step > self.logged_through.get(key, -1)}
        self.run.log_metrics(fresh, step=step)


def last_logged_steps(run) -> dict[str, int]:
    """The last step of each progress metric already in the run (a tracking.RunLogger; none without a client)."""
    if run.client is None:
        return {}
    steps = {key: [m.step for m in run.client.get_metric_history(run.run_id, key)] for key in PROGRESS_METRICS}
    return {key: max(found) for key, found in steps.items() if found}


def reward_text(logs: dict[str, float], prefix: str = "") -> str:
    """`, reward margin 0.12, accuracy 0.75` from a preference trainer's logs; empty for other trainers."""
    shown = {"reward margin": f"{prefix}rewards/margins", "accuracy": f"{prefix}rewards/accuracies"}
    return "".join(f", {label} {logs[key]:.3f}" for label, key in shown.items() if key in logs)


EVAL_PROGRESS_SECONDS = 30


def evaluations_left(step: int, max_steps: int, eval_steps: int) -> int:
    """The evaluations a training whose step `step` just ended still runs (that step's included: it is logged before
    it is evaluated): every `eval_steps` steps and at the last of `max_steps`."""
    return max_steps // eval_steps - (step - 1) // eval_steps + (1 if max_steps % eval_steps else 0)


def progress_callback(reporter: Reporter, run, sizing_entry: dict[str, Any] | None = None):
    """A TrainerCallback: one progress line per logging step, the last step and each evaluation, mirrored as MLflow
    metrics. With `sizing_entry` of a training not sized before it starts (`sizing.after_first_step`), its first step
    gives the estimate, and a warning when it outlasts the run's `dagster/max_runtime`."""
    from transformers import TrainerCallback

    from ftpipe.core.training.sizing import over_runtime, process_seconds

    unsized = sizing_entry is not None and sizing_entry["plan"] is None

    class Progress(TrainerCallback):
        evaluation_priced = 0.0  # seconds an evaluation takes before one is timed (`price_evaluations`)

        def price_evaluations(self, eval_tokens: int, tokens_per_second: float | None) -> None:
            """Count each evaluation in the time left, until one is timed, as `eval_tokens` at this rate (the
            calibration's or the previous training's; None: unknown, left out)."""
            self.evaluation_priced = eval_tokens / tokens_per_second if tokens_per_second else 0.0

        def on_train_begin(self, args, state, control, **kwargs):
            self.started = self.last_time = self.step_ended = time.monotonic()
            self.start_step = state.global_step
            self.start_tokens = self.last_tokens = state.num_input_tokens_seen
            self.session_tokens_per_second = 0.0
            self.eval_seconds, self.evaluations, self.eval_seconds_at_last = 0.0, 0, 0.0
            self.eval_steps = args.eval_steps
            self.eval_batches = 0  # of the evaluation under way

        def on_step_end(self, args, state, control, **kwargs):
            self.step_ended = time.monotonic()
            if unsized and state.global_step == self.start_step + 1:
                self._first_step_sizing(state)
            if state.global_step >= state.max_steps:  # the last step is logged too, however short the run
                control.should_log = True
            if control.should_evaluate and not control.should_log:  # else said after the step's line
                self._evaluating(state)

        def on_evaluate(self, args, state, control, **kwargs):  # an evaluation runs right after a step ends
            self.eval_seconds += time.monotonic() - self.step_ended
            self.evaluations += 1
            self.eval_batches = 0

        def on_prediction_step(self, args, state, control, eval_dataloader=None, **kwargs):
            """A line every EVAL_PROGRESS_SECONDS of an evaluation (on long rows it takes minutes), with the time
            left at the pace since its first batch (which warms up)."""
            now = time.monotonic()
            self.eval_batches += 1
            if self.eval_batches == 1:
                self.eval_began = self.eval_said = now
                return
            if eval_dataloader is None or now - self.eval_said < EVAL_PROGRESS_SECONDS:
                return
            self.eval_said, total = now, len(eval_dataloader)
            left = (now - self.eval_began) / (self.eval_batches - 1) * (total - self.eval_batches)
            reporter.info(f"step {state.global_step}/{state.max_steps}: evaluated {self.eval_batches} of {total} "
                          f"batches, ~{readable.duration(left)} left")

        def on_log(self, args, state, control, logs=None, **kwargs):
            logs = logs or {}
            if "loss" in logs:
                self._train_line(state, logs)
                if control.should_evaluate:
                    self._evaluating(state)
            if "eval_loss" in logs:
                reporter.info(f"eval step {state.global_step}/{state.max_steps}: eval_loss {logs['eval_loss']:.4f}"
                              f"{reward_text(logs, 'eval_')}")
                evals = ("eval_loss", *(f"eval_{name}" for name in REWARD_METRICS))
                run.log_metrics({key: logs[key] for key in evals if key in logs}, step=state.global_step)

        def _first_step_sizing(self, state):
            """The time the other steps need at the first one's pace (it includes warming up, so it errs long)."""
            step = self.step_ended - self.started
            left = step * (state.max_steps - state.global_step)
            reporter.info(f"sizing: step {state.global_step}/{state.max_steps} took {readable.duration(step)}: "
                          f"~{readable.duration(left)} for the other steps, evaluations apart")
            run_left = sizing_entry["seconds_left"]  # when the asset launched this program
            warning = over_runtime(left, None if run_left is None else run_left - process_seconds(),
                                   "the other steps need")
            if warning:
                reporter.warning(warning)

        def _evaluating(self, state):
            """Said as an evaluation starts: on long rows it takes minutes."""
            reporter.info(f"step {state.global_step}/{state.max_steps}: evaluating on the eval rows")

        def _train_line(self, state, logs):
            """The step's loss, the training speed since the last line and the time left, evaluations apart: their
            time is left out of the speed and counted in the time left at their own pace (as priced until then)."""
            now, tokens = time.monotonic(), state.num_input_tokens_seen
            evaluating = self.eval_seconds - self.eval_seconds_at_last
            speed = (tokens - self.last_tokens) / max(now - self.last_time - evaluating, 1e-9)
            self.last_time, self.last_tokens, self.eval_seconds_at_last = now, tokens, self.eval_seconds
            self.session_tokens_per_second = (tokens - self.start_tokens) / max(
                now - self.started - self.eval_seconds, 1e-9)
            done = state.global_step - self.start_step
            per_step = (now - self.started - self.eval_seconds) / max(done, 1)
            per_evaluation = self.eval_seconds / self.evaluations if self.evaluations else self.evaluation_priced
            eta = (per_step * (state.max_steps - state.global_step)
                   + per_evaluation * evaluations_left(state.global_step, state.max_steps, self.eval_steps))
            reporter.info(
                f"step {state.global_step}/{state.max_steps}: loss {logs['loss']:.4f}{reward_text(logs)}, "
                f"lr {logs.get('learning_rate', 0.0):.2e}, {speed:.0f} tokens/s, ETA {readable.duration(eta)}"
            )
            metrics = {
                "train_loss": logs["loss"],
                "learning_rate": logs.get("learning_rate"),
                "grad_norm": logs.get("grad_norm"),
                "tokens_per_second": speed,
                **{name: logs.get(name) for name in REWARD_METRICS},
            }
            run.log_metrics({k: v for k, v in metrics.items() if v is not None}, step=state.global_step)

    return Progress()
