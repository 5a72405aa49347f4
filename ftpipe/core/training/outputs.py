"""A finished training's published folder: the weights, the tokenizer, a loss curve and the typed result.

`result.json` (`ftpipe.core.results.Result`, kind `lora_adapter`, or `preference_adapter` for a preference objective)
says what was written: the weight files, the method it was trained with, the training config actually used and the
data version; its `reuse_key` is the training fingerprint and its `metadata` the materialization metadata. A
preference training also gets a reward curve, its final eval rewards and the likelihood-displacement warning, and its
adapter applies to the base model (SFT and preference updates together, see `preference.publishable_adapter`).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from ftpipe.config import TrainingConfig
from ftpipe.core.plots import Points, markdown_image, plot_panels
from ftpipe.core.readable import count
from ftpipe.core.results import Result
from ftpipe.core.storage import atomic_dir, sha256_of_files
from ftpipe.core.training import preference
from ftpipe.core.training.checkpoints import checkpoint_step
from ftpipe.core.training.methods import PREFERENCE_OBJECTIVES, REFERENCE_FREE_OBJECTIVES, Method
from ftpipe.core.training.sizing import peak_memory_gib, process_seconds
from ftpipe.core.training.spec import TrainingSpec

LOSS_CURVE_FILE = "loss_curve.png"
REWARD_CURVE_FILE = "reward_curve.png"
OVERFIT_WINDOW = 3


def is_preference(method: Method) -> bool:
    return method.objective in PREFERENCE_OBJECTIVES


def result_kind(method: Method) -> str:
    """The kind of the published result: `preference_adapter` for a preference objective, else `lora_adapter`."""
    return "preference_adapter" if is_preference(method) else "lora_adapter"


def points(log_history: list[dict], key: str) -> Points:
    """(step, value) pairs of one logged value from a Trainer log history."""
    return [(entry["step"], entry[key]) for entry in log_history if key in entry]


def loss_points(log_history: list[dict]) -> tuple[Points, Points]:
    """(train, eval) loss as (step, loss) pairs from a Trainer log history."""
    return points(log_history, "loss"), points(log_history, "eval_loss")


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


DISPLACEMENT_WARNING = ("likelihood displacement: the chosen answers became less likely than before the preference "
                        "stage while the margin grew (rewards/chosen below 0): the preference was learnt by pushing "
                        "both answers down; try a lower training.preference.learning_rate or fewer "
                        "training.preference.max_steps")


def likelihood_displacement(final_evaluation: dict, log_history: list[dict]) -> bool:
    """True when the kept model's chosen answers are less likely than under the reference model (`rewards/chosen` below
    0, on the same rows, unlike two steps' batch means) while its reward margin is positive: the preference is learnt
    by pushing both answers down (the common DPO failure). Read from the final evaluation, else from the last logged
    training step."""
    logged = [entry for entry in log_history if "rewards/chosen" in entry and "rewards/margins" in entry]
    if "eval_rewards/chosen" in final_evaluation and "eval_rewards/margins" in final_evaluation:
        chosen, margin = final_evaluation["eval_rewards/chosen"], final_evaluation["eval_rewards/margins"]
    elif logged:
        chosen, margin = logged[-1]["rewards/chosen"], logged[-1]["rewards/margins"]
    else:
        return False
    return chosen < 0 < margin


def plot_loss_curve(log_history: list[dict], target: Path) -> Path:
    train, evals = loss_points(log_history)
    return plot_panels({"loss": {"train loss": train, "eval loss": evals}}, target)


def plot_reward_curve(log_history: list[dict], target: Path) -> Path:
    """Train rewards (chosen, rejected, margin, accuracy) and log-probabilities (chosen, rejected) by step."""
    rewards = {label: points(log_history, f"rewards/{name}") for label, name in
               (("chosen", "chosen"), ("rejected", "rejected"), ("margin", "margins"), ("accuracy", "accuracies"))}
    logps = {name: points(log_history, f"logps/{name}") for name in ("chosen", "rejected")}
    return plot_panels({"reward": rewards, "log-probability": logps}, target)


def trainable_parameters(model) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def used_config(config: TrainingConfig, method: Method) -> dict[str, Any]:
    """The training config as it ran: `auto` replaced by the quantization chosen on this machine."""
    return config.model_copy(update={"quantization": method.quantization}).model_dump()


def final_evaluation(trainer) -> dict[str, float]:
    """The last eval log of the model training ended with: the best checkpoint's, else the latest one."""
    evals = [entry for entry in trainer.state.log_history if any(key.startswith("eval_") for key in entry)]
    best = trainer.state.best_model_checkpoint
    best_step = checkpoint_step(Path(best)) if best else None
    return next((entry for entry in reversed(evals) if entry["step"] == best_step), evals[-1] if evals else {})


def reward_metadata(trainer, objective: str, reward_curve: Path) -> dict[str, Any]:
    """The preference stage's own metadata: final eval reward accuracy and margin (None where the trainer logs none,
    e.g. no accuracy for kto's unpaired rows: NaN would not be JSON), the likelihood-displacement warning (for
    objectives with a reference model to be displaced from) and the reward curve."""
    final = final_evaluation(trainer)
    return {
        "reward_accuracy": final.get("eval_rewards/accuracies"),
        "reward_margin": final.get("eval_rewards/margins"),
        "likelihood_displacement": objective not in REFERENCE_FREE_OBJECTIVES and likelihood_displacement(
            final, trainer.state.log_history),
        "reward_curve": markdown_image(reward_curve, "reward curve"),
    }


