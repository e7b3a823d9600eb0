"""The layering (DESIGN section 5, "Seams"): no import cycles, and the engine never imports the trainer.

Imports are read from the source (module level and inside functions alike: a lazy import that only
hides a cycle is still a cycle), resolved to dist_mtl modules, and checked as a directed graph.
"""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).parents[2]
PACKAGE = ROOT / "dist_mtl"


def _module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imports(path: Path, modules: set[str]) -> set[str]:
    """dist_mtl modules that `path` imports (a `from pkg import name` counts pkg.name if it is a module)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names = [f"{node.module}.{alias.name}" for alias in node.names] + [node.module]
        else:
            continue
        for name in names:
            while name and name not in modules:
                name = name.rpartition(".")[0]
            if name:
                found.add(name)
    return found


def _graph() -> dict[str, set[str]]:
    paths = {_module_name(p): p for p in PACKAGE.rglob("*.py")}
    modules = set(paths)
    graph = {name: _imports(path, modules) - {name} for name, path in paths.items()}
    # A package's __init__ re-exports its submodules; importing a submodule runs the package first,
    # which is not an edge of the code's own design, so package -> own submodule edges are dropped.
    return {m: {d for d in deps if not d.startswith(m + ".")} for m, deps in graph.items()}


def _cycle(graph: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        stack.append(node)
        for dep in sorted(graph.get(node, ())):
            if state.get(dep) == 1:
                return stack[stack.index(dep) :] + [dep]
            if dep not in state and (found := visit(dep)):
                return found
        stack.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state and (found := visit(node)):
            return found
    return None


def _package(name: str) -> str:
    parts = name.split(".")
    return ".".join(parts[:2])


def test_no_import_cycle_between_packages() -> None:
    """Collapse modules to their top-level unit (dist_mtl.engine, dist_mtl.trainer, ...): no cycles."""
    packages: dict[str, set[str]] = {}
    for module, deps in _graph().items():
        packages.setdefault(_package(module), set()).update(_package(d) for d in deps)
    packages = {p: deps - {p} for p, deps in packages.items()}
    assert _cycle(packages) is None, " -> ".join(_cycle(packages) or [])


def test_no_import_cycle_between_modules() -> None:
    cycle = _cycle(_graph())
    assert cycle is None, " -> ".join(cycle or [])


def test_engine_never_imports_the_trainer_or_the_entry_points() -> None:
    forbidden = {"dist_mtl.trainer", "dist_mtl.train", "dist_mtl.cli"}
    bad = {m: deps & forbidden for m, deps in _graph().items() if m.startswith("dist_mtl.engine")}
    assert not any(bad.values()), bad


def test_trainer_knows_only_the_backend_seam() -> None:
    deps = _graph()["dist_mtl.trainer"]
    assert not {d for d in deps if d.startswith("dist_mtl.engine")}, deps
    assert "dist_mtl.backend" in deps
    assert not deps & {"dist_mtl.train", "dist_mtl.cli"}


def test_balancers_are_pure_math() -> None:
    """Balancers import nothing of the project but themselves (and its error types)."""
    for module, deps in _graph().items():
        if module.startswith("dist_mtl.balancers"):
            outside = {d for d in deps if not d.startswith("dist_mtl.balancers") and d != "dist_mtl.errors"}
            assert not outside, (module, outside)
