"""The import graph between the project's packages, from ruff's own analysis (``ruff analyze graph``).

    python tests/import_graph.py          # package -> packages it imports, any cycle, private imports
    make imports                          # the same

``tests/test_architecture.py`` asserts on the same graph: no cycles between packages, the layers
of the house (``LAYERS``) only import downwards, nothing imports an entry point, and no private name
crosses a module boundary.
"""

from __future__ import annotations

import ast
import json
import subprocess
import sys
from collections import defaultdict
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
RUFF = Path(sys.executable).parent / "ruff"
ROOTS = ("monitor", "sampling", "detectors")

# From the bottom up: a package may import its own layer and the layers below, never above.
# Entry points and the composition root sit on top; the stages in the order an episode travels.
LAYERS: list[tuple[str, ...]] = [
    ("sampling", "detectors"),
    ("monitor.inference",),  # encoder backends (ONNX Runtime); signals/embeddings and reward use them
    (
        "monitor.__init__",
        "monitor.errors",
        "monitor.daemon",
        "monitor.fileio",
        "monitor.deadline_http",
        "monitor.pace",
        "monitor.config",
        "monitor.data",
        "monitor.signals",
    ),
    ("monitor.sources",),
    ("monitor.episodes",),
    ("monitor.metrics", "monitor.retry", "monitor.ops"),
    ("monitor.store", "monitor.perturb"),
    ("monitor.pipeline", "monitor.startup"),
    ("monitor.drift", "monitor.reward"),
    ("monitor.quality", "monitor.assist"),
    ("monitor.review", "monitor.actions", "monitor.ingest"),
    ("monitor.service",),
    ("monitor.simulate", "monitor.cli"),
]
ENTRY_POINTS = ("monitor.cli", "monitor.simulate")
# Whose private names (``_x``) no other module may import; the folders whose files are read for it.
# A test helper's own privates (``from outage_helpers import _x``) are the tests' business.
FIRST_PARTY = ("monitor", "sampling", "detectors", "bench")
SCANNED = ("monitor", "sampling", "detectors", "bench", "tests")


def package_of(path: str) -> str:
    """``monitor/review/app.py`` -> ``monitor.review``; ``monitor/config.py`` -> ``monitor.config``."""
    parts = Path(path).with_suffix("").parts
    if parts[0] == "monitor" and len(parts) > 1:
        return f"monitor.{parts[1]}"
    return parts[0]


def file_graph() -> dict[str, list[str]]:
    out = subprocess.run(
        [str(RUFF), "analyze", "graph", *ROOTS], cwd=REPO, capture_output=True, text=True, check=True
    ).stdout
    graph: dict[str, list[str]] = json.loads(out)
    return {f: deps for f, deps in graph.items() if "/migrations/" not in f}


def package_graph(files: dict[str, list[str]] | None = None) -> dict[str, set[str]]:
    edges: dict[str, set[str]] = defaultdict(set)
    for f, deps in (files if files is not None else file_graph()).items():
        a = package_of(f)
        edges.setdefault(a, set())
        for d in deps:
            b = package_of(d)
            if a != b:
                edges[a].add(b)
    return dict(edges)


def cycles(edges: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one package (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on: set[str] = set()
    found: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on.add(v)
        for w in sorted(edges.get(v, ())):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                found.append(sorted(comp))

    for v in sorted(edges):
        if v not in index:
            visit(v)
    return found


def layer_of(package: str) -> int:
    for i, layer in enumerate(LAYERS):
        if package in layer:
            return i
    raise KeyError(f"{package} is in no layer of tests/import_graph.py: place it")


def is_private(name: str) -> bool:
    return name.startswith("_") and not (name.startswith("__") and name.endswith("__"))


def private_names_imported(source: str, filename: str = "<source>") -> list[tuple[int, str, str]]:
    """``(line, module, name)`` of every ``from module import _name`` in ``source`` where the module
    is the project's (a relative import always is); other packages' privates are not counted."""
    found = []
    for node in ast.walk(ast.parse(source, filename=filename)):
        if not isinstance(node, ast.ImportFrom):
            continue
        module = "." * node.level + (node.module or "")
        if node.level == 0 and module.split(".")[0] not in FIRST_PARTY:
            continue
        found += [(node.lineno, module, alias.name) for alias in node.names if is_private(alias.name)]
    return found


def private_imports() -> list[str]:
    """``path:line: from module import _name`` for every file of ``SCANNED`` (migrations aside)."""
    out = []
    for root in SCANNED:
        for path in sorted((REPO / root).rglob("*.py")):
            if "migrations" in path.parts:
                continue
            rel = path.relative_to(REPO)
            for line, module, name in private_names_imported(path.read_text(encoding="utf-8"), str(rel)):
                out.append(f"{rel}:{line}: from {module} import {name}")
    return out


def main() -> int:
    edges = package_graph()
    for a in sorted(edges, key=lambda p: (layer_of(p), p)):
        print(f"{a} -> {', '.join(sorted(edges[a])) or '-'}")
    found = cycles(edges)
    for c in found:
        print("CYCLE:", " <-> ".join(c))
    private = private_imports()
    for line in private:
        print("PRIVATE NAME IMPORTED:", line)
    n_edges = sum(map(len, edges.values()))
    print(f"{len(edges)} packages, {n_edges} edges, {len(found)} cycles, {len(private)} private imports")
    return 1 if found or private else 0


if __name__ == "__main__":
    sys.exit(main())
