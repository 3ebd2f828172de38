"""Real traffic and preference data for the tests, bundled in the repository: the tests need
nothing beside it (no ``../shared``). See ``tests/data/README.md`` for sources and licences.

* AlpacaEval rows of ``gpt-3.5-turbo-1106``, ``alpaca-7b`` and ``claude-2`` are rebuilt from the
  demo traffic (``monitor/data/demo-traffic.jsonl.gz`` keeps every field of every row and the
  row's position in its file), so they are not stored twice.
* Four more AlpacaEval models are in ``tests/data/alpaca_eval/`` (whole files, unchanged).
* The first rows of HH-RLHF's harmless-base test file are in ``tests/data/hh_rlhf/``.

``write_data_dir`` lays these out as the shared data set is laid out (``alpaca_eval/<model>.jsonl.gz``,
``hh_rlhf/harmless-base-test.jsonl.gz``), for code that reads a folder.
"""

from __future__ import annotations

import gzip
import json
import shutil
from functools import cache
from pathlib import Path
from typing import Any

DATA = Path(__file__).resolve().parent / "data"
ALPACA = DATA / "alpaca_eval"
HH = DATA / "hh_rlhf" / "harmless-base-test.jsonl.gz"
DEMO_MODELS = ("gpt-3.5-turbo-1106", "alpaca-7b", "claude-2")
STORED_MODELS = ("gpt-3.5-turbo-1106_verbose", "gpt-3.5-turbo-1106_concise", "NullModel", "gpt4_1106_preview")
MODELS = DEMO_MODELS + STORED_MODELS


@cache
def _demo_rows() -> dict[str, tuple[dict[str, Any], ...]]:
    """The AlpacaEval rows inside the demo traffic, per model, in their source file's order."""
    from monitor.simulate.demo import bundled_traffic

    by_model: dict[str, dict[int, dict[str, Any]]] = {m: {} for m in DEMO_MODELS}
    with gzip.open(bundled_traffic(), "rb") as fh:
        for line in fh:
            try:
                ep = json.loads(line)
            except ValueError:
                continue  # the demo's deliberately malformed records
            if not isinstance(ep, dict) or ep.get("model") not in by_model:
                continue
            # episode_id is "<stream>-<model>-<index in the model's source file>"
            index = int(str(ep["episode_id"]).rsplit("-", 1)[1])
            meta = ep["metadata"]
            by_model[ep["model"]][index] = {
                "instruction": ep["prompt"],
                "dataset": meta["dataset"],
                "output": ep["response"],
                "generator": ep["model"],
                "judge_pref": meta["judge_pref"],
            }
    out = {}
    for model, rows in by_model.items():
        if sorted(rows) != list(range(len(rows))):
            raise RuntimeError(f"the demo traffic lacks rows of {model}: rebuild it (monitor/data/build_demo_data.py)")
        out[model] = tuple(rows[i] for i in range(len(rows)))
    return out


def alpaca_rows(model: str) -> list[dict[str, Any]]:
    """One model's 805 AlpacaEval rows (``instruction``, ``dataset``, ``output``, ``generator``,
    ``judge_pref``) in the order of the source file; fresh dicts, so callers may change them."""
    if model in DEMO_MODELS:
        return [dict(r) for r in _demo_rows()[model]]
    if model not in STORED_MODELS:
        raise KeyError(f"{model!r} is not bundled for the tests: one of {', '.join(MODELS)}")
    with gzip.open(ALPACA / f"{model}.jsonl.gz", "rt", encoding="utf-8") as fh:
        return [json.loads(line) for line in fh]


def write_data_dir(dest: Path) -> Path:
    """Lay the bundled data out like the shared data set under ``dest``; returns ``dest``."""
    alpaca = dest / "alpaca_eval"
    alpaca.mkdir(parents=True, exist_ok=True)
    for model in DEMO_MODELS:
        # Level 1: written once per test session, read a few times.
        with gzip.open(alpaca / f"{model}.jsonl.gz", "wt", encoding="utf-8", compresslevel=1) as fh:
            for row in _demo_rows()[model]:
                fh.write(json.dumps(row, ensure_ascii=False) + "\n")
    for model in STORED_MODELS:
        shutil.copyfile(ALPACA / f"{model}.jsonl.gz", alpaca / f"{model}.jsonl.gz")
    (dest / "hh_rlhf").mkdir(exist_ok=True)
    shutil.copyfile(HH, dest / "hh_rlhf" / HH.name)
    return dest
