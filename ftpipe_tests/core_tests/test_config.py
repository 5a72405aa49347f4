from pathlib import Path

import pytest

from ftpipe.config import TaskConfigError, check_task_name, load_task_config, parse_task_config


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
