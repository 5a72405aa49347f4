import os
import re
from pathlib import Path

import pytest
import yaml
from pydantic import BaseModel

from ftpipe import config as config_module
from ftpipe.config import TaskConfig, TaskConfigError, check_task_name, load_task_config, parse_task_config
from ftpipe.config_reference import reference_yaml
from ftpipe.core.storage import REPO_ROOT
from ftpipe.core.tasks import base_model_source, general_probe, general_replay_prompts, task_config
from ftpipe_tests.builders import chat, make_task

DEMO_TASK = REPO_ROOT / "data" / "tasks" / "ticket_triage" / "task.yaml"


def test_defaults_when_task_yaml_is_empty(tmp_path: Path) -> None:
    (tmp_path / "task.yaml").write_text("")
    config = load_task_config(tmp_path / "task.yaml")
    assert config.split.eval_fraction == 0.15
    assert (config.training.objective, config.training.adapter, config.training.quantization) == ("sft", "lora", "auto")
    assert config.training.learning_rate == 2e-4
    assert config.evaluation.max_forgetting == 0.10
    assert config.dedup.near_threshold == 0.8


@pytest.mark.parametrize(
    ("text", "field", "expected"),
    [
        ("split: {eval_fraction: 0.9}", "split.eval_fraction", "less than or equal to 0.5"),
        ("training: {lora: {r: many}}", "training.lora.r", "valid integer"),
        ("training: {method: magic}", "training.method", "'auto', 'lora', 'qlora' or 'full'"),
        ("dedupe: {}", "dedupe", "unknown key; did you mean dedup?"),
        ("training: {max_step: 3}", "training.max_step", "unknown key; did you mean max_steps?"),
        ("training: {lora: {rnk: 8}}", "training.lora.rnk", "unknown key; valid keys: r, alpha, dropout, target_modules"),
        ("training: {lora: {rank: 8}}", "training.lora.rank", "unknown key; did you mean r?"),
        ("training: {lr: 0.001}", "training.lr", "unknown key; did you mean learning_rate?"),
        ("training: {num_train_epochs: 2}", "training.num_train_epochs", "unknown key; did you mean epochs?"),
        ("training: {lora_r: 8}", "training.lora_r", "unknown key; did you mean lora.r?"),
        ("eval_fraction: 0.2", "eval_fraction", "unknown key; did you mean split.eval_fraction?"),
        ("training: {schedule: '0 3 * * 1'}", "training.schedule", "unknown key; did you mean retrain.schedule?"),
        ("evaluation: {max_steps: 5}", "evaluation.max_steps", "unknown key; did you mean training.max_steps?"),
        ("training: {lora: {target_modules: 'q_proj,v_proj'}}", "training.lora.target_modules",
         "(got 'q_proj,v_proj'; a list is written [q_proj, v_proj])"),
        ("training: {lora: {target_modules: 5}}", "training.lora.target_modules", "a valid list or Input should be"),
        ("retrain: {schedule: 'weekly'}", "retrain.schedule", "a cron expression with 5 fields"),
        ("retrain: {schedule: '61 3 * * *'}", "retrain.schedule", "a field is out of its range (minute 0-59"),
        ("training: {max_steps: 0}", "training.max_steps", "0 steps trains nothing"),
        ("training: {preference: {max_steps: 0}}", "training.preference.max_steps", "or -1 for all epochs"),
        ("training: {replay: 0.8}", "training.replay", "less than or equal to 0.5"),
        ("evaluation: {label_field: answer}", "evaluation", "label_field applies to task_type classification only"),
        ("evaluation: {extraction_metric: field_accuracy}", "evaluation",
         "extraction_metric applies to task_type extraction only"),
        ("training: {teacher_model: x}", "training", "teacher_model is used by a distill stage only, and stages is "
                                                     "['sft']: start stages with distill, or leave teacher_model out"),
        ("training: {every_turn: true, stages: [distill], teacher_model: x}", "training",
         "every_turn applies to an sft stage only, and stages is ['distill']: start stages with sft, or leave "
         "every_turn out"),
        ("training: {objective: dpo}", "training", "objective dpo would not train: the trainings run the objectives "
                                                   "of stages (['sft']); put dpo in stages (e.g. [sft, dpo]) and "
                                                   "leave objective out"),
        ("evaluation: {min_improvement: 5}", "evaluation.min_improvement", "a share, not a percentage"),
        ("evaluation: {min_preference_gain: 2}", "evaluation.min_preference_gain", "the gain is at most 1"),
        ("evaluation: {min_preference_gain: 1}", "evaluation.min_preference_gain", "the gate could never pass (got 1)"),
        ("monitoring: {alert_webhook: hooks.example.com/x}", "monitoring.alert_webhook", "an http:// or https://"),
    ],
)
def test_mistakes_name_file_field_and_expectation(tmp_path: Path, text: str, field: str, expected: str) -> None:
    path = tmp_path / "task.yaml"
    path.write_text(text)
    with pytest.raises(TaskConfigError) as error:
        load_task_config(path)
    assert str(error.value) == f"{path}: {field}: {str(error.value).split(': ', 2)[2]}", "one line: file, field, problem"
    assert expected in str(error.value)


