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
from monitor.service import build_service, build_source


def replay_file(
    settings: Settings, path: str, *, progress: bool = False, name: str | None = None, desc: str = "replay"
) -> dict[str, Any]:
    """Replay ``path`` ('-': stdin) through a fresh, non-serving service; the pipeline's report plus ``timing``.

    The replay never resumes (``resume=False``): it reads the input from its first record. The
    store is closed on the way out, also when the replay fails.
    """
    source = build_source(settings, resume=False, name=name or f"replay:{path}")
    svc = build_service(settings, source=source, serve=False)
    try:
        bar = None
        if progress:
            from tqdm import tqdm

            bar = tqdm(desc=desc, unit="ep", file=sys.stderr, total=count_lines(path))
        t0 = time.perf_counter()
        pipe = svc.pipeline
        pipe.open()
        try:
            while True:
                records = pipe.source.poll(settings.pipeline.batch_size, 0.05)
                if records:
                    pipe.process_batch(records)
                    if bar is not None:
                        bar.update(len(records))
                elif pipe.source.exhausted:
                    break
        finally:
            pipe.close()
            if bar is not None:
                bar.close()
        elapsed = time.perf_counter() - t0
        report = pipe.report()
    finally:
        svc.store.close()
    report["timing"] = {
        "seconds": round(elapsed, 3),
        "episodes_per_s": round(report["episodes"] / elapsed, 1) if elapsed else None,
    }
    return report
