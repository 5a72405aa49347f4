"""The command line: what a failed run says and the servers `make` starts (how it waits for the pool and stops:
e2e/test_operator.py)."""

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from ftpipe.core.storage import REPO_ROOT
from ftpipe_tests.builders import chat, make_task


def ftpipe_run(task: str, tmp_path: Path, *options: str) -> tuple[str, int]:
    """What `python -m ftpipe run TASK [OPTIONS]` prints (stdout and stderr, as a terminal shows them) with the
    project's instance settings in a fresh Dagster home; and its exit status."""
    home = tmp_path / "dagster_home"
    home.mkdir(parents=True)
    shutil.copy(REPO_ROOT / "dagster.yaml", home / "dagster.yaml")
    env = {**os.environ, "DAGSTER_HOME": str(home)}
    done = subprocess.run([sys.executable, "-m", "ftpipe", "run", task, *options], stdout=subprocess.PIPE,
                          stderr=subprocess.STDOUT, text=True, env=env, cwd=home, timeout=600)
    return done.stdout, done.returncode


def test_every_command_says_what_it_does_and_its_defaults_in_its_help(capsys) -> None:
    from ftpipe.__main__ import main

    helps = {}
    for command in ("run", "chat", "serve", "tasks", "fetch-model"):
        with pytest.raises(SystemExit) as done:
            main([command, "--help"])
        helps[command] = capsys.readouterr().out
        assert done.value.code == 0 and helps[command].startswith(f"usage: ftpipe {command}")
        description = helps[command].split("\n\n")[1]
        assert len(description.split(". ", 1)[-1]) > 80, f"{command}: {description}"  # more than the one-line summary
    assert "Exit status: 0 done, 1 a step failed" in " ".join(helps["run"].split())
    assert "(default ticket_triage)" in helps["run"] and "(default 8000)" in helps["serve"]


@pytest.mark.parametrize("option, value, lowest", [("--prompt-starts", "-1", 0), ("--max-batch", "0", 1),
                                                   ("--segment-records", "ten", 1)])
def test_a_serve_count_out_of_range_is_refused_in_one_line_before_serving(capsys, option, value, lowest) -> None:
    from ftpipe.__main__ import main

    with pytest.raises(SystemExit) as done:
        main(["serve", option, value])
    assert done.value.code == 2
    assert capsys.readouterr().err.splitlines()[-1] == (
        f"ftpipe serve: error: argument {option}: {value!r}: a whole number of {lowest} or more")


def test_a_config_error_is_told_once_in_one_line_before_any_run(ftpipe_env: Path, tmp_path: Path) -> None:
    make_task(ftpipe_env, "typo", {"a.jsonl": [chat("hi", "hello")]}, "training:\n  max_step: 3\n")
    output, status = ftpipe_run("typo", tmp_path)
    assert status == 2
    assert output.count("training.max_step:") == 1 and "Traceback" not in output and "Stack Trace" not in output
    last = output.strip().splitlines()[-1]
    assert "FAILED" in last and "task.yaml" in last and "training.max_step" in last and "unknown key" in last
    output, status = ftpipe_run("tyop", tmp_path / "again")
    assert status == 2 and output.strip().splitlines()[-1] == (
        f"no task folder named 'tyop' in {ftpipe_env / 'tasks'}; tasks there: typo")