def test_lenient_gate_thresholds_and_web_addresses_are_accepted(tmp_path: Path) -> None:
    path = tmp_path / "task.yaml"
    path.write_text("evaluation: {min_improvement: -2.0, max_forgetting: 1.0}\n"
                    "monitoring: {alert_webhook: 'https://hooks.example.com/ftpipe'}\n")
    config = load_task_config(path)
    assert (config.evaluation.min_improvement, config.evaluation.max_forgetting) == (-2.0, 1.0)
    assert config.monitoring.alert_webhook == "https://hooks.example.com/ftpipe"


def test_a_section_with_every_setting_commented_out_means_its_defaults() -> None:
    config = parse_task_config("training:\n  # max_steps: 3\nsplit:\n", "t/task.yaml")
    assert config.training == parse_task_config("", "t/task.yaml").training and config.split.eval_fraction > 0


def test_an_unquoted_value_that_begins_with_a_hash_is_refused_instead_of_read_as_a_comment() -> None:
    text = "evaluation:\n  task_type: generation\n  answer_pattern: #### (\\S+)\n"
    with pytest.raises(TaskConfigError) as error:
        parse_task_config(text, "t/task.yaml")
    assert str(error.value) == (
        "t/task.yaml: line 3: answer_pattern: the value #### (\\S+) begins with '#', which YAML reads as a comment, "
        "so answer_pattern is empty: quote it: answer_pattern: '#### (\\S+)'")
    quoted = parse_task_config(text.replace("#### (\\S+)", "'#### (\\S+)'"), "t/task.yaml")
    assert quoted.evaluation.answer_pattern == "#### (\\S+)"
    fine = "training:  #mine\n  max_steps: 3   # a comment\n  lora: #defaults but r\n    r: 8\ndedup:   # none\n"
    assert parse_task_config(fine, "t/task.yaml").training.lora.r == 8, "section headers and comments after a space"
    prompt = "data:\n  system_prompt: |\n    Solve it.\n    End with: #### <number>\n"
    assert parse_task_config(prompt, "t/task.yaml").data.system_prompt.endswith("End with: #### <number>\n")


def test_each_problem_is_one_line_naming_the_file_and_the_field() -> None:
    with pytest.raises(TaskConfigError) as error:
        parse_task_config("training: {max_step: 3, lora: {r: many}}\nsplit: {eval_fraction: 0.9}", "t/task.yaml")
    lines = str(error.value).splitlines()
    assert [line.split(": ")[1] for line in lines] == ["training.max_step", "training.lora.r", "split.eval_fraction"], (
        "in the order of the file")
    assert all(line.startswith("t/task.yaml: ") for line in lines)


def test_broken_yaml_and_non_mapping_are_refused() -> None:
    with pytest.raises(TaskConfigError, match="not valid YAML"):
        parse_task_config("a: [", "x/task.yaml")
    with pytest.raises(TaskConfigError) as error:
        parse_task_config('split:\n  seed: 3\nevaluation:\n  task_type: "extraction\n  max_new_tokens: 9\n', "x/task.yaml")
    assert str(error.value) == ("x/task.yaml: not valid YAML at line 6, column 1: found unexpected end of stream (while "
                                "scanning a quoted scalar that starts at line 4, column 14)")
    with pytest.raises(TaskConfigError, match="expected a mapping"):
        parse_task_config("- 1", "x/task.yaml")


@pytest.mark.parametrize(("text", "hint"), [
    ("data:\n  columns:\n    prompt: text\n   completion: x\n", "this line is indented differently from the keys "
                                                                "beside it"),
    ("data:\n  system_prompt: Reply with: a label\n", "a value holding ': ' needs quotes, or a key is indented under "
                                                      "a value"),
    ("data:\n\tformat: auto\n", "indent with spaces, not tabs"),
])
def test_the_commonest_yaml_mistakes_end_with_what_to_check(text: str, hint: str) -> None:
    with pytest.raises(TaskConfigError) as error:
        parse_task_config(text, "x/task.yaml")
    said = str(error.value)
    assert said.startswith("x/task.yaml: not valid YAML at line ") and said.endswith(f": {hint}")