def result_metadata(trainer, spec: TrainingSpec, method: Method, facts: dict[str, Any], folder: Path) -> dict:
    """The `lora_adapter` / preference-stage metadata contract (DESIGN.md) plus extras; `facts` adds the run's and
    objective's own; the curves are read from `folder`."""
    history = trainer.state.log_history
    train, _ = loss_points(history)
    rewards = reward_metadata(trainer, method.objective, folder / REWARD_CURVE_FILE) if is_preference(method) else {}
    return {
        "method": method.label,
        "objective": method.objective,
        "adapter_path": spec.output_dir,
        "train_loss": train[-1][1] if train else float("nan"),
        "trainable_params": trainable_parameters(trainer.model),
        **facts,
        **rewards,
        "training_fingerprint": spec.fingerprint,
        **warm_start_metadata(spec),
        "overfitting": detect_overfitting(history),
        "steps": trainer.state.global_step,
        "epochs": round(trainer.state.epoch or 0.0, 3),
        **measured_costs(trainer),
        "loss_curve": markdown_image(folder / LOSS_CURVE_FILE, "loss curve"),
    }


def warm_start_metadata(spec: TrainingSpec) -> dict[str, Any]:
    """Whether an SFT training was warm-started (`retrain.warm_start`) and from which training, on how many rows."""
    if spec.warm_start is None:
        return {"warm_started": False} if spec.start_adapter is None else {}
    return {"warm_started": True, "warm_start_from": spec.warm_start["from"],
            "warm_start_new_rows": spec.warm_start["new_rows"], "warm_start_replayed_rows": spec.warm_start["replayed_rows"]}


def measured_costs(trainer) -> dict[str, Any]:
    """What the next training's sizing reads: tokens trained (counted as `tokens_per_second` counts them), this
    program's seconds so far and its peak memory (`sizing`)."""
    return {"tokens_trained": trainer.state.num_input_tokens_seen, "program_seconds": round(process_seconds(), 1),
            "peak_memory_mb": round(peak_memory_gib() * 1024)}


def write_curves(trainer, method: Method, folder: Path) -> dict[str, str]:
    """The loss curve, and for a preference objective the reward curve, as PNGs in `folder`: {name: file}."""
    history = trainer.state.log_history
    plot_loss_curve(history, folder / LOSS_CURVE_FILE)
    if not is_preference(method):
        return {"loss_curve": LOSS_CURVE_FILE}
    plot_reward_curve(history, folder / REWARD_CURVE_FILE)
    return {"loss_curve": LOSS_CURVE_FILE, "reward_curve": REWARD_CURVE_FILE}


def result_inputs(spec: TrainingSpec) -> dict[str, Any]:
    """The versions a training was made from: the split, base model and recipe, the training it started from and
    its warm start, if any."""
    inputs = {"split_version": spec.split_version, "base_fingerprint": spec.base_fingerprint,
              "recipe_version": spec.recipe_version, "start_adapter": spec.start_adapter, "warm_start": spec.warm_start}
    return {key: value for key, value in inputs.items() if value is not None}


def weights_readme(spec: TrainingSpec, method: Method, metadata: dict[str, Any]) -> str:
    """README.md of the published weights, in place of the library's empty template: what they are, and where their
    evaluation and the servable model's card are."""
    return (f"# ftpipe-{spec.task}: {method.described()}\n\n"
            f"Trained from `{Path(spec.base_model_dir).name}` on split {spec.split_version} for {metadata['steps']} "
            f"steps: train loss {metadata['train_loss']:.3f}, {count(metadata['trainable_params'])} trainable "
            "parameters.\n\nThe task's `eval_report` compares it with its base model; once its gate passes, "
            "`merged_model` holds the servable model with its model card (evaluation, gate and serving).\n")


def publish(trainer, spec: TrainingSpec, config: TrainingConfig, method: Method, facts: dict[str, Any],
            calibration: dict[str, Any] | None = None) -> Result:
    """Write the weights (an adapter on the base model, or a whole model) + tokenizer, the curves and `result.json`
    into the output dir, replaced atomically; return the result (with the sizing `calibration` the program ran, if
    any)."""
    with atomic_dir(Path(spec.output_dir)) as tmp:
        trainer.save_model(str(tmp))
        (tmp / "training_args.bin").unlink(missing_ok=True)  # a pickle; the config is in the result
        preference.publishable_adapter(tmp, spec, method)
        curves = write_curves(trainer, method, tmp)
        weights = sorted(tmp.glob("*.safetensors"))
        metadata = result_metadata(trainer, spec, method, facts, tmp)
        (tmp / "README.md").write_text(weights_readme(spec, method, metadata), encoding="utf-8")
        result = Result(
            kind=result_kind(method),
            reuse_key=spec.fingerprint,
            produced={
                "weights": [path.name for path in weights],
                **method.facts(),
                "training": used_config(config, method),
                **curves,
                "data_version": spec.data_version or sha256_of_files(weights, tmp)[:16],
                **({"calibration": calibration} if calibration else {}),
            },
            inputs=result_inputs(spec),
            metadata=metadata,
        )
        result.write(tmp)
    return result


def pipes_metadata(metadata: dict[str, Any]) -> dict[str, Any]:
    """Metadata typed for Dagster Pipes (markdown image, path)."""
    typed = {"loss_curve": "md", "reward_curve": "md", "adapter_path": "path", "mlflow_run_id": "text",
             "training_fingerprint": "text"}
    return {key: {"raw_value": value, "type": typed[key]} if key in typed else value for key, value in metadata.items()}