def test_without_dagster_home_a_run_uses_the_folder_with_dagster_yaml_or_says_so_in_one_line(
        ftpipe_env: Path, tmp_path: Path) -> None:
    make_task(ftpipe_env, "typo", {"a.jsonl": [chat("hi", "hello")]}, "training:\n  max_step: 3\n")
    env = {key: value for key, value in os.environ.items() if key != "DAGSTER_HOME"}
    elsewhere, repository = tmp_path / "elsewhere", tmp_path / "repository"
    elsewhere.mkdir(), repository.mkdir()
    shutil.copy(REPO_ROOT / "dagster.yaml", repository / "dagster.yaml")
    runs = {folder: subprocess.run([sys.executable, "-m", "ftpipe", "run", "typo"], capture_output=True, text=True,
                                   env=env, cwd=folder, timeout=600) for folder in (elsewhere, repository)}
    assert runs[elsewhere].returncode == 2 and runs[elsewhere].stdout == "" and runs[elsewhere].stderr == (
        "ftpipe run: DAGSTER_HOME is not set and this folder has no dagster.yaml: run it in the repository (as `make "
        "run` does) or set DAGSTER_HOME to a folder holding a copy of the repository's dagster.yaml and run it there "
        "(the instance's .dagster/ folders are relative to the folder it runs in)\n")
    assert runs[repository].returncode == 2 and "training.max_step" in runs[repository].stderr.splitlines()[-1]
    assert "DagsterHomeNotSetError" not in runs[repository].stdout + runs[repository].stderr
    assert (repository / ".dagster" / "storage").is_dir(), "the folder's dagster.yaml keeps the instance there"


def test_a_failed_run_says_its_reason_once_at_the_end(ftpipe_env: Path, tiny_model_dir: Path, tmp_path: Path) -> None:
    make_task(ftpipe_env, "empty", {"a.jsonl": [{"nothing": 1}]}, f"base_model: {tiny_model_dir}\n")
    output, status = ftpipe_run("empty", tmp_path)
    assert status == 1
    last = output.strip().splitlines()[-1]
    assert last.startswith("FAILED: raw_examples: ") and "no usable rows" in last
    assert output.count("no usable rows") == 1 and "Stack Trace" not in output, output
    assert 'Execution of step "raw_examples" failed.' in output and "Not executing" not in output, output


def test_data_only_reads_cleans_and_splits_then_says_what_to_read_before_training(
        ftpipe_env: Path, tmp_path: Path) -> None:
    from ftpipe.core.layout import TaskLayout

    rows = [chat(f"message {i} about order {i * 7}", f"answer {i % 3}") for i in range(30)]
    make_task(ftpipe_env, "shop", {"a.jsonl": [*rows, rows[0], {"nothing": 1}]}, "base_model: org/not-fetched\n")
    output, status = ftpipe_run("shop", tmp_path, "--data-only")
    assert status == 0, output
    assert "1 row quarantined, each with its reason" in output and "1 row removed by cleaning" in output
    sample = TaskLayout("shop").path("review_sample", "review_sample.csv")
    assert output.rstrip().endswith(
        f"data only: read the review sample ({sample}), then `python -m ftpipe run shop` trains on this data (its data "
        "steps run again: the same files give the same rows)"), output
    assert sample.is_file() and not TaskLayout("shop").output("base_model").exists(), "no model fetched, none trained"


def test_after_data_only_with_settings_the_next_command_gives_them_again() -> None:
    from ftpipe.__main__ import data_only_next

    line = data_only_next("shop", {"csv_path": "/r/review_sample.csv"}, "split.seed=1 dedup.near_threshold=0.9")
    assert line == (
        "data only: read the review sample (/r/review_sample.csv), then `python -m ftpipe run shop --set 'split.seed=1 "
        "dedup.near_threshold=0.9'` trains on this data (its data steps run again: the same files and settings give "
        "the same rows; settings written in task.yaml apply to every run)")


def test_the_servers_it_starts_listen_on_localhost_only() -> None:
    import re

    makefile = (REPO_ROOT / "Makefile").read_text()
    commands = [line for line in makefile.splitlines() if re.search(r"dagster dev|dagster-webserver|mlflow (ui|server)", line)]
    assert len(commands) == 2
    assert all(re.search(r"(-h|--host) 127\.0\.0\.1 ", line) for line in commands), commands


