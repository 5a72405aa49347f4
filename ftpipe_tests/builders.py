"""Builders shared by the tests: task folders, the short training every pipeline test uses, and run results."""

from __future__ import annotations

import json
from pathlib import Path

import dagster as dg

from ftpipe_tests.tiny_model import toy_rows

TRAINING = ("training: {method: lora, max_steps: 6, batch_size: 8, eval_steps: 3, logging_steps: 2, learning_rate: 0.01, "
            "max_length: 64, warmup_ratio: 0.0}\n")
LENIENT_GATE = "evaluation: {min_improvement: -2.0, max_forgetting: 1.0, min_preference_gain: -2.0}\n"  # every model passes


def chat(prompt: str, answer: str, system: str | None = None) -> dict:
    messages = [{"role": "system", "content": system}] if system else []
    return {"messages": messages + [{"role": "user", "content": prompt}, {"role": "assistant", "content": answer}]}


def make_task(data_dir: Path, name: str, files: dict[str, list | str | bytes], task_yaml: str = "") -> Path:
    """Create `tasks/<name>/` with task.yaml and raw files (lists of rows become JSONL)."""
    folder = data_dir / "tasks" / name
    (folder / "raw").mkdir(parents=True)
    (folder / "task.yaml").write_text(task_yaml)
    for filename, content in files.items():
        path = folder / "raw" / filename
        path.parent.mkdir(parents=True, exist_ok=True)
        if isinstance(content, list):
            content = "".join(json.dumps(row) + "\n" for row in content)
        path.write_bytes(content if isinstance(content, bytes) else content.encode())
    return folder


def toy_task(data_dir: Path, name: str, model: Path, extra_yaml: str = "", training: str = TRAINING) -> Path:
    """A task of 60 learnable chat rows on the tiny model in `model`, trained for a few steps (`training`)."""
    rows = [{"messages": r["messages"]} for r in toy_rows(60, seed=3)]
    return make_task(data_dir, name, {"rows.jsonl": rows},
                     f"base_model: {model}\nsplit: {{eval_fraction: 0.2}}\n{training}{extra_yaml}")


def append_rows(folder: Path, name: str, count: int, seed: int) -> None:
    """Add a raw file of `count` more toy rows to the task in `folder`."""
    with (folder / "raw" / name).open("w") as handle:
        for row in toy_rows(count, seed=seed):
            handle.write(json.dumps({"messages": row["messages"]}) + "\n")


def materialization(result: dg.ExecuteInProcessResult, asset: str) -> dict:
    """The metadata values of `asset`'s one materialization in `result`."""
    [event] = [e for e in result.get_asset_materialization_events() if e.asset_key.to_user_string() == asset]
    return {key: value.value for key, value in event.materialization.metadata.items()}


def data_version(result: dg.ExecuteInProcessResult, asset: str) -> str:
    [event] = [e for e in result.get_asset_materialization_events() if e.asset_key.to_user_string() == asset]
    return event.materialization.tags["dagster/data_version"]


def check(result: dg.ExecuteInProcessResult, name: str) -> dg.AssetCheckEvaluation:
    [found] = [c for c in result.get_asset_check_evaluations() if c.check_name == name]
    return found


@dg.op
def _noop() -> None:
    pass


@dg.job
def pool_holding_job() -> None:
    """The job of runs that tests create to hold a pool slot (never executed)."""
    _noop()