def test_a_key_given_twice_is_refused_not_overwritten() -> None:
    with pytest.raises(TaskConfigError) as error:
        parse_task_config("split:\n  seed: 1\n  eval_fraction: 0.2\n  seed: 2\n", "x/task.yaml")
    assert str(error.value) == ("x/task.yaml: not valid YAML at line 4, column 3: the key 'seed' is given twice (first "
                                "at line 2): keep one")
    with pytest.raises(TaskConfigError, match="run overrides.*'training' is given twice"):
        parse_task_config("", "x/task.yaml", overrides="training: {max_steps: 3}\ntraining: {max_steps: 4}")
    merged = parse_task_config("split:\n  <<: {seed: 3, eval_fraction: 0.2}\n  seed: 4\n", "x/task.yaml")
    assert (merged.split.seed, merged.split.eval_fraction) == (4, 0.2), "a key over a merged one is no repeat"


@pytest.mark.parametrize(("data", "problem"), [
    *((f"{{format: columns{mapping}}}", "data: format columns reads the columns mapped in columns: map prompt and "
                                        "completion, e.g. {prompt: ticket_text, completion: triage} (or chosen and "
                                        "rejected for preference pairs)")
      for mapping in ("", ", columns: {system: sys}", ", columns: {completion: a, chosen: b}")),
    ("{columns: {prompt: ticket_text}}", "data: columns maps prompt but no answer column: map completion too (or "
                                         "chosen and rejected for preference pairs)"),
    ("{columns: {prompt: q, completion: a}, files: {'old/*.csv': {columns: {prompt: text}}}}",
     "data: files['old/*.csv'].columns maps prompt but no answer column: map completion too (or chosen and rejected "
     "for preference pairs)"),
    ("{files: {'old/*.csv': {format: columns}}}",
     "data: format columns reads the columns mapped in files['old/*.csv'].columns: map prompt and completion, e.g. "
     "{prompt: ticket_text, completion: triage} (or chosen and rejected for preference pairs)"),
    ("{label_names: [billing, ' ', refund]}",
     "data.label_names: label_names[1] is empty: each class id needs its name (got ['billing', ' ', 'refund'])"),
    ("{label_names: [billing, refund, billing]}",
     "data.label_names: label_names lists 'billing' more than once (case, spacing and punctuation aside): two ids "
     "would read as one label (got ['billing', 'refund', 'billing'])"),
    ("{label_names: [order_status, refund, Order Status]}",
     "data.label_names: label_names lists 'Order Status' more than once (case, spacing and punctuation aside): two ids "
     "would read as one label (got ['order_status', 'refund', 'Order Status'])"),
])
def test_data_columns_that_cannot_read_a_row_are_refused(data: str, problem: str) -> None:
    with pytest.raises(TaskConfigError) as error:
        parse_task_config(f"data: {data}", "t/task.yaml")
    assert str(error.value) == f"t/task.yaml: {problem}"
    for readable in ("{prompt: q, completion: a}", "{prompt: q, chosen: a, rejected: b}", "{chosen: a, rejected: b}"):
        assert parse_task_config(f"data: {{columns: {readable}}}", "t/task.yaml").data.columns


def test_run_overrides_merge_deeply_and_are_validated() -> None:
    base = "split: {seed: 1, eval_fraction: 0.2}\ntraining: {lora: {r: 8}}"
    config = parse_task_config(base, "t.yaml", overrides="split: {seed: 7}\ntraining: {lora: {alpha: 4}}")
    assert (config.split.seed, config.split.eval_fraction) == (7, 0.2)
    assert (config.training.lora.r, config.training.lora.alpha) == (8, 4)
    with pytest.raises(TaskConfigError, match="run overrides"):
        parse_task_config(base, "t.yaml", overrides="[1, 2")
    with pytest.raises(TaskConfigError) as typo:
        parse_task_config(base, "t.yaml", overrides="training: {max_step: 3}")
    assert str(typo.value) == "t.yaml (run overrides): training.max_step: unknown key; did you mean max_steps?"
    with pytest.raises(TaskConfigError) as brought:  # the file has no distill section: the overrides brought it
        parse_task_config(base, "t.yaml", overrides="distill: {budget: {max_requests: 5}}")
    assert str(brought.value) == "t.yaml (run overrides): distill.teacher: Field required"
    with pytest.raises(TaskConfigError) as incomplete:  # the file's own section lacks a field
        parse_task_config("distill: {teacher: {model: m}}", "t.yaml", overrides="distill: {budget: {max_requests: 5}}")
    assert str(incomplete.value) == "t.yaml: distill.teacher.base_url: Field required"


