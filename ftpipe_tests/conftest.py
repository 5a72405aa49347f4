"""Shared fixtures: a temporary data dir and artifact home for every test."""

from __future__ import annotations

import json
from pathlib import Path

import pytest


@pytest.fixture(autouse=True)
def ftpipe_env(tmp_path: Path, tmp_path_factory: pytest.TempPathFactory, monkeypatch: pytest.MonkeyPatch) -> Path:
    """Point FTPIPE_DATA_DIR and FTPIPE_HOME at fresh folders, and allow local models the tests build; returns
    the data dir."""
    data = tmp_path / "data"
    (data / "tasks").mkdir(parents=True)
    monkeypatch.setenv("FTPIPE_DATA_DIR", str(data))
    monkeypatch.setenv("FTPIPE_HOME", str(tmp_path / "home"))
    monkeypatch.setenv("FTPIPE_MODEL_DIRS", str(tmp_path_factory.getbasetemp()))
    return data


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One tiny random Llama model (and tokenizer) for the whole test session; treat it as read-only."""
    from ftpipe_tests.tiny_model import build_tiny_model

    return build_tiny_model(tmp_path_factory.mktemp("tiny_model") / "model")


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
        if isinstance(content, list):
            content = "".join(json.dumps(row) + "\n" for row in content)
        path.write_bytes(content if isinstance(content, bytes) else content.encode())
    return folder


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Start the real-model demo (the longest test) first, so parallel workers finish at about the same time."""
    items.sort(key=lambda item: item.path.name != "test_demo.py")