def test_the_preference_line_shows_the_margins_the_gate_reads_beside_an_accuracy_that_did_not_move() -> None:
    from ftpipe.__main__ import preference_line

    report = {"preference_accuracy_base": 0.647, "preference_accuracy_sft": 0.647, "preference_accuracy_final": 0.647,
              "preference_baseline": "sft", "preference_pairs": 17, "preference_margin_widened": 16,
              "preference_margin_narrowed": 1, "preference_margin_gain": 0.882, "preference_margin_gain_ci_low": 0.647}
    assert preference_line(report, "dpo") == (
        "preference accuracy: base 0.647, SFT 0.647 -> dpo 0.647; final vs sft: the chosen answer's margin over the "
        "rejected one widened on 16 and narrowed on 1 of 17 pairs (margin gain +0.882, 95% CI low +0.647)")


def test_the_verdict_line_shows_the_few_shot_baseline_beside_the_base() -> None:
    from ftpipe.__main__ import verdict_line

    report = {"primary_metric": "accuracy", "base_score": 0.645, "fewshot_score": 0.839, "finetuned_score": 0.806,
              "delta": 0.161, "delta_ci_low": 0.05, "delta_ci_high": 0.27, "delta_vs_fewshot": -0.033,
              "delta_vs_fewshot_ci_low": -0.12, "forgetting": 0.0, "passed": True, "failed_conditions": "none"}
    assert verdict_line(report) == (
        "accuracy: base 0.645, few-shot 0.839 -> fine-tuned 0.806 (delta +0.161, 95% CI [+0.050, +0.270]; over "
        "few-shot -0.033, CI low -0.120); forgetting 0.000; gate PASSED")
    behind = {**report, "gate_caveat": "few-shot prompting of the base model scores higher (...)"}
    assert verdict_line(behind).endswith("gate PASSED; but few-shot prompting of the base model scores higher (...)")
    assert verdict_line({**report, "gate_caveat": "none"}).endswith("gate PASSED")
    hidden = {**report, "most_forgotten_skill": "facts 0.326 (95% CI 0.180 … 0.470, 64 rows)"}
    assert ("; forgetting 0.000 over the whole probe, the most in one skill: facts 0.326 (95% CI 0.180 … 0.470, "
            "64 rows); gate PASSED") in verdict_line(hidden)
    without = {**report, "fewshot_score": None, "passed": False, "failed_conditions": "delta_ci_low ..."}
    assert verdict_line(without) == ("accuracy: base 0.645 -> fine-tuned 0.806 (delta +0.161, 95% CI [+0.050, "
                                     "+0.270]); forgetting 0.000; gate FAILED"), "why: said once, at the end"
    assert verdict_line({**without, "majority_score": 0.29}).startswith(
        "accuracy: most common label 0.290, base 0.645 -> fine-tuned 0.806"), "what no model at all scores"
    assert "-> fine-tuned (warm-started) 0.806 (delta" in verdict_line({**report, "warm_started": True})
    assert verdict_line(behind, "max_forgetting 0.9 (default 0.1)").endswith(
        "gate PASSED at max_forgetting 0.9 (default 0.1); but few-shot prompting of the base model scores higher (...)")


def test_the_verdict_line_rounds_the_exact_scores_once(ftpipe_env) -> None:
    import json

    from ftpipe.__main__ import exact_figures, verdict_line
    from ftpipe.core.layout import METRICS, TaskLayout

    metadata = {"primary_metric": "accuracy", "base_score": 0.05, "finetuned_score": 0.1005, "delta": 0.05,
                "delta_ci_low": 0.01, "delta_ci_high": 0.09, "forgetting": 0.0, "passed": True}
    metrics = TaskLayout("orders").path("eval_report", METRICS)
    metrics.parent.mkdir(parents=True)
    metrics.write_text(json.dumps({**metadata, "finetuned_score": 0.10049844, "rows": 66}))
    exact = exact_figures("orders", metadata)
    assert exact["finetuned_score"] == 0.10049844 and "rows" not in exact, "only the figures the metadata shows"
    assert "-> fine-tuned 0.100 (delta" in verdict_line(exact) and "-> fine-tuned 0.101" in verdict_line(metadata)


