"""Every documented example runs as written: each module of monitor/, sampling/ and detectors/ whose
docstrings hold ``>>>`` examples is run through doctest (found by reading the files, so a new
example is run without being listed here, and no module without one is imported for nothing, as
``--doctest-modules`` would). The public contracts must keep theirs."""

from __future__ import annotations

import doctest
import importlib
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
ROOTS = ("monitor", "sampling", "detectors")

# The public contracts: each shows how it is used in an example that runs.
CONTRACTS = {
    "detectors",  # make, restore
    "detectors.base",  # the detector contract
    "sampling.policy",  # Sampler.decide
    "sampling.estimator",  # horvitz_thompson, bounded_interval
    "monitor.reward.scorer",  # RewardScorer
}


def module_name(path: Path) -> str:
    parts = path.relative_to(REPO).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def modules_with_examples() -> list[str]:
    found = set()
    for root in ROOTS:
        for path in (REPO / root).rglob("*.py"):
            if "migrations" not in path.parts and ">>> " in path.read_text(encoding="utf-8"):
                found.add(module_name(path))
    return sorted(found)


MODULES = modules_with_examples()


def test_the_public_contracts_have_examples() -> None:
    assert not CONTRACTS - set(MODULES), f"no example in {sorted(CONTRACTS - set(MODULES))}"


@pytest.mark.parametrize("name", MODULES)
def test_docstring_examples_run(name: str) -> None:
    result = doctest.testmod(importlib.import_module(name), optionflags=doctest.ELLIPSIS)
    assert result.attempted > 0, f"{name}: '>>> ' in the file but no example doctest runs"
    assert result.failed == 0
