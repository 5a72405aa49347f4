"""The training-method vocabulary: shorthands, orthogonal settings, resolution where the training runs."""

from __future__ import annotations

import sys

import pytest

from ftpipe.config import TaskConfigError, TrainingConfig, parse_task_config
from ftpipe.core.training.methods import OBJECTIVES, Method, TrainingRefused, describe_method, resolve_method
from ftpipe.core.training.setup import objective_module


def training(text: str) -> TrainingConfig:
    return parse_task_config(text, "task.yaml").training


@pytest.mark.parametrize(("shorthand", "explicit"), [
    ("auto", "{}"),
    ("lora", "{adapter: lora, quantization: none}"),
    ("qlora", "{adapter: lora, quantization: 4bit}"),
    ("full", "{adapter: none}"),
])
def test_each_shorthand_is_the_same_recipe_as_its_settings(shorthand: str, explicit: str) -> None:
    assert training(f"training: {{method: {shorthand}}}").recipe() == training(f"training: {explicit}").recipe()


def test_the_shorthand_is_read_into_the_settings_and_never_kept() -> None:
    config = training("training: {method: qlora}")
    assert (config.method, config.objective, config.adapter, config.quantization) == (None, "sft", "lora", "4bit")
    assert "method" not in config.model_dump() and TrainingConfig.model_validate(config.model_dump()) == config


@pytest.mark.parametrize(("text", "message"), [
    ("training: {method: qlora, quantization: none}", "method qlora means quantization: 4bit, but quantization: none"),
    ("training: {method: full, adapter: lora}", "method full means adapter: none, but adapter: lora"),
    ("training: {adapter: none, quantization: 4bit}", "quantization: 4bit needs adapter: lora"),
])
def test_contradicting_settings_are_refused_in_one_line(text: str, message: str) -> None:
    with pytest.raises(TaskConfigError) as error:
        training(text)
    assert str(error.value).count("\n") == 0 and message in str(error.value)


def test_a_full_fine_tune_ignores_lora_settings_and_auto_quantization() -> None:
    full = training("training: {method: full}")
    assert full.quantization == "none" and "lora" not in full.recipe()
    assert full.recipe() == training("training: {adapter: none, quantization: auto, lora: {r: 4}}").recipe()
    assert training("training: {lora: {r: 4}}").recipe() != training("").recipe()


@pytest.mark.parametrize(("text", "cuda", "label", "quantization"), [
    ("", False, "lora", "none"),
    ("", True, "qlora", "4bit"),
    ("training: {method: lora}", True, "lora", "none"),
    ("training: {method: full}", True, "full", "none"),
    ("training: {method: qlora}", True, "qlora", "4bit"),
])
def test_auto_is_resolved_by_the_machine_the_training_runs_on(text, cuda, label, quantization) -> None:
    method = resolve_method(training(text), cuda_available=cuda)
    assert (method.label, method.quantization, method.load_in_4bit) == (label, quantization, quantization == "4bit")
    assert method.peft_adapter == (label != "full")


def test_4bit_without_cuda_is_refused_where_the_training_runs() -> None:
    with pytest.raises(TrainingRefused, match="quantization 4bit .* needs a CUDA GPU"):
        resolve_method(training("training: {method: qlora}"), cuda_available=False)


def test_k8s_qlora_is_accepted_and_described_on_a_cpu_only_host(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "torch", None)  # describing a method needs no torch and no GPU
    config = training("training: {method: qlora, launcher: k8s, k8s: {image: registry.example.com/ftpipe:1.0}}")
    assert describe_method(config) == "supervised fine-tuning (sft), LoRA adapter, 4-bit NF4 base (needs a CUDA GPU)"
    assert "4-bit base on a CUDA GPU, else 16/32-bit" in describe_method(training(""))
    ran = resolve_method(training(""), cuda_available=False)  # what the program says it runs: "auto" resolved
    assert ran.described() == "lora (sft): LoRA adapter, 16/32-bit base"
    assert resolve_method(training(""), cuda_available=True).described() == (
        "qlora (sft): LoRA adapter, 4-bit NF4 base (needs a CUDA GPU)")


def test_every_objective_has_a_module_with_a_trainer_builder() -> None:
    for objective in OBJECTIVES:
        assert callable(objective_module(objective).build_trainer)
    assert Method("sft", "none", "none").facts() == {
        "objective": "sft", "adapter": "none", "quantization": "none", "method": "full", "peft_adapter": False}
