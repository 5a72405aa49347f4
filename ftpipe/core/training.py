"""Supervised fine-tuning (LoRA / QLoRA / full) with TRL, as an ordinary program:

    python -m ftpipe.core.training SPEC.json

It reports through Dagster Pipes when Dagster launched it (and prints to stdout otherwise), tracks the
run in MLflow, resumes from the latest complete checkpoint, and writes the adapter dir atomically with
`training_result.json` (the materialization metadata) and `loss_curve.png` inside.
"""

from __future__ import annotations

import base64
import hashlib
import json
import logging
import os
import shutil
import sys
import time
import warnings
from collections.abc import Iterator
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ftpipe.config import TrainingConfig
from ftpipe.core.modeling import check_method, load_model_and_tokenizer
from ftpipe.core.storage import atomic_dir, file_sha256, write_text
from ftpipe.core.tracking import RunInterrupted, RunLogger, redact_uri, tracked_run, tracking_uri

RESULT_FILE = "training_result.json"
LOSS_CURVE_FILE = "loss_curve.png"
CONFIG_FILE = "training_config.json"
RUN_ID_FILE = "mlflow_run_id"
OVERFIT_WINDOW = 3


@dataclass
class MlflowSpec:
    experiment: str
    run_name: str | None = None
    tracking_uri: str | None = None  # None: MLFLOW_TRACKING_URI, else sqlite under $FTPIPE_HOME
    tags: dict[str, str] = field(default_factory=dict)  # e.g. dagster run id, data versions, code version


@dataclass
class TrainingSpec:
    """The JSON file given to `python -m ftpipe.core.training` (all paths absolute or relative to the cwd)."""

    task: str
    base_model_dir: str  # resolved base model (modeling.resolve_base_model()["path"])
    base_fingerprint: str
    train_path: str  # parquet: id, messages (list of {role, content}, last one assistant), source
    eval_path: str
    output_dir: str  # final adapter dir, replaced atomically
    checkpoint_dir: str  # keyed by training_fingerprint(); holds checkpoint-N/ and mlflow_run_id
    training: dict[str, Any]  # ftpipe.config.TrainingConfig
    trust_remote_code: bool = False
    mlflow: MlflowSpec | dict[str, Any] | None = None  # a dict is read as MlflowSpec; experiment defaults to task
    data_version: str | None = None  # reported to Dagster; default: hash of the adapter weights

    def __post_init__(self):
        if not isinstance(self.mlflow, MlflowSpec):
            self.mlflow = MlflowSpec(**{"experiment": self.task, **(self.mlflow or {})})

    @classmethod
    def from_json(cls, path: Path) -> TrainingSpec:
        return cls(**json.loads(path.read_text(encoding="utf-8")))


def training_fingerprint(split_version: str, base_fingerprint: str, training_config: dict[str, Any]) -> str:
    """Identity of a training (data split, base model, config): names its checkpoint dir, so reruns resume."""
    canonical = json.dumps(
        {"split": split_version, "base": base_fingerprint, "training": training_config}, sort_keys=True, default=str
    )
    return hashlib.sha256(canonical.encode()).hexdigest()[:16]


def process_rank() -> int:
    """This process's rank under torchrun (0 when launched alone)."""
    return int(os.environ.get("RANK", "0"))


def world_size() -> int:
    return int(os.environ.get("WORLD_SIZE", "1"))


class Reporter:
    """Log lines and the final materialization through Dagster Pipes (rank 0 only); echoed to stdout outside Dagster."""

    def __init__(self, pipes, echo: bool):
        self.pipes = pipes
        self.echo = echo

    def info(self, message: str) -> None:
        if self.pipes is not None:
            self.pipes.log.info(message)
        if self.echo:
            print(message, flush=True)


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


# ---------------------------------------------------------------- data


def read_chat_rows(path: Path) -> list[list[dict[str, str]]]:
    """The `messages` of every row of a canonical parquet file."""
    import pandas as pd

    frame = pd.read_parquet(path, columns=["messages"])
    return [[{"role": m["role"], "content": m["content"]} for m in messages] for messages in frame["messages"]]


def chat_length(tokenizer, messages: list[dict[str, str]]) -> int:
    return len(tokenizer.apply_chat_template(messages, tokenize=True, return_dict=True)["input_ids"])


