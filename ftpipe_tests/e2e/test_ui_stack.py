"""The real UI stack: dagster-webserver and dagster-daemon on 127.0.0.1, driven the way a user drives them.

One small task with a tiny local model. The test launches the whole graph through the webserver's GraphQL
API (what the Materialize button sends), appends rows and lets the daemon refresh the data and retrain by
the task's policy, then opens the asset graph in headless Chromium and saves a screenshot.
"""

import os
import subprocess
import sys
import time
from pathlib import Path

import dagster as dg
import pytest

from ftpipe.core.storage import REPO_ROOT
from ftpipe_tests.builders import LENIENT_GATE, append_rows, toy_task
from ftpipe_tests.e2e.helpers import REPOSITORY, Stack, dagster_home, launch, wait_for, wait_for_run
from ftpipe_tests.tiny_model import build_tiny_model

pytestmark = [pytest.mark.e2e, pytest.mark.slow]
TASK = "colors"
ASSETS = ["raw_examples", "deduplicated_examples", "review_sample", "heldout_split",
          "base_model", "lora_adapter", "preference_adapter", "eval_report", "human_review", "merged_model"]
CHECKS = [("deduplicated_examples", "deduplicated_examples_removal_share"), ("heldout_split", "heldout_split_no_leakage"),
          ("eval_report", "eval_report_gate"), ("human_review", "human_review_verdicts")]
SCREENSHOT = REPO_ROOT / "test-artifacts" / "asset_graph.png"
CHROMIUM = "/usr/bin/chromium"
TICKS = """
query Ticks($selector: SensorSelector!) {
  sensorOrError(sensorSelector: $selector) { ... on Sensor { sensorState { ticks(limit: 3) { status skipReason } } } }
}"""


