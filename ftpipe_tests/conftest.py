"""Shared fixtures: a temporary data dir and artifact home for every test, one tiny model per test session, and a
task on it. Plain builders live in `ftpipe_tests.builders`."""

from __future__ import annotations

from pathlib import Path

import pytest

from ftpipe_tests.builders import toy_task


LONGEST_MODULE = "test_demo.py"  # the real-model demo: a third of the suite's CPU time, on one worker


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Longest work first: the demo, then modules with whole stacks (`e2e`), then those with real trainings (`slow`),
    then the rest, each module's tests together and in order. With one worker per core (`make test`, which keeps
    this order for pytest-xdist), the demo runs beside everything else instead of starting late and running alone."""
    lighter: dict[str, tuple[bool, bool, bool]] = {}  # per module: not the demo, no e2e test, no slow test
    for item in items:
        _, no_e2e, no_slow = lighter.get(item.module.__name__, (True, True, True))
        lighter[item.module.__name__] = (item.path.name != LONGEST_MODULE,
                                         no_e2e and item.get_closest_marker("e2e") is None,
                                         no_slow and item.get_closest_marker("slow") is None)
    items.sort(key=lambda item: lighter[item.module.__name__])  # stable: tests keep their order


@pytest.fixture(autouse=True)
def ftpipe_env(tmp_path: Path, tmp_path_factory: pytest.TempPathFactory, monkeypatch: pytest.MonkeyPatch) -> Path:
    """Point FTPIPE_DATA_DIR and FTPIPE_HOME at fresh folders, and allow local models the tests build; returns
    the data dir."""
    data = tmp_path / "data"
    (data / "tasks").mkdir(parents=True)
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
