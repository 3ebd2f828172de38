"""The shape of the house, asserted on the import graph that ``tests/import_graph.py`` reads from
ruff's own analysis (``make imports`` prints it): no cycle between packages, each package imports
only its own layer of ``LAYERS`` or a lower one, nothing imports an entry point, the pure packages
import nothing of the project's, and no module imports another's private name."""

from __future__ import annotations

import pytest
from import_graph import (
    ENTRY_POINTS,
    LAYERS,
    cycles,
    layer_of,
    package_graph,
    private_imports,
    private_names_imported,
)

PURE = ("sampling", "detectors")


@pytest.fixture(scope="module")
def edges() -> dict[str, set[str]]:
    return package_graph()


def test_the_graph_holds_every_package(edges: dict[str, set[str]]) -> None:
    # A guard on the reading itself: an empty or partial graph would pass everything below.
    assert {"sampling", "detectors", "monitor.pipeline", "monitor.store", "monitor.cli"} <= set(edges)
    assert "monitor.store" in edges["monitor.pipeline"]


def test_no_import_cycle_between_packages(edges: dict[str, set[str]]) -> None:
    assert cycles(edges) == []


def test_every_package_has_a_layer(edges: dict[str, set[str]]) -> None:
    placed = {p for layer in LAYERS for p in layer}
    seen = set(edges) | {b for deps in edges.values() for b in deps}
    assert sorted(seen - placed) == [], "place the new package in LAYERS (tests/import_graph.py)"


def test_packages_import_only_their_layer_or_lower(edges: dict[str, set[str]]) -> None:
    upward = sorted(f"{a} -> {b}" for a, deps in edges.items() for b in deps if layer_of(b) > layer_of(a))
    assert upward == []


def test_nothing_imports_an_entry_point(edges: dict[str, set[str]]) -> None:
    # The entry points may use each other (the CLI runs the closed loop); nothing else uses them.
    bad = sorted(
        f"{a} -> {b}" for a, deps in edges.items() for b in deps if b in ENTRY_POINTS and a not in ENTRY_POINTS
    )
    assert bad == []


def test_pure_packages_import_nothing_of_the_project(edges: dict[str, set[str]]) -> None:
    assert {p: sorted(edges[p]) for p in PURE} == {p: [] for p in PURE}


def test_no_private_name_is_imported_from_another_module() -> None:
    assert private_imports() == []


def test_the_private_name_scan_finds_what_it_must() -> None:
    source = (
        "from monitor.reward.data import _logit, logit\n"
        "from .stats import _helper\n"
        "from bench.tansu import __all__\n"  # a dunder is not private
        "from outage_helpers import _fixture\n"  # a test helper's own
        "from helm_python import _native\n"  # another package's
        "def f():\n"
        "    from sampling.policy import _UNSET\n"
    )
    assert private_names_imported(source) == [
        (1, "monitor.reward.data", "_logit"),
        (2, ".stats", "_helper"),
        (7, "sampling.policy", "_UNSET"),
    ]