def to_prompt_completion(messages: list[dict[str, str]]) -> dict[str, list[dict[str, str]]]:
    """Conversational prompt/completion: TRL then puts the loss on the final assistant turn only."""
    if messages[-1]["role"] != "assistant":
        raise ValueError(f"a training row must end with an assistant message, got {messages[-1]['role']!r}")
    return {"prompt": messages[:-1], "completion": messages[-1:]}


def fit_rows(conversations, tokenizer, max_length: int, too_long: str) -> tuple[list[dict], int]:
    """Prompt/completion rows, over-long ones dropped (too_long=drop) or kept for TRL to truncate; and their count."""
    rows, over = [], 0
    for messages in conversations:
        is_long = chat_length(tokenizer, messages) > max_length
        over += is_long
        if not (is_long and too_long == "drop"):
            rows.append(to_prompt_completion(messages))
    return rows, over


def build_datasets(spec: TrainingSpec, config: TrainingConfig, tokenizer, reporter: Reporter):
    from datasets import Dataset

    train, train_over = fit_rows(read_chat_rows(Path(spec.train_path)), tokenizer, config.max_length, config.too_long)
    evals, eval_over = fit_rows(read_chat_rows(Path(spec.eval_path)), tokenizer, config.max_length, config.too_long)
    if not train or not evals:
        raise ValueError(
            f"no {'training' if not train else 'eval'} rows left: every row is longer than "
            f"max_length={config.max_length} tokens; raise training.max_length or use too_long: truncate"
        )
    rows_too_long = train_over + eval_over
    action = "dropped" if config.too_long == "drop" else "truncated"
    reporter.info(
        f"data: {len(train)} train / {len(evals)} eval rows; "
        f"{rows_too_long} over {config.max_length} tokens {action}"
    )
    return Dataset.from_list(train), Dataset.from_list(evals), rows_too_long


# ---------------------------------------------------------------- checkpoints


def is_complete_checkpoint(path: Path) -> bool:
    """A checkpoint-N dir whose trainer state (written last) parses, with weights and optimizer beside it."""
    try:
        state = json.loads((path / "trainer_state.json").read_text())
    except (OSError, ValueError):
        return False
    has_weights = any(path.glob("*.safetensors"))
    return has_weights and (path / "optimizer.pt").is_file() and state.get("global_step") == checkpoint_step(path)


def checkpoint_step(path: Path) -> int:
    return int(path.name.removeprefix("checkpoint-"))


def latest_complete_checkpoint(checkpoint_dir: Path) -> Path | None:
    """The newest complete checkpoint; incomplete ones (a killed save) are deleted."""
    candidates = sorted(checkpoint_dir.glob("checkpoint-[0-9]*"), key=checkpoint_step)
    complete = [path for path in candidates if is_complete_checkpoint(path)]
    for path in set(candidates) - set(complete):
        shutil.rmtree(path, ignore_errors=True)
    return complete[-1] if complete else None


# ---------------------------------------------------------------- trainer


def lora_config(config: TrainingConfig):
    from peft import LoraConfig

    return LoraConfig(
        r=config.lora.r,
        lora_alpha=config.lora.alpha,
        lora_dropout=config.lora.dropout,
        target_modules=config.lora.target_modules,
        task_type="CAUSAL_LM",
    )


def sft_config(config: TrainingConfig, checkpoint_dir: Path):
    import torch
    from trl import SFTConfig

    on_gpu = torch.cuda.is_available()
    return SFTConfig(
        output_dir=str(checkpoint_dir),
        num_train_epochs=config.epochs,
        max_steps=config.max_steps,
        per_device_train_batch_size=config.batch_size // world_size(),  # batch_size is the global batch
        per_device_eval_batch_size=config.batch_size // world_size(),
        gradient_accumulation_steps=config.gradient_accumulation,
        learning_rate=config.learning_rate,
        lr_scheduler_type=config.scheduler,
        warmup_steps=config.warmup_ratio,  # a value below 1 is a fraction of all steps
        weight_decay=config.weight_decay,
        seed=config.seed,
        max_length=config.max_length,
        packing=config.packing,
        completion_only_loss=True,
        eval_strategy="steps",
        eval_steps=config.eval_steps,
        save_strategy="steps",
        save_steps=config.eval_steps,
        save_total_limit=config.save_total_limit,
        load_best_model_at_end=True,
        metric_for_best_model="eval_loss",
        greater_is_better=False,
        restore_callback_states_from_checkpoint=True,
        logging_strategy="steps",
        logging_steps=config.logging_steps,
        include_num_input_tokens_seen="non_padding",
        report_to="none",
        disable_tqdm=True,
        use_cpu=not on_gpu,
        bf16=on_gpu and torch.cuda.is_bf16_supported(),
        activation_checkpointing=on_gpu,
        dataloader_num_workers=0,
        ddp_backend="gloo" if world_size() > 1 and not on_gpu else None,
    )


