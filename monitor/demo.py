"""``oversight demo``: the bundled real traffic through the embedded service."""

from __future__ import annotations

import argparse
import gzip
import json
import shutil
import sys
import threading
from importlib import resources
from pathlib import Path
from typing import Any

DATA = "demo-traffic.jsonl.gz"


def bundled_traffic() -> Path:
    return Path(str(resources.files("monitor.data").joinpath(DATA)))


def _true_means(path: Path, key: str) -> dict[str, float]:
    sums: dict[str, list[float]] = {}
    with gzip.open(path, "rb") as fh:
        for line in fh:
            try:
                obj = json.loads(line)
                v = obj["metadata"][key]
            except (ValueError, KeyError, TypeError):
                continue
            if isinstance(v, int | float):
                sums.setdefault(obj.get("stream", "default"), []).append(float(v))
    return {s: sum(v) / len(v) for s, v in sums.items()}


def run_demo(args: argparse.Namespace) -> int:
    from monitor.cli import _replay, _settings
    from monitor.server import OpsServer
    from monitor.service import install_signal_handlers

    work = Path(args.workdir)
    if work.exists():
        shutil.rmtree(work)
    work.mkdir(parents=True)
    data = bundled_traffic()
    extra = [
        "dev=true",
        "source.kind=file",
        f"source.path={data}",
        f"database.url=sqlite:///{(work / 'oversight.db').resolve()}",
        f"dead_letter.path={work / 'dead-letter.jsonl'}",
        f"server.port={args.port}",
    ]
    settings = _settings(args, extra)
    print(f"Replaying {data.name}: real AlpacaEval traffic from 3 models in 2 streams (see monitor/data/README.md)")
    svc, report = _replay(settings, str(data), progress=True, name="demo", desc="demo")
    server = OpsServer(
        settings.server.host, settings.server.port, svc.metrics.registry, lambda: {"database": svc.store.ping()}
    )
    server.start()
    _summary(report, svc.store, data)
    review = _start_review(settings, svc.store, args.review_port)
    (work / "report.json").write_text(json.dumps(report, indent=2, sort_keys=True) + "\n")
    print(f"\nReport: {work / 'report.json'}   dead letters: {settings.dead_letter.path}")
    print(f"Metrics: {server.url}/metrics   health: {server.url}/healthz   ready: {server.url}/readyz")
    try:
        if args.exit_after_replay:
            return 0
        print("Serving metrics until Ctrl-C.")
        stop = threading.Event()
        install_signal_handlers(stop, settings.pipeline.drain_timeout_s)
        stop.wait()
        return 0
    finally:
        review.stop()
        server.stop()
        svc.store.close()


def _start_review(settings: Any, store: Any, port: int) -> Any:
    """The review UI in this process, with two demo accounts (passwords printed once)."""
    from monitor.review import auth
    from monitor.review.app import create_app
    from monitor.review.server import BackgroundServer

    accounts = []
    for name, role in (("admin", "admin"), ("reviewer", "reviewer")):
        password = auth.generate_password()
        auth.create_user(store, name, role, password)
        accounts.append((name, role, password))
    review = BackgroundServer(create_app(settings, store), settings.review.host, port).start()
    print(f"\nReview UI: {review.url}  (dev mode)")
    for name, role, password in accounts:
        print(f"  {role:<9} login: {name:<9} password: {password}")
    return review


def _summary(report: dict[str, Any], store: Any, data: Path) -> None:
    from monitor.estimates import estimate_stream

    t = report["timing"]
    letters = ", ".join(f"{k}={v}" for k, v in report["dead_letters"].items())
    print(
        f"\n{report['episodes']} records in {t['seconds']:.1f}s ({t['episodes_per_s']:.0f}/s): "
        f"{report['invalid']} invalid (dead-lettered: {letters})"
    )
    print(
        f"{'stream':<12}{'episodes':>9}{'invalid':>8}{'human':>7}{'rm':>6}{'drift':>7}"
        "   min inclusion probability human/rm/drift"
    )
    for name, st in report["streams"].items():
        s = st["sampled"]
        p = st["inclusion_probability"]
        pm = "/".join(f"{p[c]['min']:.3g}" for c in ("human", "rm", "drift") if c in p) or "-"
        print(f"{name:<12}{st['episodes']:>9}{st['invalid']:>8}{s['human']:>7}{s['rm']:>6}{s['drift']:>7}   {pm}")
    events = report.get("drift_events") or []
    print(f"\nDrift events: {len(events)} (each boosts its stream's human and rm sampling)")
    for ev in events[:10]:
        print(f"  input #{ev['index']:<5} {ev['stream']:<10} {ev['signal']:<22} {ev['detector']}")
    truth = _true_means(data, "judge_pref")
    print(
        "\nHorvitz-Thompson estimate of the mean judge preference over ALL traffic, from the rm sample only\n"
        "(weights undo the drift boosts; a 95% interval misses the truth in about 1 run in 20: coverage over\n"
        "repeated replays is tested in tests/test_estimator.py):"
    )
    for name in report["streams"]:
        est = estimate_stream(store, name, "rm", "metadata.judge_pref")
        e = est["estimate"]
        if e["mean"] is None:
            continue
        covered = e["ci_low"] <= truth.get(name, float("nan")) <= e["ci_high"]
        print(
            f"  {name:<10} {e['mean']:.3f}  95% CI [{e['ci_low']:.3f}, {e['ci_high']:.3f}]  "
            f"from {e['n_sampled']} of {est['population']} episodes; true mean {truth.get(name, float('nan')):.3f} "
            f"({'covered' if covered else 'not covered'})"
        )
    sys.stdout.flush()
