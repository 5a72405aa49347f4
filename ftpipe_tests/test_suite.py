"""The test suite's own rules: what tests share lives in plain modules (`builders`, `tiny_model`, ...), never in a test
module, and the benchmarks use no test module."""

import ast
from pathlib import Path

from ftpipe.core.storage import REPO_ROOT


def imported_modules(path: Path) -> set[str]:
    found = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.ImportFrom) and node.module:
            found.add(node.module)
        elif isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
    return found


def test_no_test_module_or_benchmark_imports_a_test_module() -> None:
    sources = [*(REPO_ROOT / "ftpipe_tests").rglob("*.py"), *(REPO_ROOT / "bench").glob("*.py")]
    offenders = {
        str(path.relative_to(REPO_ROOT)): sorted(found)
        for path in sources
        if (found := {m for m in imported_modules(path) if m.startswith("ftpipe_tests.") and ".test_" in f".{m}"})
    }
    assert not offenders, offenders