def progress_callback(reporter: Reporter, run: RunLogger):
    """A TrainerCallback: one progress line per logging step and per evaluation, mirrored as MLflow metrics."""
    from transformers import TrainerCallback

    class Progress(TrainerCallback):
        def on_train_begin(self, args, state, control, **kwargs):
            self.started = self.last_time = time.monotonic()
            self.start_step = state.global_step
            self.start_tokens = self.last_tokens = state.num_input_tokens_seen
            self.session_tokens_per_second = 0.0

        def on_log(self, args, state, control, logs=None, **kwargs):
            logs = logs or {}
            if "loss" in logs:
                self._train_line(state, logs)
            if "eval_loss" in logs:
                reporter.info(f"eval step {state.global_step}/{state.max_steps}: eval_loss {logs['eval_loss']:.4f}")
                run.log_metrics({"eval_loss": logs["eval_loss"]}, step=state.global_step)

        def _train_line(self, state, logs):
            now, tokens = time.monotonic(), state.num_input_tokens_seen
            speed = (tokens - self.last_tokens) / max(now - self.last_time, 1e-9)
            self.last_time, self.last_tokens = now, tokens
            self.session_tokens_per_second = (tokens - self.start_tokens) / max(now - self.started, 1e-9)
            done = state.global_step - self.start_step
            eta = (now - self.started) / max(done, 1) * (state.max_steps - state.global_step)
            reporter.info(
                f"step {state.global_step}/{state.max_steps}: loss {logs['loss']:.4f}, "
                f"lr {logs.get('learning_rate', 0.0):.2e}, {speed:.0f} tokens/s, ETA {eta:.0f}s"
            )
            metrics = {
                "train_loss": logs["loss"],
                "learning_rate": logs.get("learning_rate"),
                "grad_norm": logs.get("grad_norm"),
                "tokens_per_second": speed,
            }
            run.log_metrics({k: v for k, v in metrics.items() if v is not None}, step=state.global_step)

    return Progress()


def build_trainer(spec: TrainingSpec, config: TrainingConfig, method: str, reporter: Reporter, run: RunLogger):
    from transformers import EarlyStoppingCallback, PrinterCallback
    from trl import SFTTrainer

    model, tokenizer = load_model_and_tokenizer(
        spec.base_model_dir, method=method, trust_remote_code=spec.trust_remote_code
    )
    train, evals, rows_too_long = build_datasets(spec, config, tokenizer, reporter)
    trainer = SFTTrainer(
        model=model,
        args=sft_config(config, Path(spec.checkpoint_dir)),
        train_dataset=train,
        eval_dataset=evals,
        processing_class=tokenizer,
        peft_config=None if method == "full" else lora_config(config),
        callbacks=[EarlyStoppingCallback(early_stopping_patience=config.early_stopping_patience)],
    )
    progress = progress_callback(reporter, run)
    trainer.remove_callback(PrinterCallback)  # our Progress callback prints one concise line instead
    trainer.add_callback(progress)
    return trainer, progress, rows_too_long


# ---------------------------------------------------------------- results


def loss_points(log_history: list[dict]) -> tuple[list[tuple[int, float]], list[tuple[int, float]]]:
    """(train, eval) loss as (step, loss) pairs from a Trainer log history."""
    train = [(entry["step"], entry["loss"]) for entry in log_history if "loss" in entry]
    evals = [(entry["step"], entry["eval_loss"]) for entry in log_history if "eval_loss" in entry]
    return train, evals