@pytest.fixture
def stack(ftpipe_env: Path, tiny_model_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    assert Path(CHROMIUM).exists(), f"{CHROMIUM} is missing: install Debian's chromium package (.ci/run does)"
    toy_task(ftpipe_env, TASK, tiny_model_dir, LENIENT_GATE + "retrain: {on_data_change: true}\n")
    home = dagster_home(tmp_path)
    env = {**os.environ, "DAGSTER_HOME": str(home), "FTPIPE_POLL_SECONDS": "5"}
    env.pop("MLFLOW_TRACKING_URI", None)
    subprocess.run([sys.executable, "-m", "ftpipe", "tasks", "sync"], env=env, cwd=home, check=True)
    monkeypatch.chdir(home)  # dagster.yaml's storage folder is relative to the working directory
    running = Stack(env, home)
    running.task_folder = ftpipe_env / "tasks" / TASK
    try:
        running.wait_until_loaded()
        with dg.DagsterInstance.from_config(str(home)) as instance:
            running.instance = instance
            yield running
    finally:
        running.stop()


def launch_whole_graph(stack: Stack) -> str:
    """What the UI's Materialize button sends for all assets of one partition."""
    selector = {"pipelineName": "__ASSET_JOB", "assetSelection": [{"path": [name]} for name in ASSETS],
                "assetCheckSelection": [{"assetKey": {"path": [asset]}, "name": name} for asset, name in CHECKS]}
    return launch(stack, selector, TASK)


def wait_for_success(stack: Stack, run_id: str) -> None:
    assert wait_for_run(stack, run_id) == "SUCCESS", stack.instance.all_logs(run_id)[-5:]


def latest(instance: dg.DagsterInstance, asset: str):
    records = instance.fetch_materializations(dg.AssetRecordsFilter(asset_key=dg.AssetKey(asset), asset_partitions=[TASK]), limit=1).records
    return records[0] if records else None


def runs_tagged(instance: dg.DagsterInstance, key: str, value: str) -> list:
    return instance.get_runs(dg.RunsFilter(tags={key: value}))


def metadata(record) -> dict:
    return {k: v.value for k, v in record.asset_materialization.metadata.items()}


def test_ui_stack_materializes_refreshes_retrains_and_shows_the_graph(stack: Stack, tiny_model_dir: Path,
                                                                     tmp_path: Path) -> None:
    instance = stack.instance
    started = time.monotonic()
    first = launch_whole_graph(stack)
    wait_for_success(stack, first)
    print(f"whole graph: {time.monotonic() - started:.0f}s")
    assert {name: getattr(latest(instance, name), "run_id", None) for name in ASSETS} == {name: first for name in ASSETS}
    [gate] = [e for e in instance.all_logs(first, of_type=dg.DagsterEventType.ASSET_CHECK_EVALUATION)
              if e.dagster_event.event_specific_data.check_name == "eval_report_gate"]
    assert gate.dagster_event.event_specific_data.passed
    rows_before = metadata(latest(instance, "raw_examples"))["rows_read"]
    adapter_before = latest(instance, "lora_adapter")

    append_rows(stack.task_folder, "more.jsonl", 20, seed=11)

    refreshed = wait_for(lambda: (r := latest(instance, "heldout_split")) and r.run_id != first and r, 240,
                         "the daemon to refresh the data assets", stack)
    refresh_run = instance.get_run_by_id(refreshed.run_id)
    assert refresh_run.tags.get("dagster/sensor_name") == "automation_sensor", refresh_run.tags
    assert metadata(latest(instance, "raw_examples"))["rows_read"] == rows_before + 20

    print(f"refresh: {time.monotonic() - started:.0f}s")
    retrain = wait_for(lambda: runs_tagged(instance, "ftpipe/retrain", "data_change"), 120, "the retraining run", stack)
    [retrain] = retrain
    wait_for_success(stack, retrain.run_id)
    print(f"retrain: {time.monotonic() - started:.0f}s")
    adapter = latest(instance, "lora_adapter")
    assert adapter.run_id == retrain.run_id and not metadata(adapter).get("reused")
    assert metadata(adapter)["training_fingerprint"] != metadata(adapter_before)["training_fingerprint"]
    assert latest(instance, "merged_model").run_id == retrain.run_id

    selector = {**REPOSITORY, "sensorName": "retrain_on_data_change_sensor"}

    def skipped_as_unchanged():
        ticks = stack.graphql(TICKS, selector=selector)["sensorOrError"]["sensorState"]["ticks"]
        return ticks and ticks[0]["status"] == "SKIPPED" and "unchanged" in (ticks[0]["skipReason"] or "")

    wait_for(skipped_as_unchanged, 60, "the retrain sensor to skip an unchanged fingerprint", stack)
    assert len(runs_tagged(instance, "ftpipe/retrain", "data_change")) == 1

    print(f"skip: {time.monotonic() - started:.0f}s")
    backfill_after_a_base_model_change(stack, tiny_model_dir, tmp_path, retrain.run_id)
    print(f"backfill: {time.monotonic() - started:.0f}s")
    show_asset_graph(stack)
    print(f"browser: {time.monotonic() - started:.0f}s")


def backfill_after_a_base_model_change(stack: Stack, model: Path, tmp_path: Path, previous_run: str) -> None:
    """The README's recipe: change base_model in task.yaml, then backfill finetune_job over all tasks."""
    instance = stack.instance
    old_base = metadata(latest(instance, "base_model"))["fingerprint"]
    new_model = build_tiny_model(tmp_path / "tiny2", seed=1)
    task_yaml = stack.task_folder / "task.yaml"
    task_yaml.write_text(task_yaml.read_text().replace(str(model), str(new_model)))
    refreshed = wait_for(lambda: (r := latest(instance, "heldout_split")).run_id != previous_run and r, 120,
                         "the data refresh after the task.yaml edit", stack)
    wait_for_success(stack, refreshed.run_id)
    subprocess.run([Path(sys.executable).parent / "dagster", "job", "backfill", "-j", "finetune_job", "--all",
                    "-w", str(REPO_ROOT / "workspace.yaml"), "-l", "ftpipe", "--noprompt"],
                   env=stack.env, cwd=stack.home, check=True, capture_output=True, timeout=120)
    [run] = wait_for(lambda: [r for r in instance.get_runs() if r.tags.get("dagster/backfill")], 60, "the backfill run", stack)
    wait_for_success(stack, run.run_id)
    assert metadata(latest(instance, "base_model"))["fingerprint"] != old_base
    adapter = latest(instance, "lora_adapter")
    assert adapter.run_id == run.run_id and not metadata(adapter).get("reused"), "a new base model retrains the adapter"
    assert latest(instance, "merged_model").run_id == run.run_id


def show_asset_graph(stack: Stack) -> None:
    from playwright.sync_api import sync_playwright

    flags = ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run", "--disable-background-networking",
             "--disable-component-update", "--disable-sync"]
    SCREENSHOT.parent.mkdir(exist_ok=True)
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, args=flags)
        try:
            page = browser.new_page(viewport={"width": 3200, "height": 1800})
            page.goto(f"{stack.url}/asset-groups", wait_until="networkidle", timeout=120_000)
            expand_all_groups(page)
            for name in ASSETS:
                page.get_by_text(name, exact=True).first.wait_for(timeout=30_000)
            page.screenshot(path=str(SCREENSHOT))
        finally:
            browser.close()
    assert SCREENSHOT.stat().st_size > 10_000


def expand_all_groups(page) -> None:
    """Press the graph's "Expand all groups" shortcut, after dismissing the newsletter prompt if it is open."""
    from playwright.sync_api import TimeoutError as PageTimeout

    page.get_by_text("Global asset lineage").wait_for(timeout=60_000)
    for _ in range(3):
        if page.get_by_role("button", name="Skip").is_visible():
            page.get_by_role("button", name="Skip").click()
        page.keyboard.press("Alt+e")
        try:
            page.get_by_text(ASSETS[1], exact=True).first.wait_for(timeout=15_000)
            return
        except PageTimeout:
            continue
