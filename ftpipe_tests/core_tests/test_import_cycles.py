"""ftpipe's modules import in any order: no module-level import cycle runs through two packages (one would break
whichever of its modules a program imports first, as `ftpipe.core.training.setup` once did for the benchmarks)."""

import ast
from pathlib import Path

from ftpipe.core.storage import REPO_ROOT


def module_names() -> dict[str, Path]:
    names = {}
    for path in (REPO_ROOT / "ftpipe").rglob("*.py"):
        parts = path.relative_to(REPO_ROOT).with_suffix("").parts
        names[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return names


def module_level_imports(path: Path, modules: dict[str, Path]) -> set[str]:
    """The ftpipe modules that importing `path` runs, its packages' __init__ included."""
    found = set()
    for node in ast.parse(path.read_text(encoding="utf-8")).body:
        if isinstance(node, ast.ImportFrom) and node.module:
            targets = [node.module, *(f"{node.module}.{alias.name}" for alias in node.names)]
        elif isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        else:
            continue
        for target in targets:
            parts = target.split(".")
            found.update(name for i in range(2, len(parts) + 1) if (name := ".".join(parts[:i])) in modules)
    return found


def cycles(graph: dict[str, set[str]]) -> list[set[str]]:
    """The strongly connected components of more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    found: list[set[str]] = []

    def visit(module: str) -> None:
        index[module] = low[module] = len(index)
        stack.append(module)
        for imported in graph[module]:
            if imported not in index:
                visit(imported)
                low[module] = min(low[module], low[imported])
            elif imported in stack:
                low[module] = min(low[module], index[imported])
        if low[module] == index[module]:
            component = set()
            while not component or module not in component:
                component.add(stack.pop())
            if len(component) > 1:
                found.append(component)

    for module in graph:
        if module not in index:
            visit(module)
    return found


def within_one_package(component: set[str], modules: dict[str, Path]) -> bool:
    """A package's __init__ and its own modules may import each other."""
    root = min(component, key=len)
    return modules[root].name == "__init__.py" and all(m == root or m.startswith(f"{root}.") for m in component)


def test_no_import_cycle_runs_through_two_packages() -> None:
    modules = module_names()
    graph = {name: module_level_imports(path, modules) - {name} for name, path in modules.items()}
    across = [sorted(c) for c in cycles(graph) if not within_one_package(c, modules)]
    assert not across, across
