"""Imports flow one way between lkserve's packages: no cycles, nothing below the trainer imports it, and vLLM is
imported only behind the engine's vLLM boundary. Read from the source with ast (imports inside functions count
too), so a lazy import cannot hide an edge."""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
# (importer, imported): the trainer sits on top of these packages.
FORBIDDEN = {(p, "trainer") for p in ("gateway", "engine", "models", "capture", "losses", "metrics")}
VLLM_BOUNDARY = "lkserve/engine/vllm/"


def _unit(pkg: Path, path: Path) -> str:
    """Top-level unit of a file: `lkserve/gateway/app.py` -> "gateway", `lkserve/config.py` -> "config"."""
    first = path.relative_to(pkg).parts[0]
    return pkg.name if first == "__init__.py" else first.removesuffix(".py")


def _imported(path: Path, pkg_name: str, node: ast.AST) -> list[str]:
    """Absolute module names one import statement may load (relative imports resolved against `path`):
    `from a import b` counts as both `a` and `a.b`, since b may be a module."""
    if isinstance(node, ast.Import):
        return [a.name for a in node.names]
    if not isinstance(node, ast.ImportFrom):
        return []
    if node.level == 0:
        module = node.module
    else:
        parts = list(path.with_suffix("").parts)
        parts = parts[len(parts) - 1 - parts[::-1].index(pkg_name):]  # [pkg, sub, ..., module]
        module = ".".join(parts[:len(parts) - node.level] + ([node.module] if node.module else []))
    return [module] + [f"{module}.{a.name}" for a in node.names]


def import_graph(pkg: Path) -> tuple[dict[str, set[str]], dict[str, set[str]]]:
    """(edges between the package's top-level units, {top-level name outside the package: files importing it})."""
    edges: dict[str, set[str]] = {}
    external: dict[str, set[str]] = {}
    for f in sorted(pkg.rglob("*.py")):
        src = _unit(pkg, f)
        for node in ast.walk(ast.parse(f.read_text(encoding="utf-8"))):
            for name in _imported(f, pkg.name, node):
                head, _, rest = name.partition(".")
                if head != pkg.name:
                    external.setdefault(head, set()).add(f.relative_to(pkg.parent).as_posix())
                elif rest:
                    dst = rest.split(".")[0]
                    if dst != src:
                        edges.setdefault(src, set()).add(dst)
    return edges, external


def cycles(edges: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one unit (Tarjan), each sorted: every import cycle lies in one."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    out: list[list[str]] = []

    def visit(u: str) -> None:
        index[u] = low[u] = len(index)
        stack.append(u)
        on_stack.add(u)
        for v in sorted(edges.get(u, ())):
            if v not in index:
                visit(v)
                low[u] = min(low[u], low[v])
            elif v in on_stack:
                low[u] = min(low[u], index[v])
        if low[u] == index[u]:
            comp = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                comp.append(w)
                if w == u:
                    break
            if len(comp) > 1:
                out.append(sorted(comp))

    for u in sorted(set(edges) | {v for vs in edges.values() for v in vs}):
        if u not in index:
            visit(u)
    return sorted(out)


def forbidden_edges(edges: dict[str, set[str]]) -> list[tuple[str, str]]:
    return sorted((a, b) for a, bs in edges.items() for b in bs if (a, b) in FORBIDDEN)


# ------------------------------------------------------------------------------------------------ lkserve itself
def test_no_import_cycles_between_packages():
    edges, _ = import_graph(ROOT / "lkserve")
    found = cycles(edges)
    assert not found, f"import cycles between packages: {found}; edges: {dict(sorted(edges.items()))}"


def test_nothing_below_the_trainer_imports_it():
    edges, _ = import_graph(ROOT / "lkserve")
    bad = forbidden_edges(edges)
    assert not bad, f"packages below the trainer import it: {bad}"


def test_vllm_is_imported_only_behind_the_engine_boundary():
    _, external = import_graph(ROOT / "lkserve")
    stray = sorted(f for f in external.get("vllm", ()) if not f.startswith(VLLM_BOUNDARY))
    assert not stray, f"vllm imported outside {VLLM_BOUNDARY}: {stray}"


# ------------------------------------------------------------------------------------------------ the checker
def _package(root: Path, files: dict[str, str]) -> Path:
    for rel, src in files.items():
        path = root / "pkg" / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(src)
    return root / "pkg"


def test_graph_sees_function_level_and_relative_imports(tmp_path):
    pkg = _package(tmp_path, {
        "__init__.py": "",
        "config.py": "",
        "a/__init__.py": "from pkg.config import X\n",
        "a/m.py": "def f():\n    from ..b import y\n    import pkg.c.deep\n    import vllm.sampling\n",
        "b.py": "from . import config\nimport os\n",
        "c/deep.py": "from .. import b\n",
    })
    edges, external = import_graph(pkg)
    assert edges == {"a": {"config", "b", "c"}, "b": {"config"}, "c": {"b"}}
    assert external == {"vllm": {"pkg/a/m.py"}, "os": {"pkg/b.py"}}
    assert cycles(edges) == []


def test_cycles_and_forbidden_edges_are_found(tmp_path):
    clean = _package(tmp_path / "clean", {
        "trainer/__init__.py": "from pkg.engine import run\nfrom pkg.models import m\n",
        "engine/__init__.py": "from pkg.models import m\n",
        "models/__init__.py": "",
    })
    edges, _ = import_graph(clean)
    assert cycles(edges) == [] and forbidden_edges(edges) == []

    dirty = _package(tmp_path / "dirty", {
        "trainer/__init__.py": "from pkg.engine import run\n",
        "engine/__init__.py": "from pkg.models import m\n",
        "models/__init__.py": "def f():\n    from pkg.trainer import t\n",  # a lazy import still closes the loop
        "gateway/__init__.py": "from pkg.capture import c\n",
        "capture/__init__.py": "from pkg.gateway import g\n",
    })
    edges, _ = import_graph(dirty)
    assert cycles(edges) == [["capture", "gateway"], ["engine", "models", "trainer"]]
    assert forbidden_edges(edges) == [("models", "trainer")]
