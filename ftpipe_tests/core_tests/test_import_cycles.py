"""ftpipe's modules import in any order: no module-level import cycle (one would break whichever of its modules a
program imports first, as `ftpipe.core.training.setup` once did for the benchmarks). A package's __init__ and its
own modules may import each other: importing a module runs its packages' __init__ first, which is not counted."""

import ast
import graphlib
from pathlib import Path

from ftpipe.core.storage import REPO_ROOT


def module_names() -> dict[str, Path]:
    names = {}
    for path in (REPO_ROOT / "ftpipe").rglob("*.py"):
        parts = path.relative_to(REPO_ROOT).with_suffix("").parts
        names[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return names


def module_level_imports(name: str, modules: dict[str, Path]) -> set[str]:
    """The ftpipe modules that importing `name` runs, its packages' __init__ included but for its own packages'."""
    found = set()
    for node in ast.parse(modules[name].read_text(encoding="utf-8")).body:
        if isinstance(node, ast.ImportFrom) and node.module:
            targets = [node.module, *(f"{node.module}.{alias.name}" for alias in node.names)]
        elif isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        else:
            continue
        for target in targets:
            parts = target.split(".")
            found.update(module for i in range(2, len(parts) + 1) if (module := ".".join(parts[:i])) in modules)
    return {module for module in found if not (name == module or name.startswith(f"{module}."))}


def test_no_module_level_import_cycle() -> None:
    modules = module_names()
    graph = graphlib.TopologicalSorter({name: module_level_imports(name, modules) for name in modules})
    graph.prepare()  # CycleError names the cycle
