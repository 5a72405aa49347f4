"""`python -m ftpipe run TASK --set key=value` (`make run SET=...`): settings for one run, validated like task.yaml
and handed to every asset as its launchpad overrides; and a run's console free of Dagster's preview notices."""

import os
import shutil
import subprocess
import sys
from pathlib import Path

import dagster as dg
import pytest
import yaml

from ftpipe.config import TaskConfigError, parse_task_config
from ftpipe.overrides import settings_overrides
from ftpipe.core.storage import REPO_ROOT
from ftpipe_tests.builders import chat, make_task


def ftpipe_run(tmp_path: Path, *args: str) -> tuple[str, int, Path]:
    """What `python -m ftpipe run ARGS...` prints (stdout and stderr together), its exit status, and its Dagster home."""
    home = tmp_path / "dagster_home"
    home.mkdir()
    shutil.copy(REPO_ROOT / "dagster.yaml", home / "dagster.yaml")
    done = subprocess.run([sys.executable, "-m", "ftpipe", "run", *args], stdout=subprocess.PIPE,
                          stderr=subprocess.STDOUT, text=True, env={**os.environ, "DAGSTER_HOME": str(home)}, cwd=home,
                          timeout=600)
    return done.stdout, done.returncode, home


def recorded_runs(home: Path, monkeypatch: pytest.MonkeyPatch) -> list[dg.DagsterRun]:
    monkeypatch.chdir(home)  # the instance's storage folders are relative to it
    with dg.DagsterInstance.from_config(str(home)) as instance:
        return list(instance.get_runs())


def test_settings_become_an_overrides_snippet() -> None:
    found = settings_overrides("training.max_steps=10, split.seed=3 training.lora.target_modules=[q_proj, v_proj]")
    assert yaml.safe_load(found) == {"training": {"max_steps": 10, "lora": {"target_modules": ["q_proj", "v_proj"]}},
                                     "split": {"seed": 3}}
    assert yaml.safe_load(settings_overrides("data.system_prompt=Answer briefly, in one word")) == {
        "data": {"system_prompt": "Answer briefly, in one word"}}
    assert settings_overrides("  ") == ""
    with pytest.raises(TaskConfigError, match=r"^--set 'max_steps': expected key=value"):
        settings_overrides("max_steps")
    quoted = settings_overrides('data.system_prompt="Classify it, label=billing if about money" split.seed=2')
    assert yaml.safe_load(quoted) == {"data": {"system_prompt": "Classify it, label=billing if about money"},
                                      "split": {"seed": 2}}, "a quoted value is one setting, whatever it holds"
    for twice in ("training.max_steps=10 training.max_steps=20", "training.max_steps=3, training={max_steps: 4}",
                  "training.lora.r=8 training.lora={r: 4}", "training.lora={r: 4} training.lora.r=8"):
        with pytest.raises(TaskConfigError, match=r"is set already by an earlier setting: keep one$"):
            settings_overrides(twice)
    for either_order in ("training.lora.r=8 training.lora={alpha: 16}", "training.lora={alpha: 16} training.lora.r=8"):
        assert yaml.safe_load(settings_overrides(either_order)) == {"training": {"lora": {"r": 8, "alpha": 16}}}, (
            "a mapping and a dotted key merge, in either order")
    for commented in ("evaluation.answer_pattern=#### (\\S+)", "data.system_prompt=Reply #1 first"):
        with pytest.raises(TaskConfigError, match=r"as a comment, which would cut the value there: quote it"):
            settings_overrides(commented)
    quoted = settings_overrides("evaluation.answer_pattern='#### (\\S+)' data.system_prompt=Ticket#1")
    assert yaml.safe_load(quoted) == {"evaluation": {"answer_pattern": "#### (\\S+)"},
                                      "data": {"system_prompt": "Ticket#1"}}, "a quoted '#' or one inside a word stays"


@pytest.mark.parametrize(("setting", "problem"), [
    ("training.stages=[dpo]", "training: stages must be [sft | distill] or [sft | distill, dpo | orpo | kto], got "
                              "['dpo']"),
    ("data.system_prompt=Note: be brief", "data.system_prompt: Input should be a valid string (got the mapping "
                                          "{'Note': 'be brief'}: a text holding ': ' is written in quotes)"),
])
def test_a_setting_that_breaks_a_section_is_named_as_the_runs(setting: str, problem: str) -> None:
    with pytest.raises(TaskConfigError) as error:
        parse_task_config("training: {max_steps: 3}\n", "t/task.yaml", settings_overrides(setting))
    assert str(error.value) == f"t/task.yaml (run overrides): {problem}"


def test_a_bad_setting_fails_before_any_run_in_one_line_naming_the_key(ftpipe_env: Path, tmp_path: Path,
                                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    make_task(ftpipe_env, "typo", {"a.jsonl": [chat("hi", "hello")]})
    output, status, home = ftpipe_run(tmp_path, "typo", "--set", "split.seed=3 training.max_step=10")
    assert status == 2 and "Traceback" not in output
    [line] = [line for line in output.splitlines() if "training.max_step" in line]
    assert "FAILED before starting" in line and "unknown key; did you mean max_steps?" in line
    assert recorded_runs(home, monkeypatch) == []


def test_settings_reach_every_assets_run_config_and_dagster_notices_stay_quiet(
        ftpipe_env: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, tiny_model_dir: Path) -> None:
    make_task(ftpipe_env, "empty", {"a.jsonl": [{"nothing": 1}]}, f"base_model: {tiny_model_dir}\n")
    output, status, home = ftpipe_run(tmp_path, "empty", "--set", "split.seed=3,training.max_steps=10")
    assert status == 1 and output.strip().splitlines()[-1].startswith("FAILED: raw_examples: "), output[-2000:]
    assert "PreviewWarning" not in output and "BetaWarning" not in output, output[:3000]
    [run] = recorded_runs(home, monkeypatch)
    given = {op: yaml.safe_load(settings["config"]["overrides"]) for op, settings in run.run_config["ops"].items()}
    assert set(given) >= {"raw_examples", "heldout_split", "lora_adapter", "eval_report", "merged_model"}
    assert all(found == {"split": {"seed": 3}, "training": {"max_steps": 10}} for found in given.values())
