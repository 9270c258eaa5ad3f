"""No module of difflab imports another that imports it back, directly or through others.

The graph is read from the source with ``ast``: an edge for every ``import difflab...`` / ``from difflab... import``
(or relative import) at module level, not inside a function and not under ``if TYPE_CHECKING:``. A cycle there means
that which module loads first decides whether the other finds its names; the fix is to move the shared code down
into a module both can import, not to hide one import inside a function.
"""

from __future__ import annotations

import ast
from pathlib import Path

SRC = Path(__file__).resolve().parents[1] / "src"
PACKAGE = "difflab"


def module_name(path: Path) -> str:
    """``src/a/b.py`` -> ``difflab.a.b``; ``src/a/__init__.py`` -> ``difflab.a``."""
    parts = [PACKAGE, *path.relative_to(SRC).with_suffix("").parts]
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def difflab_modules() -> dict[str, Path]:
    """Every module of the package by dotted name (configs are data, not code)."""
    return {module_name(p): p for p in sorted(SRC.rglob("*.py")) if "configs" not in p.relative_to(SRC).parts}


def imported_modules(node: ast.Import | ast.ImportFrom, importer: str, is_package: bool, known: set[str]) -> set[str]:
    """The difflab modules one import statement loads (``from pkg import mod`` names the submodule)."""
    if isinstance(node, ast.Import):
        return {alias.name for alias in node.names if alias.name.split(".")[0] == PACKAGE}
    if node.level:
        base = importer.split(".") if is_package else importer.split(".")[:-1]
        base = base[: len(base) - (node.level - 1)]
        target = ".".join([*base, *([node.module] if node.module else [])])
    else:
        target = node.module or ""
    if target.split(".")[0] != PACKAGE:
        return set()
    named = {f"{target}.{alias.name}" for alias in node.names} & known
    return named or {target}


def is_type_checking(node: ast.AST) -> bool:
    return isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test)


def module_level_imports(
    tree: ast.Module, importer: str, is_package: bool, known: set[str], in_functions: bool = False
) -> set[str]:
    """What ``importer`` imports when it loads: imports outside functions and ``if TYPE_CHECKING:`` blocks (with
    ``in_functions``, also those inside functions: what it may import when called)."""
    found: set[str] = set()

    def visit(node: ast.AST) -> None:
        for child in ast.iter_child_nodes(node):
            if is_type_checking(child):
                continue
            if isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda)) and not in_functions:
                continue
            if isinstance(child, (ast.Import, ast.ImportFrom)):
                found.update(imported_modules(child, importer, is_package, known))
            visit(child)

    visit(tree)
    found.discard(importer)
    return found & known


def import_graph(in_functions: bool = False) -> dict[str, set[str]]:
    """``{module: modules it imports at module level}`` over the whole package (``in_functions``: inside its
    functions too)."""
    modules = difflab_modules()
    known = set(modules)
    return {
        name: module_level_imports(
            ast.parse(path.read_text(), str(path)), name, path.name == "__init__.py", known, in_functions
        )
        for name, path in modules.items()
    }


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One cycle ``[a, b, ..., a]`` of the graph, or None (iterative depth-first search)."""
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    for start in sorted(graph):
        if state.get(start):
            continue
        path, stack = [start], [iter(sorted(graph[start]))]
        state[start] = 1
        while stack:
            nxt = next(stack[-1], None)
            if nxt is None:
                state[path.pop()] = 2
                stack.pop()
            elif state.get(nxt) == 1:
                return path[path.index(nxt) :] + [nxt]
            elif not state.get(nxt):
                state[nxt] = 1
                path.append(nxt)
                stack.append(iter(sorted(graph[nxt])))
    return None


def test_the_checker_finds_a_cycle():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": set()}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set()}) is None


def test_function_and_type_checking_imports_are_not_edges():
    tree = ast.parse(
        "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    import difflab.b\n"
        "def f():\n    import difflab.c\nimport difflab.d\n"
    )
    assert module_level_imports(tree, "difflab.a", False, {"difflab.b", "difflab.c", "difflab.d"}) == {"difflab.d"}


def test_difflab_has_no_import_cycle():
    graph = import_graph()
    assert len(graph) > 50  # the whole package was read
    cycle = find_cycle(graph)
    assert cycle is None, "import cycle: " + " -> ".join(cycle)


def test_imports_inside_functions_close_no_cycle_either():
    """A function-local import is for a fast ``--help`` (torch and Lightning load when a command runs), never to dodge
    a cycle: with those imports counted as edges too, the package still has none."""
    cycle = find_cycle(import_graph(in_functions=True))
    assert cycle is None, "import cycle through a function-local import: " + " -> ".join(cycle)
