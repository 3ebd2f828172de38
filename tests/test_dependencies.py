"""Every third-party module the service imports is brought by a plain ``pip install oversight-monitor``
(its dependencies and theirs), except the optional ones behind an extra. httpx was only a dev
dependency: the remote reward-model kinds and ``oversight simulate`` failed to import in a plain
install and in the image, while every test passed in the dev environment."""

from __future__ import annotations

import ast
import contextlib
import importlib.metadata as md
import re
import sys
import tomllib
from pathlib import Path

from packaging.requirements import Requirement

REPO = Path(__file__).resolve().parents[1]
# Imported only where their extra is in use, each behind an ImportError with a message.
OPTIONAL = {
    "alibi_detect": "alibi",
    "kubernetes": "k8s",
    "urllib3": "k8s (the Kubernetes client's transport)",
    "peft": "lora",
    "onnx": "dev (a fallback exists)",
}


def _imports() -> set[str]:
    out: set[str] = set()
    for package in ("monitor", "detectors", "sampling"):
        for path in (REPO / package).rglob("*.py"):
            for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
                if isinstance(node, ast.Import):
                    out |= {a.name.split(".")[0] for a in node.names}
                elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                    out.add(node.module.split(".")[0])
    return {m for m in out if m not in sys.stdlib_module_names and m not in ("monitor", "detectors", "sampling")}


def _norm(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def _default_closure() -> set[str]:
    """The distributions a plain install brings: the default dependencies and, recursively, theirs
    (markers evaluated without extras)."""
    project = tomllib.loads((REPO / "pyproject.toml").read_text(encoding="utf-8"))["project"]
    todo = [Requirement(r) for r in project["dependencies"]]
    seen: set[str] = set()
    while todo:
        req = todo.pop()
        if req.marker is not None and not req.marker.evaluate({"extra": ""}):
            continue
        name = _norm(req.name)
        if name in seen:
            continue
        seen.add(name)
        with contextlib.suppress(md.PackageNotFoundError):  # a dependency for another platform
            todo.extend(Requirement(r) for r in md.requires(req.name) or [])
    return seen


def test_every_imported_module_comes_with_a_plain_install() -> None:
    closure = _default_closure()
    owners = md.packages_distributions()
    missing = {
        module: owners.get(module)
        for module in _imports()
        if module not in OPTIONAL and not any(_norm(d) in closure for d in owners.get(module, []))
    }
    assert not missing, f"imported but not brought by the default dependencies: {missing}"
