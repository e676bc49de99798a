"""The shape of the code base: no import circle among vkd_ds's modules, no module past MAX_LINES, `train()`
a short sequence of builders. Read from the source (every import statement, at module level or inside a
function or `if TYPE_CHECKING:`, and every "vkd_ds.x" module named in a string), not from what Python
happens to import first."""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parent.parent / "vkd_ds"
MAX_LINES = 450
MAX_TRAIN_LINES = 80


def _modules(package: Path) -> dict[str, Path]:
    modules = {}
    for path in package.rglob("*.py"):
        parts = path.relative_to(package.parent).with_suffix("").parts
        name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        modules[name] = path
    return modules


def _owner(name: str, modules: dict[str, Path]) -> str | None:
    """The module a dotted name lives in (`vkd_ds.losses.Divergence` -> `vkd_ds.losses`)."""
    while name and name not in modules:
        name = name.rpartition(".")[0]
    return name or None


def import_graph(package: Path = PACKAGE) -> dict[str, set[str]]:
    """module -> the package's modules it imports (a package's own `__init__` counts as the package)."""
    top = package.name
    modules = _modules(package)
    graph = {}
    for name, path in modules.items():
        here = name if path.name == "__init__.py" else name.rpartition(".")[0]
        named = set()
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                named.update(alias.name for alias in node.names)
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    parents = here.split(".")[: len(here.split(".")) - node.level + 1]
                    base = ".".join([*parents, base] if base else parents)
                # `from vkd_ds import dist` imports the module vkd_ds.dist; `from vkd_ds.x import f`, vkd_ds.x
                named.update(
                    f"{base}.{alias.name}" if f"{base}.{alias.name}" in modules else base for alias in node.names
                )
            elif isinstance(node, ast.Constant) and isinstance(node.value, str) and node.value.startswith(f"{top}."):
                if " " not in node.value:  # importlib.import_module("vkd_ds.x"), "vkd_ds.x:attr"
                    named.add(node.value.split(":")[0])
        owners = {_owner(n, modules) for n in named if n.split(".")[0] == top}
        graph[name] = {o for o in owners if o and o not in (name, top)}
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components of more than one module (Tarjan), each sorted."""
    index, low, stack, on_stack, found = {}, {}, [], set(), []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in graph.get(v, ()):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return found


def test_no_import_circle():
    graph = import_graph()
    assert "vkd_ds.train" in graph and "vkd_ds.dist" in graph["vkd_ds.train"]  # the reader reads
    loops = cycles(graph)
    detail = [" ".join(f"{m}->{sorted(graph[m] & set(loop))}" for m in loop) for loop in loops]
    assert not loops, "import circles:\n" + "\n".join(detail)


def test_the_reader_finds_circles_through_lazy_typing_and_string_imports(tmp_path):
    package = tmp_path / "pkg"
    (package / "sub").mkdir(parents=True)
    (package / "__init__.py").write_text("")
    (package / "a.py").write_text("def f():\n    from pkg.sub import b\n")
    (package / "sub" / "__init__.py").write_text("from pkg.sub.b import g\n")
    (package / "sub" / "b.py").write_text(
        "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from pkg import c\n"
    )
    (package / "c.py").write_text('import importlib\nM = importlib.import_module("pkg.a")\n')
    (package / "d.py").write_text("from . import a\nfrom .sub.b import g\n")
    graph = import_graph(package)
    assert graph["pkg.d"] == {"pkg.a", "pkg.sub.b"} and graph["pkg.sub"] == {"pkg.sub.b"}
    assert cycles(graph) == [["pkg.a", "pkg.c", "pkg.sub.b"]]  # pkg.sub -> pkg.sub.b only: outside the loop
    (package / "c.py").write_text("")
    assert cycles(import_graph(package)) == []


def test_no_module_past_the_limit():
    long = {
        str(p.relative_to(PACKAGE.parent)): n
        for p in PACKAGE.rglob("*.py")
        if (n := len(p.read_text().splitlines())) > MAX_LINES
    }
    assert not long, f"modules over {MAX_LINES} lines (split them by what they hold): {long}"


def test_train_is_a_short_sequence_of_builders():
    source = (PACKAGE / "train.py").read_text()
    train = next(n for n in ast.parse(source).body if isinstance(n, ast.FunctionDef) and n.name == "train")
    assert train.end_lineno - train.lineno + 1 < MAX_TRAIN_LINES


def test_no_module_imports_another_modules_private_names():
    """A name one module leaves private (`_x`) is not another's to use: what a sibling needs is public."""
    borrowed = []
    for path in PACKAGE.rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("vkd_ds"):
                borrowed += [f"{path.relative_to(PACKAGE)}: {a.name}" for a in node.names if a.name.startswith("_")]
    assert not borrowed, borrowed