def test_the_summary_says_whether_chat_answers_with_the_new_model() -> None:
    from ftpipe.__main__ import merged_line

    merged = {"model_path": "m/v2", "registered_model": "ftpipe-orders", "registered_version": 2, "champion": True,
              "champion_comparison": "0.256 against the champion's 0.081 on the 37 eval rows both were scored on"}
    assert merged_line("orders", merged) == (
        "merged model: m/v2 (registered as ftpipe-orders version 2), the champion (0.256 against the champion's 0.081 "
        'on the 37 eval rows both were scored on); try it: python -m ftpipe chat orders "Hello"')
    worse = "0.100 against the champion's 0.200 on the same eval split"
    assert merged_line("orders", {**merged, "champion": False, "champion_comparison": worse}).endswith(
        f"version 2): the candidate, not the champion ({worse}), so chat and serve answer with the champion")


def test_a_warning_check_is_said_to_warn_and_a_blocking_one_to_fail(capsys, monkeypatch) -> None:
    import dagster as dg

    from ftpipe import __main__ as cli
    from ftpipe.__main__ import print_summary

    monkeypatch.setattr(cli, "_materializations", lambda result: {
        "teacher_examples": {"prompts": 0, "teacher_requests": 0}, "base_model": {"model_path": "m"},
        "raw_examples": {"rows_read": 12, "rows_quarantined": 0}})

    def check(name: str, severity: dg.AssetCheckSeverity) -> dg.AssetCheckEvaluation:
        return dg.AssetCheckEvaluation(asset_key=dg.AssetKey("a"), check_name=name, passed=False, metadata={},
                                       severity=severity, description=f"{name} said")

    class Result:
        success, run_id = True, "r1"

        def get_asset_materialization_events(self):
            return []

        def get_asset_check_evaluations(self):
            return [check("cleaning", dg.AssetCheckSeverity.WARN), check("gate", dg.AssetCheckSeverity.ERROR)]

    print_summary("toy", Result())
    printed = capsys.readouterr().out.splitlines()
    assert "check cleaning warns: cleaning said" in printed and "check gate failed: gate said" in printed
    assert [line.split()[0] for line in printed if line.startswith("  ")] == ["raw_examples"], "no empty lines"


def test_the_summary_leaves_out_counts_of_nothing_and_wraps_an_assets_figures_under_its_name() -> None:
    from ftpipe.__main__ import SUMMARY_WIDTH, figures_line

    cleaned = {"rows_in": 583, "rows_out": 473, "exact_duplicates": 54, "near_duplicates": 40, "contradictions": 30,
               "preference_rows_in": 0, "preference_rows_out": 0, "shared_text_shingles": 7, "labels_respelled": 0,
               "removed_share": 0.189, "removed_path": "/x/removed.jsonl", "labels_named": True}
    lines = figures_line("deduplicated_examples", cleaned).splitlines()
    assert lines == ["  deduplicated_examples  rows_in=583, rows_out=473, exact_duplicates=54, near_duplicates=40, "
                     "contradictions=30,", " " * 25 + "removed_share=0.189"]
    assert all(len(line) <= SUMMARY_WIDTH for line in lines)
    assert figures_line("eval_report", {"accuracy_base": 0.0, "rows": 0}) == "  eval_report            accuracy_base=0"
    assert figures_line("teacher_examples", {"prompts": 0, "teacher_requests": 0}) == ""


