"""The training-method vocabulary, interpreted here and nowhere else.

A method is three orthogonal settings of `training` in task.yaml:

- `objective`: what the trainer optimises (`sft` or `distill` on chat rows, then optionally a preference objective
  `dpo`/`orpo`/`kto`; each objective is one module of this package, see OBJECTIVES); `training.stages` says which
  run one after the other,
- `adapter`: `lora` trains a LoRA adapter on the frozen base, `none` trains every weight (a full fine-tune),
- `quantization`: `none` trains on 16/32-bit base weights, `4bit` on NF4 weights (QLoRA: needs CUDA and an
  adapter), `auto` picks `4bit` where the training runs on a CUDA GPU and `none` elsewhere.

`method: auto | lora | qlora | full` is a shorthand for adapter + quantization. `auto` is resolved where the
training runs (`resolve_method`), so a CPU-only orchestrator can launch a 4-bit training on a GPU pod.
"""

from __future__ import annotations

import sys
from dataclasses import asdict, dataclass
from typing import Any, Literal


@dataclass(frozen=True)
class ObjectiveEntry:
    module: str  # defines `build_trainer(setup: TrainerSetup) -> (trainer, facts)`
    description: str


OBJECTIVES = {
    "sft": ObjectiveEntry("ftpipe.core.training.sft", "supervised fine-tuning"),
    "dpo": ObjectiveEntry("ftpipe.core.training.dpo", "direct preference optimisation"),
    "orpo": ObjectiveEntry("ftpipe.core.training.orpo", "odds-ratio preference optimisation"),
    "kto": ObjectiveEntry("ftpipe.core.training.kto", "Kahneman-Tversky optimisation"),
    "distill": ObjectiveEntry("ftpipe.core.training.distill", "logit distillation from a local teacher (GKD)"),
}
PREFERENCE_OBJECTIVES = ("dpo", "orpo", "kto")  # trained on preference rows, after the supervised stage
SUPERVISED_OBJECTIVES = ("sft", "distill")  # trained on chat rows: the first stage
UNPAIRED_OBJECTIVES = ("kto",)  # train on single rows marked desirable or not; the others need pairs
REFERENCE_FREE_OBJECTIVES = ("orpo",)  # no reference model: its rewards/chosen is a log-probability, below 0 always

Objective = Literal[tuple(OBJECTIVES)]
Adapter = Literal["lora", "none"]
Quantization = Literal["auto", "none", "4bit"]
Shorthand = Literal["auto", "lora", "qlora", "full"]

SHORTHANDS: dict[str, dict[str, str]] = {
    "auto": {"adapter": "lora", "quantization": "auto"},
    "lora": {"adapter": "lora", "quantization": "none"},
    "qlora": {"adapter": "lora", "quantization": "4bit"},
    "full": {"adapter": "none", "quantization": "none"},
}
LABELS = {(s["adapter"], s["quantization"]): name for name, s in SHORTHANDS.items() if name != "auto"}
ADAPTER_TEXT = {"lora": "LoRA adapter", "none": "full fine-tune (every weight)"}
QUANTIZATION_TEXT = {
    "auto": "4-bit base on a CUDA GPU, else 16/32-bit",
    "none": "16/32-bit base",
    "4bit": "4-bit NF4 base (needs a CUDA GPU)",
}


class TrainingRefused(ValueError):
    """The training cannot run here as configured (e.g. 4-bit without CUDA); retrying cannot help."""


@dataclass(frozen=True)
class Method:
    """A resolved method: `quantization` is `none` or `4bit`, never `auto`."""

    objective: str
    adapter: str
    quantization: str

    @property
    def peft_adapter(self) -> bool:
        """True when training writes a PEFT adapter to apply on the base model, False for a whole model."""
        return self.adapter != "none"

    @property
    def load_in_4bit(self) -> bool:
        return self.quantization == "4bit"

    @property
    def label(self) -> str:
        """The shorthand this method corresponds to: `lora`, `qlora` or `full`."""
        return LABELS[(self.adapter, self.quantization)]

    def described(self) -> str:
        """In words, e.g. `lora (sft): LoRA adapter, 16/32-bit base`."""
        return f"{self.label} ({self.objective}): {ADAPTER_TEXT[self.adapter]}, {QUANTIZATION_TEXT[self.quantization]}"

    def facts(self) -> dict[str, Any]:
        return {**asdict(self), "method": self.label, "peft_adapter": self.peft_adapter}


def expand_shorthand(values: dict[str, Any]) -> dict[str, Any]:
    """`training` values with `method` turned into adapter + quantization; raises ValueError on a contradiction."""
    shorthand = values.get("method")
    if shorthand not in SHORTHANDS:
        return values  # absent, or a typo that the field's own validation reports
    expanded = {**values, "method": None}  # read into the settings below; nothing else reads it
    for key, implied in SHORTHANDS[shorthand].items():
        given = values.get(key, implied)
        if given != implied:
            raise ValueError(f"method {shorthand} means {key}: {implied}, but {key}: {given} is set; keep one of them")
        expanded[key] = implied
    return expanded


def check_stages(stages: list[str]) -> None:
    """ValueError unless `stages` is [sft | distill] or [sft | distill, <one preference objective>]."""
    supervised, preference = " | ".join(SUPERVISED_OBJECTIVES), " | ".join(PREFERENCE_OBJECTIVES)
    if (stages[:1] and stages[0]) not in SUPERVISED_OBJECTIVES or len(stages) > 2 or (
            stages[1:] and stages[1] not in PREFERENCE_OBJECTIVES):
        raise ValueError(f"stages must be [{supervised}] or [{supervised}, {preference}], got {stages}")


def settle_quantization(adapter: str, quantization: str) -> str:
    """The quantization that goes with `adapter`: a full fine-tune trains 16/32-bit weights, so `auto` means
    `none` there and `4bit` is refused (ValueError)."""
    if adapter != "none":
        return quantization
    if quantization == "4bit":
        raise ValueError("quantization: 4bit needs adapter: lora (QLoRA); a full fine-tune trains 16/32-bit weights")
    return "none"


def settings_without_effect(adapter: str) -> set[str]:
    """Training settings that cannot change the weights with this adapter (left out of the recipe)."""
    return {"lora"} if adapter == "none" else set()


def resolve_method(training, cuda_available: bool) -> Method:
    """The method a training (a TrainingConfig) runs with on this machine; TrainingRefused when it cannot run here."""
    quantization = training.quantization
    if quantization == "auto":
        quantization = "4bit" if cuda_available else "none"
    method = Method(training.objective, training.adapter, quantization)
    if method.load_in_4bit and not cuda_available:
        raise TrainingRefused(
            "quantization 4bit (method qlora) needs a CUDA GPU where the training runs, and none was found; "
            "use quantization: none (method: lora), or run the training on a GPU (launcher: k8s)"
        )
    return method


def leave_out_bitsandbytes(method: Method) -> None:
    """In a process that trains without 4-bit weights, keep bitsandbytes from being imported (call it before
    transformers and peft, which import it whenever it is installed): about a second less at every training start."""
    if not method.load_in_4bit:
        sys.modules.setdefault("bitsandbytes", None)  # what Python does for a package that is not installed


def describe_method(training) -> str:
    """A one-line description of a TrainingConfig's method for people (no hardware needed), e.g.
    `supervised fine-tuning (sft), LoRA adapter, 4-bit base on a CUDA GPU, else 16/32-bit`."""
    objective = training.objective
    return (f"{OBJECTIVES[objective].description} ({objective}), {ADAPTER_TEXT[training.adapter]}, "
            f"{QUANTIZATION_TEXT[training.quantization]}")
