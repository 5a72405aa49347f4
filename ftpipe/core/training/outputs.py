"""A finished training's published folder: the weights, the tokenizer, a loss curve and the typed result.

`result.json` (`ftpipe.core.results.Result`, kind `lora_adapter`) says what was written: the weight files, the
method it was trained with, the training config actually used and the data version; its `reuse_key` is the
training fingerprint and its `metadata` the materialization metadata.
"""

from __future__ import annotations

import base64
from pathlib import Path
from typing import Any

from ftpipe.config import TrainingConfig
from ftpipe.core.results import Result
from ftpipe.core.storage import atomic_dir, sha256_of_files
from ftpipe.core.training.methods import Method
from ftpipe.core.training.sizing import peak_memory_gib, process_seconds
from ftpipe.core.training.spec import TrainingSpec

RESULT_KIND = "lora_adapter"
LOSS_CURVE_FILE = "loss_curve.png"
OVERFIT_WINDOW = 3


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


def used_config(config: TrainingConfig, method: Method) -> dict[str, Any]:
    """The training config as it ran: `auto` replaced by the quantization chosen on this machine."""
    return config.model_copy(update={"quantization": method.quantization}).model_dump()


def result_metadata(trainer, spec: TrainingSpec, method: Method, facts: dict[str, Any], loss_curve: Path) -> dict:
    """The `lora_adapter` metadata contract (DESIGN.md) plus extras; `facts` adds the run's and objective's own."""
    history = trainer.state.log_history
    train, _ = loss_points(history)
    return {
        "method": method.label,
        "objective": method.objective,
        "adapter_path": spec.output_dir,
        "train_loss": train[-1][1] if train else float("nan"),
        "trainable_params": trainable_parameters(trainer.model),
        **facts,
        "training_fingerprint": spec.fingerprint,
        "overfitting": detect_overfitting(history),
        "steps": trainer.state.global_step,
        "epochs": round(trainer.state.epoch or 0.0, 3),
        **measured_costs(trainer),
        "loss_curve": markdown_image(loss_curve),
    }


def measured_costs(trainer) -> dict[str, Any]:
    """What the next training's sizing reads: tokens trained (counted as `tokens_per_second` counts them), this
    program's seconds so far and its peak memory (`sizing`)."""
    return {"tokens_trained": trainer.state.num_input_tokens_seen, "program_seconds": round(process_seconds(), 1),
            "peak_memory_gib": round(peak_memory_gib(), 3)}


def publish(trainer, spec: TrainingSpec, config: TrainingConfig, method: Method, facts: dict[str, Any]) -> Result:
    """Write the weights (adapter or whole model) + tokenizer, the loss curve and `result.json` into the output
    dir, replaced atomically; return the result."""
    with atomic_dir(Path(spec.output_dir)) as tmp:
        trainer.save_model(str(tmp))
        (tmp / "training_args.bin").unlink(missing_ok=True)  # a pickle; the config is in the result
        curve = plot_loss_curve(trainer.state.log_history, tmp / LOSS_CURVE_FILE)
        weights = sorted(tmp.glob("*.safetensors"))
        result = Result(
            kind=RESULT_KIND,
            reuse_key=spec.fingerprint,
            produced={
                "weights": [path.name for path in weights],
                **method.facts(),
                "training": used_config(config, method),
                "loss_curve": LOSS_CURVE_FILE,
                "data_version": spec.data_version or sha256_of_files(weights, tmp)[:16],
            },
            inputs={"split_version": spec.split_version, "base_fingerprint": spec.base_fingerprint},
            metadata=result_metadata(trainer, spec, method, facts, curve),
        )
        result.write(tmp)
    return result


def pipes_metadata(metadata: dict[str, Any]) -> dict[str, Any]:
    """Metadata typed for Dagster Pipes (markdown image, path)."""
    typed = {"loss_curve": "md", "adapter_path": "path", "mlflow_run_id": "text", "training_fingerprint": "text"}
    return {key: {"raw_value": value, "type": typed[key]} if key in typed else value for key, value in metadata.items()}
