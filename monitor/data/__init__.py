"""Data files bundled with the package (see README.md here for their sources and licences)."""

from __future__ import annotations

import gzip
import json
from collections.abc import Iterator
from importlib import resources
from pathlib import Path
from typing import Any


def bundled_records(name: str) -> Iterator[dict[str, Any]]:
    """The JSON objects of a bundled gzip JSONL file in ``monitor/data``."""
    path = Path(str(resources.files("monitor.data").joinpath(name)))
    # The demo traffic deliberately holds malformed records (for the dead-letter demo): skip them.
    with gzip.open(path, "rb") as fh:
        for line in fh:
            try:
                obj = json.loads(line)
            except ValueError:
                continue
            if isinstance(obj, dict):
                yield obj
