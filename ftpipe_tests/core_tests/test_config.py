import os
from pathlib import Path

import pytest

from ftpipe.config import TaskConfigError, check_task_name, load_task_config, parse_task_config
from ftpipe.core.tasks import base_model_source, task_config
from ftpipe_tests.conftest import chat, make_task


def test_defaults_when_task_yaml_is_empty(tmp_path: Path) -> None:
    (tmp_path / "task.yaml").write_text("")
    config = load_task_config(tmp_path / "task.yaml")
    assert config.split.eval_fraction == 0.15
    assert config.training.method == "auto"
    assert config.training.learning_rate == 2e-4
    assert config.evaluation.max_forgetting == 0.10
    assert config.dedup.near_threshold == 0.8


@pytest.mark.parametrize(
    ("text", "field", "expected"),
    [
        ("split: {eval_fraction: 0.9}", "split.eval_fraction", "less than or equal to 0.5"),
        ("training: {lora: {r: many}}", "training.lora.r", "valid integer"),
        ("training: {method: magic}", "training.method", "'auto', 'lora', 'qlora' or 'full'"),
        ("dedupe: {}", "dedupe", "unknown key"),
        ("retrain: {schedule: 'weekly'}", "retrain.schedule", "cron expression"),
    ],
)
def test_mistakes_name_file_field_and_expectation(tmp_path: Path, text: str, field: str, expected: str) -> None:
    path = tmp_path / "task.yaml"
    path.write_text(text)
    with pytest.raises(TaskConfigError) as error:
        load_task_config(path)
    message = str(error.value)
    assert str(path) in message
    assert field in message
    assert expected in message


def test_broken_yaml_and_non_mapping_are_refused() -> None:
    with pytest.raises(TaskConfigError, match="not valid YAML"):
        parse_task_config("a: [", "x/task.yaml")
    with pytest.raises(TaskConfigError, match="expected a mapping"):
        parse_task_config("- 1", "x/task.yaml")


def test_run_overrides_merge_deeply_and_are_validated() -> None:
    base = "split: {seed: 1, eval_fraction: 0.2}\ntraining: {lora: {r: 8}}"
    config = parse_task_config(base, "t.yaml", overrides="split: {seed: 7}\ntraining: {lora: {alpha: 4}}")
    assert (config.split.seed, config.split.eval_fraction) == (7, 0.2)
    assert (config.training.lora.r, config.training.lora.alpha) == (8, 4)
    with pytest.raises(TaskConfigError, match="run overrides"):
        parse_task_config(base, "t.yaml", overrides="[1, 2")


@pytest.mark.parametrize("name", ["ok", "ticket_triage", "a-b_9", "9lives"])
def test_valid_task_names(name: str) -> None:
    assert check_task_name(name) == name


@pytest.mark.parametrize("name", ["Bad", "-x", "_x", "a b", "../up", "a" * 65, ""])
def test_invalid_task_names_are_refused_with_the_folder(name: str) -> None:
    with pytest.raises(TaskConfigError, match="invalid name"):
        check_task_name(name)


@pytest.mark.parametrize(
    ("base_model", "expected"),
    [
        ("llama-7b", "a hub id like 'org/name', or an existing .gguf file or model folder"),
        ("./models/missing.gguf", "an existing .gguf file or model folder"),
        ("../../..", "outside the data dir and $FTPIPE_HOME"),
        ("/etc", "outside the data dir and $FTPIPE_HOME"),
        ("linked-model", "outside the data dir and $FTPIPE_HOME"),
    ],
)
def test_unknown_or_escaping_base_models_fail_before_any_work(
    ftpipe_env: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, base_model: str, expected: str
) -> None:
    monkeypatch.delenv("FTPIPE_MODEL_DIRS")
    outside = tmp_path / "outside-model"
    outside.mkdir()
    folder = make_task(ftpipe_env, "t", {"a.jsonl": [chat("q", "a")]}, f"base_model: {base_model}\n")
    (folder / "linked-model").symlink_to(outside)
    with pytest.raises(TaskConfigError) as error:
        task_config("t")
    message = str(error.value)
    assert message.startswith(f"{folder / 'task.yaml'}: invalid task configuration\n  base_model: ")
    assert expected in message and f"(got {base_model!r})" in message


def test_local_base_models_resolve_from_the_task_folder_or_allowed_dirs(
    ftpipe_env: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    (ftpipe_env / "models" / "tiny").mkdir(parents=True)
    folder = make_task(ftpipe_env, "t", {"a.jsonl": [chat("q", "a")]})
    assert base_model_source("../../models/tiny", folder) == str((ftpipe_env / "models" / "tiny").resolve())
    assert base_model_source("HuggingFaceTB/SmolLM2-135M-Instruct", folder) == "HuggingFaceTB/SmolLM2-135M-Instruct"
    shared = tmp_path / "shared-models"
    (shared / "m").mkdir(parents=True)
    monkeypatch.setenv("FTPIPE_MODEL_DIRS", f"/nonexistent{os.pathsep}{shared}")
    assert base_model_source(str(shared / "m"), folder) == str((shared / "m").resolve())
