"""The tree is the architecture: import rules over nds/, checked statically (ast) on every file.

- nothing in nds/ imports prefect or flows (flows/ wires nds into Prefect, never the reverse);
- nds/formats (documents crossing client <-> server) never imports torch, not even lazily;
- nds/select never imports nds/client;
- nds/ has no import cycle among its module-level imports;
- no module in nds/ is over MAX_LINES lines.

Every import counts for the rules, lazy ones inside functions included, and so does
`importlib.import_module("name")` / `__import__("name")` with a literal name. The cycle check
reads module-level imports only (those run at import time; `if TYPE_CHECKING:` blocks do not).
See docs/architecture.md.
"""

from __future__ import annotations

import ast
import json
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
NDS = REPO / "nds"
MAX_LINES = 600

#: (importing package, forbidden import prefix, why): a module under the first may not import the second.
RULES = [
    ("nds", "prefect", "nds/ is importable without Prefect; orchestration lives in flows/"),
    ("nds", "flows", "flows/ imports nds, never the reverse"),
    ("nds.formats", "torch", "documents crossing client <-> server must not need torch"),
    ("nds.formats", "torchvision", "documents crossing client <-> server must not need torch"),
    ("nds.select", "nds.client", "selection runs on the server; the client package is the other side"),
]


@dataclass(frozen=True)
class Import:
    target: str  # absolute dotted name as written (relative imports resolved)
    names: tuple[str, ...]  # for `from target import a, b`: ("a", "b"); empty for `import target`
    line: int
    module_level: bool


def module_name(path: Path) -> str:
    parts = list(path.relative_to(REPO).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def nds_files() -> list[Path]:
    return sorted(p for p in NDS.rglob("*.py") if "__pycache__" not in p.parts)


def _is_type_checking(test: ast.expr) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING")


def _literal_import_call(node: ast.Call) -> str | None:
    """`importlib.import_module("x")`, `import_module("x")` or `__import__("x")` with a literal name."""
    fn = node.func
    name = fn.attr if isinstance(fn, ast.Attribute) else fn.id if isinstance(fn, ast.Name) else None
    if name in ("import_module", "__import__") and node.args and isinstance(node.args[0], ast.Constant) \
            and isinstance(node.args[0].value, str) and not node.args[0].value.startswith("."):
        return node.args[0].value
    return None


def imports_of(path: Path) -> list[Import]:
    """Every import in `path`, marked module-level or not (function bodies, TYPE_CHECKING blocks)."""
    tree = ast.parse(path.read_text(), filename=str(path))
    me = module_name(path)
    package = me if path.name == "__init__.py" else me.rpartition(".")[0]
    found: list[Import] = []

    def resolve(node: ast.ImportFrom) -> str:
        if not node.level:
            return node.module or ""
        base = package.split(".")
        if node.level > 1:
            base = base[: len(base) - (node.level - 1)]
        return ".".join(base + ([node.module] if node.module else []))

    def visit(node: ast.AST, module_level: bool) -> None:
        if isinstance(node, ast.Import):
            found.extend(Import(a.name, (), node.lineno, module_level) for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            found.append(Import(resolve(node), tuple(a.name for a in node.names), node.lineno, module_level))
        elif isinstance(node, ast.Call) and (target := _literal_import_call(node)):
            found.append(Import(target, (), node.lineno, False))
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda)):
            module_level = False
        for field, value in ast.iter_fields(node):
            children = value if isinstance(value, list) else [value]
            for child in children:
                if not isinstance(child, ast.AST):
                    continue
                # `if TYPE_CHECKING:` bodies never run; their `else:` does.
                lazy = isinstance(node, ast.If) and field == "body" and _is_type_checking(node.test)
                visit(child, module_level and not lazy)

    visit(tree, True)
    return found


def _under(name: str, prefix: str) -> bool:
    return name == prefix or name.startswith(prefix + ".")


def imported_names(imp: Import) -> list[str]:
    """The dotted names an import may load: `from a import b` loads `a` and maybe submodule `a.b`."""
    return [imp.target] + [f"{imp.target}.{n}" for n in imp.names if n != "*"]


def test_nds_files_exist():
    assert len(nds_files()) > 10


@pytest.mark.parametrize("package,forbidden,why", RULES, ids=[f"{p}-!{f}" for p, f, _ in RULES])
def test_import_rule(package, forbidden, why):
    bad = []
    for path in nds_files():
        if not _under(module_name(path), package):
            continue
        for imp in imports_of(path):
            if any(_under(name, forbidden) for name in imported_names(imp)):
                bad.append(f"{path.relative_to(REPO)}:{imp.line} imports {imp.target}"
                           + (f" ({', '.join(imp.names)})" if imp.names else ""))
    assert not bad, f"{package} must not import {forbidden} ({why}):\n  " + "\n  ".join(bad)