def detect_overfitting(log_history: list[dict], window: int = OVERFIT_WINDOW) -> bool:
    """True when eval loss rose over the last `window` evaluations while train loss fell over the same steps."""
    train, evals = loss_points(log_history)
    if len(evals) < window or not train:
        return False
    recent = [loss for _, loss in evals[-window:]]
    eval_rising = all(later > earlier for earlier, later in zip(recent, recent[1:]))
    first_step, last_step = evals[-window][0], evals[-1][0]
    train_then = [loss for step, loss in train if step <= first_step]
    train_now = [loss for step, loss in train if first_step < step <= last_step]
    return eval_rising and bool(train_then) and bool(train_now) and train_now[-1] < train_then[-1]


def plot_loss_curve(log_history: list[dict], target: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    train, evals = loss_points(log_history)
    figure, axes = plt.subplots(figsize=(6, 3.5), dpi=100)
    for points, label, style in ((train, "train loss", "-"), (evals, "eval loss", "o-")):
        if points:
            axes.plot(*zip(*points), style, label=label)
    axes.set_xlabel("step")
    axes.set_ylabel("loss")
    axes.legend()
    axes.grid(alpha=0.3)
    figure.tight_layout()
    figure.savefig(target)
    plt.close(figure)
    return target


def markdown_image(png: Path) -> str:
    encoded = base64.b64encode(png.read_bytes()).decode()
    return f"![loss curve](data:image/png;base64,{encoded})"


def trainable_parameters(model) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def write_outputs(trainer, output_dir: Path, config: TrainingConfig, facts: dict[str, Any]) -> dict[str, Any]:
    """Write adapter (or full model) + tokenizer, loss curve, resolved config and the metadata as
    `training_result.json` into `output_dir` (replaced atomically); return the metadata."""
    with atomic_dir(output_dir) as tmp:
        trainer.save_model(str(tmp))
        (tmp / "training_args.bin").unlink(missing_ok=True)  # a pickle; the config is in training_config.json
        plot_loss_curve(trainer.state.log_history, tmp / LOSS_CURVE_FILE)
        (tmp / CONFIG_FILE).write_text(json.dumps({**config.model_dump(), "method": facts["method"]}, indent=2))
        metadata = result_metadata(trainer, output_dir, facts, tmp / LOSS_CURVE_FILE)
        (tmp / RESULT_FILE).write_text(json.dumps(metadata, indent=2))
    return metadata


def train(spec: TrainingSpec, reporter: Reporter) -> dict[str, Any]:
    """Run one training (resuming when possible) and return the materialization metadata."""
    config = TrainingConfig.model_validate(spec.training)
    method = check_method(config.method)
    quiet_libraries()
    checkpoint_dir, output_dir = Path(spec.checkpoint_dir), Path(spec.output_dir)
    checkpoint_dir.mkdir(parents=True, exist_ok=True)
    checkpoint = latest_complete_checkpoint(checkpoint_dir)
    run_id_file = checkpoint_dir / RUN_ID_FILE
    resume_run_id = run_id_file.read_text().strip() if checkpoint and run_id_file.exists() else None
    tags = {"task": spec.task, "base_fingerprint": spec.base_fingerprint, **spec.mlflow.tags}
    uri = spec.mlflow.tracking_uri or tracking_uri()
    run_name = spec.mlflow.run_name or spec.task
    lead = process_rank() == 0
    tracking = (tracked_run(spec.mlflow.experiment, run_name=run_name, tags=tags, resume_run_id=resume_run_id, uri=uri)
                if lead else nullcontext(RunLogger(None, "")))
    with tracking as run:
        if lead:
            write_text(run_id_file, run.run_id)
        reporter.info(f"mlflow run {run.run_id} in experiment {spec.mlflow.experiment!r} at {redact_uri(uri)}")
        trainer, progress, rows_too_long = build_trainer(spec, config, method, reporter, run)
        if resume_run_id is None:
            run.log_params(hyperparameters(config, method, spec, trainer))
        if checkpoint:
            reporter.info(f"resuming from {checkpoint.name}")
        reporter.info(f"training: method {method}, {trainable_parameters(trainer.model):,} trainable parameters")
        trainer.train(resume_from_checkpoint=str(checkpoint) if checkpoint else None)
        eval_loss = final_eval_loss(trainer)
        facts = {
            "method": method,
            "eval_loss": eval_loss,
            "tokens_per_second": round(progress.session_tokens_per_second, 1),
            "rows_too_long": rows_too_long,
            "mlflow_run_id": run.run_id,
            "resumed_from_step": checkpoint_step(checkpoint) if checkpoint else 0,
        }
        if not lead:
            return {}
        metadata = write_outputs(trainer, output_dir, config, facts)
        run.log_metrics({"final_eval_loss": eval_loss}, step=trainer.state.global_step)
        run.log_artifact(output_dir, "adapter")
        run.log_artifact(output_dir / CONFIG_FILE)
        run.log_artifact(output_dir / LOSS_CURVE_FILE)
    reporter.info(f"done: train_loss {metadata['train_loss']:.4f}, eval_loss {eval_loss:.4f} -> {output_dir}")
    return metadata


def final_eval_loss(trainer) -> float:
    """The eval loss of the model training ended with (the best checkpoint's).

    The Trainer evaluates at the last step and loads the best checkpoint at the end, so it knows that loss
    already; another pass over the eval rows would only repeat it. Evaluated only when no best checkpoint was kept.
    """
    best = trainer.state.best_model_checkpoint
    if trainer.state.best_metric is not None and best is not None and Path(best).is_dir():
        return float(trainer.state.best_metric)
    return trainer.evaluate(metric_key_prefix="final_eval")["final_eval_loss"]


def hyperparameters(config: TrainingConfig, method: str, spec: TrainingSpec, trainer) -> dict[str, Any]:
    values = {key: value for key, value in config.model_dump().items() if key != "lora"}
    values.update({f"lora.{key}": value for key, value in config.lora.model_dump().items()} if method != "full" else {})
    values.update(
        method=method,
        base_fingerprint=spec.base_fingerprint,
        train_rows=len(trainer.train_dataset),
        eval_rows=len(trainer.eval_dataset),
        trainable_params=trainable_parameters(trainer.model),
    )
    return values


def result_metadata(trainer, output_dir: Path, facts: dict[str, Any], loss_curve: Path) -> dict[str, Any]:
    """The `lora_adapter` metadata contract (DESIGN.md) plus extras."""
    history = trainer.state.log_history
    train, _ = loss_points(history)
    return {
        "method": facts["method"],
        "adapter_path": str(output_dir),
        "train_loss": train[-1][1] if train else float("nan"),
        "eval_loss": facts["eval_loss"],
        "trainable_params": trainable_parameters(trainer.model),
        "tokens_per_second": facts["tokens_per_second"],
        "rows_too_long": facts["rows_too_long"],
        "mlflow_run_id": facts["mlflow_run_id"],
        "overfitting": detect_overfitting(history),
        "resumed_from_step": facts["resumed_from_step"],
        "steps": trainer.state.global_step,
        "epochs": round(trainer.state.epoch or 0.0, 3),
        "loss_curve": markdown_image(loss_curve),
    }


def pipes_metadata(metadata: dict[str, Any]) -> dict[str, Any]:
    """Metadata typed for Dagster Pipes (markdown image, path)."""
    typed = {"loss_curve": "md", "adapter_path": "path", "mlflow_run_id": "text"}
    return {key: {"raw_value": value, "type": typed[key]} if key in typed else value for key, value in metadata.items()}


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if len(args) != 1:
        print("usage: python -m ftpipe.core.training SPEC.json", file=sys.stderr)
        return 2
    spec = TrainingSpec.from_json(Path(args[0]))
    with pipes_reporter() as reporter:
        try:
            metadata = train(spec, reporter)
        except RunInterrupted as interrupted:
            reporter.info(f"training stopped: {interrupted}")
            return 128 + interrupted.signum
        if process_rank() != 0:
            return 0
        adapter = Path(metadata["adapter_path"])
        weights = next(adapter.glob("*.safetensors"))
        reporter.pipes.report_asset_materialization(
            metadata=pipes_metadata(metadata), data_version=spec.data_version or file_sha256(weights)[:16]
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
