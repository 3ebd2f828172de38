"""Detector names as test parameters, those of the `alibi` extra marked `alibi`.

alibi-detect (BSL 1.1) is not in the default install: its detectors' tests run only in the
`alibi` environment (`make test-alibi`); `make test` deselects them.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import pytest

import detectors


def by_extra(names: Iterable[str]) -> list[Any]:
    """``names`` for ``parametrize``: an alibi-detect detector carries the ``alibi`` mark."""
    return [pytest.param(n, marks=pytest.mark.alibi) if detectors.extra_of(n) == "alibi" else n for n in names]
