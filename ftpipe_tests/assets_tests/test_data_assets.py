import json
import os
import subprocess
import sys
from pathlib import Path

import dagster as dg
import pytest

from ftpipe.assets import data
from ftpipe.checks import heldout_split_no_leakage
from ftpipe.core.records import example_id
from ftpipe.core.storage import artifact_dir
from ftpipe.core.tasks import task_files_version
from ftpipe.partitions import task_partitions
from ftpipe_tests.conftest import chat, make_task

ROWS = [chat(f"ticket {i}: my order number {i * 7} never arrived at street {i}", f"shipping-{i % 3}") for i in range(60)]
ASSETS = [data.raw_examples, data.deduplicated_examples, data.review_sample, data.heldout_split]


def materialize(instance: dg.DagsterInstance, task: str, run_config: dict | None = None, **kwargs):
    instance.add_dynamic_partitions(task_partitions.name, [task])
    return dg.materialize(
        ASSETS + [heldout_split_no_leakage], instance=instance, partition_key=task, run_config=run_config, **kwargs
    )


def metadata(result, asset: str) -> dict:
    [event] = [e for e in result.get_asset_materialization_events() if e.asset_key.to_user_string() == asset]
    return {k: v.value for k, v in event.materialization.metadata.items()}


def test_data_assets_materialize_with_contract_metadata(ftpipe_env: Path) -> None:
    dirty = ROWS + [ROWS[0], chat("ticket 1: my order number 7 never arrived at street 1", "billing"), {"oops": 1}]
    make_task(ftpipe_env, "shop", {"a.jsonl": dirty}, "split: {eval_fraction: 0.2}\n")
    with dg.instance_for_test() as instance:
        result = materialize(instance, "shop")
        assert result.success
        raw = metadata(result, "raw_examples")
        assert (raw["rows_read"], raw["rows_valid"], raw["rows_quarantined"]) == (63, 62, 1)
        assert Path(raw["quarantine_path"]).exists()
        deduped = metadata(result, "deduplicated_examples")
        assert deduped["rows_in"] == deduped["rows_out"] + deduped["exact_duplicates"] + deduped["near_duplicates"] + deduped["contradictions"]
        assert deduped["exact_duplicates"] == 1 and deduped["contradictions"] == 2  # a 1-vs-1 tie drops both
        split = metadata(result, "heldout_split")
        assert split["train_rows"] + split["eval_rows"] == deduped["rows_out"]
        assert metadata(result, "review_sample")["rows"] == deduped["rows_out"]
        [check] = result.get_asset_check_evaluations()
        assert check.passed and check.check_name == "heldout_split_no_leakage"
        versions = {e.asset_key.to_user_string(): e.materialization.tags["dagster/data_version"]
                    for e in result.get_asset_materialization_events()}
        again = materialize(instance, "shop")
        assert versions == {e.asset_key.to_user_string(): e.materialization.tags["dagster/data_version"]
                            for e in again.get_asset_materialization_events()}


def test_run_config_overrides_the_task_for_one_run(ftpipe_env: Path) -> None:
    make_task(ftpipe_env, "shop", {"a.jsonl": ROWS})
    override = {"ops": {"heldout_split": {"config": {"overrides": "split: {eval_fraction: 0.5}"}}}}
    with dg.instance_for_test() as instance:
        result = materialize(instance, "shop", override)
    assert metadata(result, "heldout_split")["eval_fraction"] == 0.5


def test_zero_valid_rows_fails_naming_the_folder(ftpipe_env: Path) -> None:
    make_task(ftpipe_env, "empty", {"a.jsonl": [{"nothing": 1}]})
    with dg.instance_for_test() as instance, pytest.raises(Exception, match="no usable rows"):
        materialize(instance, "empty")


def test_leakage_check_blocks_when_an_earlier_split_pinned_near_duplicates_apart(ftpipe_env: Path) -> None:
    prompt = " ".join(f"word{i}" for i in range(40))
    near = prompt.replace("word7", "other")
    a, b = chat(prompt, "alpha " * 30), chat(near, "omega " * 30)
    make_task(ftpipe_env, "shop", {"a.jsonl": ROWS + [a, b]})
    folder = artifact_dir("shop", "heldout_split")
    folder.mkdir(parents=True)
    pinned = {example_id(a["messages"]): "train", example_id(b["messages"]): "eval"}
    (folder / "split.json").write_text(json.dumps({"eval_fraction": 0.15, "seed": 0, "sides": pinned}))
    with dg.instance_for_test() as instance:
        result = materialize(instance, "shop", raise_on_error=False)
    [check] = result.get_asset_check_evaluations()
    assert not result.success and not check.passed
    assert check.metadata["leaked_eval_rows"].value == 1


def test_definitions_graph_and_no_heavy_imports() -> None:
    code = (
        "import sys, json; from ftpipe.definitions import defs; "
        "g = defs.resolve_asset_graph(); "
        "print(json.dumps({'assets': sorted(k.to_user_string() for k in g.get_all_asset_keys()), "
        "'deps': {k.to_user_string(): sorted(p.to_user_string() for p in g.get(k).parent_keys) for k in g.get_all_asset_keys()}, "
        "'heavy': [m for m in ('torch', 'transformers', 'trl', 'peft', 'mlflow') if m in sys.modules]}))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    info = json.loads(out.strip().splitlines()[-1])
    assert info["heavy"] == []
    assert {"task_files", "raw_examples", "deduplicated_examples", "review_sample", "heldout_split"} <= set(info["assets"])
    assert info["deps"]["raw_examples"] == ["task_files"]
    assert info["deps"]["deduplicated_examples"] == ["raw_examples"]
    assert info["deps"]["heldout_split"] == ["deduplicated_examples"]
    assert info["deps"]["review_sample"] == ["deduplicated_examples"]


def test_tasks_sync_cli_registers_partitions(ftpipe_env: Path, tmp_path: Path) -> None:
    make_task(ftpipe_env, "alpha", {"a.jsonl": ROWS})
    (ftpipe_env / "tasks" / "UPPER").mkdir()
    home = tmp_path / "dagster_home"
    home.mkdir()
    env = {**os.environ, "DAGSTER_HOME": str(home)}
    done = subprocess.run([sys.executable, "-m", "ftpipe", "tasks", "sync"], capture_output=True, text=True, env=env, check=True)
    assert "alpha" in done.stdout and "'UPPER'" in done.stderr
    with dg.DagsterInstance.from_config(str(home)) as instance:
        assert instance.get_dynamic_partitions(task_partitions.name) == ["alpha"]
        [observed] = instance.fetch_observations(dg.AssetKey("task_files"), limit=5).records
        assert observed.asset_observation.tags["dagster/data_version"] == task_files_version("alpha")
    again = subprocess.run([sys.executable, "-m", "ftpipe", "tasks", "sync"], capture_output=True, text=True, env=env, check=True)
    assert "(0 new, 0 changed)" in again.stdout