def test_the_blocking_check_that_failed_a_run_is_said_once_at_the_end(capsys, monkeypatch) -> None:
    import types

    import dagster as dg

    from ftpipe import __main__ as cli

    monkeypatch.setattr(cli, "_materializations", lambda result: {})
    gate = dg.AssetCheckEvaluation(asset_key=dg.AssetKey("eval_report"), check_name="eval_report_gate", passed=False,
                                   metadata={}, severity=dg.AssetCheckSeverity.ERROR,
                                   description="delta_ci_low -0.020 <= min_improvement 0.000")
    stopped = types.SimpleNamespace(is_step_failure=True, step_key="eval_report_eval_report_gate")
    result = types.SimpleNamespace(success=False, run_id="r2", all_events=[stopped],
                                   get_asset_check_evaluations=lambda: [gate])
    cli.print_summary("toy", result)
    printed = capsys.readouterr().out
    assert printed.count("delta_ci_low -0.020") == 1, printed
    assert printed.strip().splitlines()[-1] == (
        "FAILED: check eval_report_gate failed: delta_ci_low -0.020 <= min_improvement 0.000")


def test_the_ui_hint_opens_the_instance_the_run_was_recorded_in(tmp_path, monkeypatch) -> None:
    from ftpipe.__main__ import ui_command

    (tmp_path / "Makefile").write_text("ui:\n")
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("DAGSTER_HOME", str(tmp_path))
    assert ui_command() == "make ui", "the Makefile's own instance"
    monkeypatch.setenv("DAGSTER_HOME", str(tmp_path / "my home"))
    dagster = Path(sys.executable).with_name("dagster")
    assert ui_command() == (f"cd {tmp_path} && DAGSTER_HOME='{tmp_path / 'my home'}' {dagster} dev "
                            "-m ftpipe.definitions -h 127.0.0.1 -p 3000"), "started where the instance's paths resolve"
    assert dagster.is_file(), "the dagster command of this environment"


def test_the_mlflow_hint_opens_the_store_the_run_was_tracked_in(tmp_path, monkeypatch) -> None:
    from ftpipe.__main__ import mlflow_ui_command

    (tmp_path / "Makefile").write_text("mlflow-ui:\n")
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.setenv("FTPIPE_HOME", str(tmp_path / ".ftpipe"))
    assert mlflow_ui_command() == "make mlflow-ui  (http://127.0.0.1:5000)", "the Makefile's own store"
    monkeypatch.setenv("FTPIPE_HOME", str(tmp_path / "my home"))
    mlflow = Path(sys.executable).with_name("mlflow")
    assert mlflow_ui_command() == (f"{mlflow} ui --host 127.0.0.1 --port 5000 --backend-store-uri "
                                   f"'sqlite:///{tmp_path / 'my home' / 'mlflow.db'}'  (http://127.0.0.1:5000)")
    assert mlflow.is_file(), "the mlflow command of this environment"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "postgresql://ml:secret@db/mlflow")
    assert mlflow_ui_command().endswith('--backend-store-uri "$MLFLOW_TRACKING_URI"  (http://127.0.0.1:5000)')
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://127.0.0.1:5005")
    assert mlflow_ui_command() == "http://127.0.0.1:5005", "a tracking server is its own UI"


def test_the_summary_says_where_the_rows_set_aside_are() -> None:
    from ftpipe.__main__ import set_aside_lines

    found = {"raw_examples": {"rows_quarantined": 3, "quarantine_path": "raw/quarantine.jsonl"},
             "deduplicated_examples": {"rows_in": 100, "rows_out": 90, "removed_path": "dedup/removed.jsonl"}}
    assert set_aside_lines(found) == ["  3 rows quarantined, each with its reason: raw/quarantine.jsonl",
                                 "  10 rows removed by cleaning (chat and preference rows), each with its reason: "
                                 "dedup/removed.jsonl"]
    found["deduplicated_examples"].update(preference_rows_in=247, preference_rows_out=239)
    assert set_aside_lines(found)[1].startswith("  18 rows removed by cleaning"), "preference rows count too"
    one = {"raw_examples": {"rows_quarantined": 1, "quarantine_path": "q"}, "deduplicated_examples": {
        "rows_in": 9, "rows_out": 8, "removed_path": "r"}}
    assert [line.split(", each")[0] for line in set_aside_lines(one)] == [
        "  1 row quarantined", "  1 row removed by cleaning (chat and preference rows)"]
    clean = {"raw_examples": {"rows_quarantined": 0}, "deduplicated_examples": {"rows_in": 9, "rows_out": 9}}
    assert set_aside_lines(clean) == [] and set_aside_lines({}) == [], "nothing set aside, nothing said"


