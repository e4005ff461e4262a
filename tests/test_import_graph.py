"""The package's imports form no cycle: every ``import`` in every module (function bodies included, type-checking
blocks left out), and the package ``__init__`` each one runs on the way."""

import ast
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
# how the source folders install
PACKAGES = {name: ROOT / folder for name, folder in
            tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["package-dir"].items()}


def modules() -> dict[str, Path]:
    found = {}
    for name, folder in PACKAGES.items():
        for path in folder.rglob("*.py"):
            parts = list(path.relative_to(folder).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts.pop()
            found[".".join([name, *parts])] = path
    return found


def is_type_checking(node: ast.If) -> bool:
    return isinstance(node.test, ast.Name) and node.test.id == "TYPE_CHECKING"


def imported(tree: ast.AST, module: str, is_package: bool, known: set[str]) -> set[str]:
    """Modules ``module`` imports, with the packages whose ``__init__`` that runs (but not its own parents, which
    are initialised before it)."""
    out = set()

    def visit(node: ast.AST) -> None:
        if isinstance(node, ast.If) and is_type_checking(node):
            return
        if isinstance(node, ast.Import):
            out.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = module.split(".") if is_package else module.split(".")[:-1]
                base = ".".join(anchor[:len(anchor) - node.level + 1] + ([base] if base else []))
            out.add(base)
            out.update(f"{base}.{alias.name}" for alias in node.names if f"{base}.{alias.name}" in known)
        for child in ast.iter_child_nodes(node):
            visit(child)

    visit(tree)
    own_parents = {".".join(module.split(".")[:i]) for i in range(1, module.count(".") + 1)}
    if is_package:
        own_parents.add(module)
    edges = set()
    for name in out:
        parts = name.split(".")
        for i in range(1, len(parts) + 1):
            prefix = ".".join(parts[:i])
            if prefix in known and prefix not in own_parents:
                edges.add(prefix)
    return edges - {module}


def import_graph() -> dict[str, set[str]]:
    found = modules()
    known = set(found)
    return {name: imported(ast.parse(path.read_text()), name, path.name == "__init__.py", known)
            for name, path in found.items()}


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, int] = {}
    stack: list[str] = []

    def walk(node: str) -> list[str] | None:
        state[node] = 1
        stack.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                return stack[stack.index(nxt):] + [nxt]
            if nxt not in state and (cycle := walk(nxt)):
                return cycle
        stack.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state and (cycle := walk(node)):
            return cycle
    return None


def test_the_package_has_no_import_cycle():
    cycle = find_cycle(import_graph())
    assert cycle is None, "import cycle: " + " -> ".join(cycle)


def test_the_cycle_finder_finds_a_cycle_through_a_function_body_and_a_package_init():
    known = {"p", "p.a", "p.b", "q", "q.c"}
    a = imported(ast.parse("def f():\n    from p.b import g\n"), "p.a", False, known)
    b = imported(ast.parse("from q.c import h\n"), "p.b", False, known)
    q = imported(ast.parse("from p.a import x\n"), "q", True, known)
    assert a == {"p.b"} and b == {"q", "q.c"} and q == {"p", "p.a"}
    assert find_cycle({"p.a": a, "p.b": b, "q": q, "q.c": set()}) == ["p.a", "p.b", "q", "p.a"]
    typed = imported(ast.parse("from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from p.b import g\n"),
                     "p.a", False, known)
    assert typed == set()