def module_graph() -> dict[str, set[str]]:
    """nds module -> the nds modules its module-level imports need (the most specific that exists).

    `from a import b` needs submodule `a.b` if there is one, else module `a` (b is a name in it);
    the parent packages that any import initialises are not edges (Python copes with a
    half-initialised parent, as long as nothing is taken from it).
    """
    modules = {module_name(p): p for p in nds_files()}
    graph: dict[str, set[str]] = {m: set() for m in modules}
    for me, path in modules.items():
        for imp in imports_of(path):
            if not imp.module_level:
                continue
            needs = {f"{imp.target}.{n}" if f"{imp.target}.{n}" in modules else imp.target for n in imp.names} \
                or {imp.target}
            graph[me] |= {n for n in needs if n in modules and n != me}
    return graph


def find_cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan), each as one example cycle."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    components: list[list[str]] = []
    counter = 0

    def connect(v: str) -> None:  # recursion depth is bounded by the number of nds modules
        nonlocal counter
        index[v] = low[v] = counter
        counter += 1
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph[v]):
            if w not in index:
                connect(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                components.append(sorted(comp))

    for v in sorted(graph):
        if v not in index:
            connect(v)
    return [_example_cycle(graph, comp) for comp in components]


def _example_cycle(graph: dict[str, set[str]], comp: list[str]) -> list[str]:
    """One concrete cycle a -> b -> ... -> a inside a strongly connected component (BFS back to a)."""
    start, members = comp[0], set(comp)
    prev: dict[str, str] = {}
    frontier = [start]
    while frontier:
        nxt = []
        for v in frontier:
            for w in sorted(graph[v] & members):
                if w == start:
                    path = [v]
                    while path[-1] != start:
                        path.append(prev[path[-1]])
                    return path[::-1] + [start]
                if w not in prev:
                    prev[w] = v
                    nxt.append(w)
        frontier = nxt
    return comp  # pragma: no cover - a component always has a cycle


def test_no_import_cycles():
    cycles = find_cycles(module_graph())
    assert not cycles, "import cycles among module-level imports in nds/:\n  " + "\n  ".join(
        " -> ".join(c) for c in cycles)


def test_no_module_is_too_long():
    long = {str(p.relative_to(REPO)): n for p in nds_files() if (n := len(p.read_text().splitlines())) > MAX_LINES}
    assert not long, f"modules over {MAX_LINES} lines (split them by responsibility): {long}"


def test_formats_import_without_torch():
    """At run time too: importing every nds.formats module loads neither torch nor prefect."""
    names = sorted(module_name(p) for p in nds_files() if _under(module_name(p), "nds.formats"))
    code = (f"import importlib, json, sys\nfor n in {names!r}: importlib.import_module(n)\n"
            "print(json.dumps(sorted(m for m in sys.modules if m.split('.')[0] in ('torch', 'prefect', 'flows'))))")
    r = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr[-2000:]
    assert json.loads(r.stdout.strip().splitlines()[-1]) == []


# ---------------------------------------------------------------- the checker checks itself


def _write(root: Path, rel: str, text: str) -> Path:
    path = root / rel
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return path


def test_checker_sees_lazy_relative_and_literal_imports(tmp_path, monkeypatch):
    monkeypatch.setattr(sys.modules[__name__], "REPO", tmp_path)
    f = _write(tmp_path, "nds/select/x.py", (
        "from typing import TYPE_CHECKING\n"
        "from ..client import fetch\n"
        "from . import y\n"
        "if TYPE_CHECKING:\n    import torch\n"
        "def f():\n    import prefect\n    importlib.import_module('flows.cli')\n"
    ))
    got = {(i.target, i.names, i.module_level) for i in imports_of(f)}
    assert ("nds.client", ("fetch",), True) in got
    assert ("nds.select", ("y",), True) in got
    assert ("torch", (), False) in got
    assert ("prefect", (), False) in got and ("flows.cli", (), False) in got


def test_graph_edges_go_to_the_most_specific_module(tmp_path, monkeypatch):
    monkeypatch.setattr(sys.modules[__name__], "REPO", tmp_path)
    monkeypatch.setattr(sys.modules[__name__], "NDS", tmp_path / "nds")
    _write(tmp_path, "nds/__init__.py", "")
    _write(tmp_path, "nds/pkg/__init__.py", "from nds.pkg import impl  # registers\n")
    _write(tmp_path, "nds/pkg/impl.py", "from nds.pkg import helper\n")  # a submodule: no cycle
    _write(tmp_path, "nds/pkg/helper.py", "def lazy():\n    from nds.pkg import impl\n")
    _write(tmp_path, "nds/other.py", "from nds.pkg import CONSTANT\n")
    graph = module_graph()
    assert graph["nds.pkg"] == {"nds.pkg.impl"} and graph["nds.pkg.impl"] == {"nds.pkg.helper"}
    assert graph["nds.pkg.helper"] == set() and graph["nds.other"] == {"nds.pkg"}
    assert find_cycles(graph) == []
    _write(tmp_path, "nds/pkg/helper.py", "from nds.pkg import CONSTANT\n")  # a name of the package: a cycle
    assert find_cycles(module_graph()) == [["nds.pkg", "nds.pkg.impl", "nds.pkg.helper", "nds.pkg"]]


def test_checker_finds_a_cycle():
    graph = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}, "e": set()}
    assert find_cycles(graph) == [["a", "b", "c", "a"]]
    assert find_cycles({"a": {"b"}, "b": set()}) == []