@pytest.mark.parametrize("name", ["ok", "ticket_triage", "a-b_9", "9lives"])
def test_valid_task_names(name: str) -> None:
    assert check_task_name(name) == name


@pytest.mark.parametrize("name", ["Bad", "-x", "_x", "a b", "../up", "a" * 65, ""])
def test_invalid_task_names_are_refused_with_the_folder(name: str) -> None:
    with pytest.raises(TaskConfigError, match="invalid name"):
        check_task_name(name)


@pytest.mark.parametrize("field", ["base_model", "training.teacher_model"])
@pytest.mark.parametrize(
    ("model", "expected"),
    [
        ("llama-7b", "a hub id like 'org/name', or an existing .gguf file or model folder"),
        ("./models/missing.gguf", "an existing .gguf file or model folder"),
        ("../../..", "outside the data dir and $FTPIPE_HOME"),
        ("/etc", "outside the data dir and $FTPIPE_HOME"),
        ("linked-model", "outside the data dir and $FTPIPE_HOME"),
    ],
)
def test_unknown_or_escaping_models_fail_before_any_work_in_one_line(
    ftpipe_env: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, field: str, model: str, expected: str
) -> None:
    monkeypatch.delenv("FTPIPE_MODEL_DIRS")
    outside = tmp_path / "outside-model"
    outside.mkdir()
    setting = {"base_model": f"base_model: {model}",
               "training.teacher_model": f"training: {{stages: [distill], teacher_model: {model}}}"}
    folder = make_task(ftpipe_env, "t", {"a.jsonl": [chat("q", "a")]}, setting[field] + "\n")
    (folder / "linked-model").symlink_to(outside)
    with pytest.raises(TaskConfigError) as error:
        task_config("t")
    message = str(error.value)
    assert message.startswith(f"{folder / 'task.yaml'}: {field}: ") and "\n" not in message
    assert expected in message and f"(got {model!r})" in message
    with pytest.raises(TaskConfigError) as overridden:
        task_config("t", setting[field].replace(model, "./nope.gguf"))
    assert str(overridden.value).startswith(f"{folder / 'task.yaml'} (run overrides): {field}: ")


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


def test_the_demo_and_old_style_task_yaml_give_the_recipe_they_gave_before_plus_replay() -> None:
    demo = load_task_config(DEMO_TASK).training
    assert "method: auto" in DEMO_TASK.read_text()
    assert (demo.objective, demo.adapter, demo.quantization) == ("sft", "lora", "auto")
    assert demo.recipe() == {
        "objective": "sft", "adapter": "lora", "quantization": "auto",
        "lora": {"r": 16, "alpha": 32, "dropout": 0.05, "target_modules": ["q_proj", "k_proj", "v_proj", "o_proj"]},
        "learning_rate": 0.0005, "epochs": 1.0, "max_steps": 36, "batch_size": 8, "gradient_accumulation": 1,
        "max_length": 256, "too_long": "drop", "warmup_ratio": 0.05, "scheduler": "cosine", "weight_decay": 0.0,
        "seed": 42, "packing": False, "eval_steps": 18, "logging_steps": 5, "early_stopping_patience": 3,
        "save_total_limit": 2, "replay": 0.2,
    }
    old_style = parse_task_config("training: {method: qlora, launcher: torchrun, learning_rate: 0.001}", "t.yaml").training
    new_style = parse_task_config("training: {adapter: lora, quantization: 4bit, learning_rate: 0.001}", "t.yaml").training
    assert old_style.recipe() == new_style.recipe()


def test_replay_is_in_the_recipe_only_when_it_mixes_rows_in() -> None:
    none, zero = parse_task_config("", "t.yaml").training, parse_task_config("training: {replay: 0}", "t.yaml").training
    some = parse_task_config("training: {replay: 0.25}", "t.yaml").training
    assert none.replay == 0.0 and zero.recipe() == none.recipe() and "replay" not in none.recipe()
    assert some.recipe() == {**none.recipe(), "replay": 0.25}


