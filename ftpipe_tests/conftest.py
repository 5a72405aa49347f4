"""Shared fixtures: a temporary data dir and artifact home for every test, one tiny model per test session, and a
task on it. Plain builders live in `ftpipe_tests.builders`."""

from __future__ import annotations

from pathlib import Path

import pytest

from ftpipe_tests.builders import toy_task


@pytest.fixture(autouse=True)
def ftpipe_env(tmp_path: Path, tmp_path_factory: pytest.TempPathFactory, monkeypatch: pytest.MonkeyPatch) -> Path:
    """Point FTPIPE_DATA_DIR and FTPIPE_HOME at fresh folders, and allow local models the tests build; returns
    the data dir. Its `general/` folder is empty (no probe, no replay prompts) unless a test adds to it."""
    data = tmp_path / "data"
    (data / "tasks").mkdir(parents=True)
    (data / "general").mkdir()
    monkeypatch.setenv("FTPIPE_DATA_DIR", str(data))
    monkeypatch.setenv("FTPIPE_HOME", str(tmp_path / "home"))
    monkeypatch.setenv("FTPIPE_MODEL_DIRS", str(tmp_path_factory.getbasetemp()))
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    return data


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One tiny random Llama model (and tokenizer) for the whole test session; treat it as read-only."""
    from ftpipe_tests.tiny_model import build_tiny_model

    return build_tiny_model(tmp_path_factory.mktemp("tiny_model") / "model")


@pytest.fixture
def tiny_task(ftpipe_env: Path, tiny_model_dir: Path) -> str:
    """The task `toy`: 60 learnable rows on the session's tiny model, trained for a few steps."""
    toy_task(ftpipe_env, "toy", tiny_model_dir)
    return "toy"


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Longest modules first, so no worker starts the real demo (a third of the suite's work) near the end: the demo,
    then modules with whole stacks, then with real trainings, then the rest; a module's own order is kept (and
    `--no-loadscope-reorder` keeps this one)."""
    def weight(item: pytest.Item) -> int:
        if item.path.name == "test_demo.py":
            return 0
        return 1 if item.get_closest_marker("e2e") else 2 if item.get_closest_marker("slow") else 3

    module_weight: dict[Path, int] = {}
    for item in items:
        module_weight[item.path] = min(weight(item), module_weight.get(item.path, 3))
    items.sort(key=lambda item: module_weight[item.path])
