"""The replay driver: the service's pipeline over a file (or stdin) as fast as it can go.

``oversight replay`` and ``bench/replay.py`` both run this, so the benchmark measures exactly
what users run.
"""

from __future__ import annotations

import sys
import time
from typing import Any

from monitor.config import Settings
from monitor.fileio import count_lines
from monitor.pipeline import LoopHooks
from monitor.service.build import build_service, build_source
from monitor.sources.base import Record
from monitor.sources.file import file_input_error


def replay_file(
    settings: Settings, path: str, *, progress: bool = False, name: str | None = None, desc: str = "replay"
) -> dict[str, Any]:
    """Replay ``path`` ('-': stdin) through a fresh, non-serving service; the pipeline's report plus ``timing``.

    The replay never resumes (``resume=False``): it reads the input from its first record, and
    refuses a database that already holds this input. Its result does not depend on wall time:
    the stages do no idle work (no re-reference polls, detectors built in place)."""
    source = build_source(settings, resume=False, name=name or f"replay:{path}")
    with build_service(settings, source=source, serve=False) as svc:
        bar = None
        if progress:
            from tqdm import tqdm

            bar = tqdm(desc=desc, unit="ep", file=sys.stderr, total=count_lines(path))

        def advance(records: list[Record]) -> None:
            if bar is not None:
                bar.update(len(records))

        hooks = LoopHooks(stage_idle_work=False, after_batch=advance)
        t0 = time.perf_counter()
        try:
            svc.run(hooks=hooks)
        finally:
            if bar is not None:
                bar.close()
        elapsed = time.perf_counter() - t0
        report = svc.pipeline.report()
    if (error := file_input_error(source)) is not None:
        report["input_error"] = error  # the input ended early: the command fails after the report
    report["timing"] = {
        "seconds": round(elapsed, 3),
        "episodes_per_s": round(report["episodes"] / elapsed, 1) if elapsed else None,
    }
    return report
