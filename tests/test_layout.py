"""The house rules of the code's layout (issue 15), checked over the source, not by importing it.

* No import cycle among anywhere's modules, not even one under `if TYPE_CHECKING:` or inside a
  function: every `import` and `from ... import` of the package is an edge, and the graph must
  have no cycle (a module's own parent packages excepted: Python runs them first anyway).
* The faces of the server (its API routes and metrics) see the daemon only through the
  Protocols they declare: they import nothing that imports the daemon's core.
* The role packages stay readable: no module over 500 lines, no class over 320, no function
  over 60 (DESIGN.md: "a class that holds a whole role" is what the packages replaced).

Run: `python -m pytest tests/test_layout.py -q` (prints the cycle, or the module too large).
"""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PACKAGE = ROOT / "anywhere"
ROLE_PACKAGES = ("server", "agent")


def module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def modules() -> dict[str, Path]:
    return {module_name(p): p for p in PACKAGE.rglob("*.py")}


def imports(name: str, path: Path, known: set[str]) -> set[str]:
    """The anywhere modules `name` imports, wherever the import statement is."""
    is_package = path.name == "__init__.py"
    here = name if is_package else name.rpartition(".")[0]
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = here.split(".")
                base = base[:len(base) - (node.level - 1)]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            found.add(target)
            found.update(f"{target}.{alias.name}" for alias in node.names)
    edges = {m for m in found if m in known}
    ancestors = {".".join(name.split(".")[:i]) for i in range(1, name.count(".") + 1)}
    return edges - ancestors - {name}


def graph() -> dict[str, set[str]]:
    found = modules()
    known = set(found)
    return {name: imports(name, path, known) for name, path in found.items()}


def find_cycle(edges: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    stack: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        stack.append(node)
        for nxt in sorted(edges.get(node, ())):
            if state.get(nxt) == 1:
                return stack[stack.index(nxt):] + [nxt]
            if nxt not in state:
                cycle = visit(nxt)
                if cycle:
                    return cycle
        stack.pop()
        state[node] = 2
        return None

    for node in sorted(edges):
        if node not in state:
            cycle = visit(node)
            if cycle:
                return cycle
    return None


def reachable(edges: dict[str, set[str]], start: str) -> set[str]:
    seen, todo = set(), [start]
    while todo:
        node = todo.pop()
        for nxt in edges.get(node, ()):
            if nxt not in seen:
                seen.add(nxt)
                todo.append(nxt)
    return seen


def test_the_checker_finds_a_cycle_and_a_type_checking_import(tmp_path):
    """The checker itself: a cycle hidden under TYPE_CHECKING is found."""
    a = tmp_path / "a.py"
    a.write_text("from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from .b import B\n")
    b = tmp_path / "b.py"
    b.write_text("def f():\n    from . import a\n")
    known = {"pkg.a", "pkg.b"}
    edges = {"pkg.a": imports("pkg.a", a, known), "pkg.b": imports("pkg.b", b, known)}
    assert find_cycle(edges) == ["pkg.a", "pkg.b", "pkg.a"]


def test_no_import_cycle():
    edges = graph()
    assert "anywhere.server.core" in edges and "anywhere.trunk" in edges
    cycle = find_cycle(edges)
    assert cycle is None, "import cycle: " + " -> ".join(cycle or [])


def test_the_faces_do_not_import_the_daemon():
    edges = graph()
    for face in ("anywhere.server.api", "anywhere.server.metrics", "anywhere.server.views"):
        assert "anywhere.server.core" not in reachable(edges, face), face
    for flat in ("anywhere.config", "anywhere.state", "anywhere.trunk", "anywhere.relay", "anywhere.admin"):
        assert not any(m.startswith(("anywhere.server", "anywhere.agent")) for m in reachable(edges, flat)), flat


def test_role_packages_are_readable():
    too_big = []
    for role in ROLE_PACKAGES:
        for path in sorted((PACKAGE / role).glob("*.py")):
            text = path.read_text(encoding="utf-8")
            lines = text.count("\n")
            if lines > 500:
                too_big.append(f"{path.relative_to(ROOT)}: {lines} lines")
            for node in ast.walk(ast.parse(text)):
                if not isinstance(node, (ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
                    continue
                size = (node.end_lineno or node.lineno) - node.lineno + 1
                if isinstance(node, ast.ClassDef) and size > 320:
                    too_big.append(f"{path.relative_to(ROOT)}: class {node.name}: {size} lines")
                elif isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and size > 60:
                    too_big.append(f"{path.relative_to(ROOT)}: {node.name}(): {size} lines")
    assert not too_big, too_big
