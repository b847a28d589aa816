"""The suite's modules import each other without cycles, and every relative import names one of them: every
import, at module level or inside a function, read from the source."""

from __future__ import annotations

import ast
from pathlib import Path

import coap_bench

PACKAGE = Path(coap_bench.__file__).resolve().parent


def _modules() -> dict[str, tuple[Path, bool]]:
    """Module name -> (file, whether it is a package's ``__init__``)."""
    found = {}
    for path in PACKAGE.rglob("*.py"):
        parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
        is_package = parts[-1] == "__init__"
        found[".".join(parts[:-1] if is_package else parts)] = (path, is_package)
    return found


def _relative_bases(name: str, path: Path, is_package: bool) -> list[tuple[ast.ImportFrom, str]]:
    """Every ``from X import ...`` of module ``name``, with the absolute name of ``X``."""
    found = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom):
            if node.level:
                package = name.split(".") if is_package else name.split(".")[:-1]
                base = ".".join(package[: len(package) - node.level + 1] + ([node.module] if node.module else []))
            else:
                base = node.module or ""
            found.append((node, base))
    return found


def _imports(name: str, path: Path, is_package: bool, modules: dict) -> set[str]:
    """The modules of the suite that ``name`` imports (``from . import x`` imports the module ``x``)."""
    targets = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            targets.update(alias.name for alias in node.names if alias.name in modules)
    for node, base in _relative_bases(name, path, is_package):
        if node.module is not None and base in modules:
            targets.add(base)
        targets.update(f"{base}.{alias.name}" for alias in node.names if f"{base}.{alias.name}" in modules)
    return targets - {name}


def _cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import cycle of ``graph``, or ``None``."""
    state: dict[str, str] = {}
    path: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = "open"
        path.append(node)
        for target in sorted(graph[node]):
            if state.get(target) == "open":
                return path[path.index(target) :] + [target]
            if target not in state and (found := visit(target)):
                return found
        state[node] = "done"
        path.pop()
        return None

    return next((found for node in sorted(graph) if node not in state and (found := visit(node))), None)


def test_the_checker_finds_a_cycle():
    assert _cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert _cycle({"a": {"b"}, "b": set()}) is None


def test_no_module_of_the_suite_imports_itself_back():
    modules = _modules()
    graph = {name: _imports(name, path, is_package, modules) for name, (path, is_package) in modules.items()}
    assert graph.get("coap_bench.cli")  # the command line imports its commands
    assert _cycle(graph) is None


def test_every_relative_import_names_a_module_of_the_suite():
    modules = _modules()
    unresolved = [
        f"{name}:{node.lineno}: {base}"
        for name, (path, is_package) in modules.items()
        for node, base in _relative_bases(name, path, is_package)
        if node.level and base not in modules and not all(f"{base}.{a.name}" in modules for a in node.names)
    ]
    assert unresolved == []