def test_every_turn_is_in_the_recipe_of_its_sft_stage_only_when_on() -> None:
    off, on = (parse_task_config(text, "t.yaml").training for text in ("", "training: {every_turn: true, stages: "
                                                                            "[sft, dpo]}"))
    assert "every_turn" not in off.recipe() and on.for_stage("sft").recipe()["every_turn"] is True
    assert "every_turn" not in on.for_stage("dpo").recipe()


def test_settings_the_rest_of_the_config_leaves_without_effect_are_named() -> None:
    idle = parse_task_config("training: {method: full, lora: {r: 4}, preference: {beta: 0.2}, distill_on_policy: 0.5, "
                             "k8s: {image: ftpipe}}\nretrain: {warm_start_max_growth: 0.2}\n", "t.yaml")
    assert idle.idle_settings() == [
        "training.lora (training.adapter is none: every weight is trained)",
        "training.preference (training.stages ['sft'] has no preference stage)",
        "training.distill_on_policy (training.stages ['sft'] has no distill stage)",
        "training.k8s (training.launcher is subprocess)",
        "retrain.warm_start_max_growth (retrain.warm_start is false)",
    ]
    acting = parse_task_config("training: {method: lora, lora: {r: 4}, stages: [sft, dpo], preference: {beta: 0.2}, "
                               "launcher: k8s, k8s: {image: ftpipe}}\nretrain: {warm_start: true, "
                               "warm_start_max_growth: 0.2}\n", "t.yaml")
    assert acting.idle_settings() == [] and load_task_config(DEMO_TASK).idle_settings() == []


def all_models(model: type[BaseModel] = TaskConfig) -> set[type[BaseModel]]:
    nested = {config_module.nested_model(field.annotation) for field in model.model_fields.values()} - {None}
    return {model}.union(*(all_models(child) for child in nested))


def test_a_data_dir_without_a_general_folder_uses_the_projects_probe_and_replay_prompts(ftpipe_env: Path) -> None:
    assert general_probe() is None and general_replay_prompts() is None, "its own general/, empty"
    (ftpipe_env / "general" / "probe.jsonl").write_text("")
    assert general_probe() == ftpipe_env / "general" / "probe.jsonl"
    for path in (ftpipe_env / "general").iterdir():
        path.unlink()
    (ftpipe_env / "general").rmdir()  # only tasks in it, as a user's FTPIPE_DATA_DIR
    shipped = REPO_ROOT / "data" / "general"
    assert (general_probe(), general_replay_prompts()) == (shipped / "probe.jsonl", shipped / "replay_prompts.jsonl")


def test_every_task_yaml_field_is_described() -> None:
    undescribed = [f"{model.__name__}.{name}" for model in all_models()
                   for name, field in model.model_fields.items() if not field.description]
    assert not undescribed


def test_the_readme_reference_is_the_one_generated_from_the_schema() -> None:
    readme = (REPO_ROOT / "README.md").read_text()
    section = readme.split("## task.yaml reference", 1)[1]
    block = re.search(r"```yaml\n(.*?)```", section, re.DOTALL).group(1)
    assert block == reference_yaml(), "regenerate it: python -m ftpipe.config_reference"


def commented_out(reference: str) -> dict[tuple[str, ...], set[str]]:
    """The fields shown commented out under each null section of the reference (and its sections), by path."""
    found: dict[tuple[str, ...], set[str]] = {}
    path: list[str] = []
    inner: list[str] = []
    for line in reference.splitlines():
        text = line.lstrip()
        if text.startswith("#   "):
            rest = text.removeprefix("#   ")
            body = rest.lstrip()
            inner = inner[: (len(rest) - len(body)) // 2] + [body.split(":", 1)[0]]
            found.setdefault(tuple(path + inner[:-1]), set()).add(inner[-1])
        else:
            path, inner = path[: (len(line) - len(text)) // 2] + [text.split(":", 1)[0]], []
    return found


def test_the_reference_is_valid_task_yaml_with_the_defaults() -> None:
    values = yaml.safe_load(reference_yaml())
    assert values["training"]["k8s"] is None and values["training"]["method"] is None
    assert parse_task_config(reference_yaml(), "reference") == TaskConfig()
    shown = commented_out(reference_yaml())
    assert shown[("training", "k8s")] == set(config_module.K8sConfig.model_fields), "every k8s field is shown"
    for path, fields in shown.items():
        assert fields == set(config_module._model_at(path).model_fields), f"every field of {'.'.join(path)} is shown"