def test_chat_names_an_unknown_task_and_the_tasks_there(ftpipe_env: Path, capsys) -> None:
    from ftpipe.__main__ import main

    make_task(ftpipe_env, "orders", {"a.jsonl": [chat("hi", "hello")]})
    assert main(["chat", "ordres", "hello"]) == 2
    assert capsys.readouterr().err.strip() == f"no task folder named 'ordres' in {ftpipe_env / 'tasks'}; tasks there: orders"


def test_a_run_stopped_by_the_gate_ends_with_the_gates_verdict_not_an_exception() -> None:
    from types import SimpleNamespace

    import dagster as dg

    from ftpipe.__main__ import failure_reason

    gate = dg.AssetCheckEvaluation(asset_key=dg.AssetKey("eval_report"), check_name="eval_report_gate", passed=False,
                                   metadata={}, severity=dg.AssetCheckSeverity.ERROR,
                                   description="delta_ci_low -0.02 <= min_improvement 0.00")
    result = SimpleNamespace(
        all_events=[SimpleNamespace(is_step_failure=True, step_key="eval_report_eval_report_gate")],
        get_asset_check_evaluations=lambda: [gate])
    assert failure_reason(result) == "check eval_report_gate failed: delta_ci_low -0.02 <= min_improvement 0.00"


def test_a_step_stopped_by_ctrl_c_ends_with_one_plain_line() -> None:
    from types import SimpleNamespace

    from dagster._utils.error import SerializableErrorInfo

    from ftpipe.__main__ import failure_reason

    error = SerializableErrorInfo("dagster._core.errors.DagsterExecutionInterruptedError\n", ["  File ..."],
                                  "DagsterExecutionInterruptedError")
    stopped = SimpleNamespace(is_step_failure=True, step_key="eval_report",
                              step_failure_data=SimpleNamespace(user_failure_data=None, error=error))
    result = SimpleNamespace(all_events=[stopped], get_asset_check_evaluations=lambda: [])
    assert failure_reason(result) == ("eval_report: stopped by Ctrl-C or SIGTERM (the same command carries on: the "
                                      "finished steps are reused)")
    training = SimpleNamespace(is_step_failure=True, step_key="lora_adapter", step_failure_data=SimpleNamespace(
        user_failure_data=SimpleNamespace(description="training stopped: the run was interrupted"), error=None))
    result = SimpleNamespace(all_events=[training], get_asset_check_evaluations=lambda: [])
    assert failure_reason(result) == "lora_adapter: training stopped: the run was interrupted"
    assert failure_reason(result, stopped=True) == (
        "lora_adapter: stopped by Ctrl-C or SIGTERM (the same command carries on: the finished steps are reused)"), \
        "a step that turned the signal into its own failure was stopped all the same"


def test_the_summary_says_where_set_aside_rows_are_and_what_a_teacher_that_stopped_early_left() -> None:
    from ftpipe.__main__ import set_aside_lines

    found = {"teacher_examples": {"stopped": "budget of 12 requests spent", "unanswered": 18},
             "raw_examples": {"rows_quarantined": 2, "quarantine_path": "q.jsonl"}}
    assert set_aside_lines(found) == [
        "  the teacher stopped early (budget of 12 requests spent): 18 prompts wait for the next materialization",
        "  2 rows quarantined, each with its reason: q.jsonl"]
    assert set_aside_lines({"teacher_examples": {"stopped": "no", "unanswered": 0}}) == []
