"""Data files bundled with the package (see README.md here for their sources and licences)."""

from __future__ import annotations

import gzip
import json
from collections.abc import Iterator
from importlib import resources
from itertools import islice
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


CALIBRATION = "hh-harmless-400.jsonl.gz"
# The int8 encoders' SmoothQuant calibration (monitor/inference/smooth.py). 3 inputs per
# dialogue: ~6 s of PyTorch at the first int8 build. Not sensitive to the count: 32, 96 and 200
# dialogues gave a minimum cosine to PyTorch of 0.9976-0.9980 on 966 held-out AlpacaEval texts.
CALIBRATION_DIALOGUES = 96


def calibration_pairs(n: int = CALIBRATION_DIALOGUES) -> list[tuple[str, str]]:
    """``(prompt, response)`` pairs to calibrate on, from the HH-RLHF dialogues bundled in
    ``monitor/data``: each dialogue with its chosen answer, the dialogue's last 200 characters
    alone and the answer's first 60 characters alone (short inputs have the sharpest activations).
    Each caller encodes them as it encodes its own inputs."""
    out: list[tuple[str, str]] = []
    for r in islice(bundled_records(CALIBRATION), n):
        prompt, answer = str(r["prompt"]), str(r["chosen"])
        out += [(prompt, answer), ("", prompt[-200:]), ("", answer[:60])]
    return out
