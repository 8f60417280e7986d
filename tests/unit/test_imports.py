"""The import graph of ``stage1_core``: no cycle between its modules, and no Dagster anywhere.

Module-level imports are read from the source (``ast``), including imports of a package's
``__init__`` that importing a submodule runs; imports inside functions and under
``if TYPE_CHECKING:`` are left out (they run later, or never). A cycle is reported with its path.
"""

from __future__ import annotations

import ast
from pathlib import Path

import stage1_core

PACKAGE = Path(stage1_core.__file__).parent
ROOT = "stage1_core"


def module_names() -> dict[str, Path]:
    names = {}
    for path in PACKAGE.rglob("*.py"):
        parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        names[".".join(parts)] = path
    return names


def _resolve(module: str, path: Path, node: ast.ImportFrom) -> str:
    if not node.level:
        return node.module or ""
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    for _ in range(node.level - 1):
        package = package.rpartition(".")[0]
    return f"{package}.{node.module}" if node.module else package


def _is_type_checking(node: ast.If) -> bool:
    test = node.test
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING")


def top_level_imports(module: str, path: Path, known: set[str]) -> set[str]:
    """Modules of ``known`` that ``module`` imports when it is imported."""
    found: set[str] = set()

    def add(name: str) -> None:
        while name and name not in known:  # "stage1_core.policies.POLICIES" -> "stage1_core.policies"
            name = name.rpartition(".")[0]
        if name and name != module:
            found.add(name)
            parent = name.rpartition(".")[0]
            while parent.startswith(ROOT):  # importing a submodule runs its packages first
                if parent != module and not module.startswith(parent + "."):
                    found.add(parent)
                parent = parent.rpartition(".")[0]

    def visit(body: list[ast.stmt]) -> None:
        for node in body:
            if isinstance(node, ast.Import):
                for alias in node.names:
                    if alias.name.startswith(ROOT):
                        add(alias.name)
            elif isinstance(node, ast.ImportFrom):
                base = _resolve(module, path, node)
                if base.startswith(ROOT):
                    add(base)
                    for alias in node.names:
                        if f"{base}.{alias.name}" in known:
                            add(f"{base}.{alias.name}")
            elif isinstance(node, ast.If) and not _is_type_checking(node):
                visit(node.body)
                visit(node.orelse)
            elif isinstance(node, ast.Try):
                visit(node.body)

    visit(ast.parse(path.read_text()).body)
    return found


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One cycle of ``graph`` as a path ``[a, b, ..., a]``, or None."""
    state: dict[str, int] = {}
    stack: list[str] = []

    def dfs(node: str) -> list[str] | None:
        state[node] = 1
        stack.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                return stack[stack.index(nxt):] + [nxt]
            if nxt not in state:
                cycle = dfs(nxt)
                if cycle:
                    return cycle
        stack.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state:
            cycle = dfs(node)
            if cycle:
                return cycle
    return None


def import_graph() -> dict[str, set[str]]:
    names = module_names()
    return {module: top_level_imports(module, path, set(names)) for module, path in names.items()}


def test_stage1_core_has_no_import_cycle():
    cycle = find_cycle(import_graph())
    assert cycle is None, "import cycle: " + " -> ".join(cycle)


def test_the_cycle_finder_finds_a_cycle():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": set()}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set()}) is None


def test_stage1_core_never_imports_dagster():
    for path in PACKAGE.rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            names = ([a.name for a in node.names] if isinstance(node, ast.Import)
                     else [node.module or ""] if isinstance(node, ast.ImportFrom) else [])
            assert not any(n == "dagster" or n.startswith(("dagster.", "dagster_")) for n in names), \
                f"{path.relative_to(PACKAGE.parent)} imports {names}"
