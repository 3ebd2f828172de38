"""``oversight demo``: the bundled real traffic through the embedded service."""

from __future__ import annotations

import json
import shutil
import sys
import textwrap
import threading
from importlib import resources
from pathlib import Path
from typing import Any

from monitor.errors import UsageError

DATA = "demo-traffic.jsonl.gz"


def bundled_traffic() -> Path:
    return Path(str(resources.files("monitor.data").joinpath(DATA)))


# A demo folder holds this file; --workdir is emptied at start only when it does (or is empty).
WORKDIR_MARKER = ".oversight-demo-workdir"


def prepare_workdir(work: Path) -> None:
    """Empty (or create) the demo's folder; refuse any folder the demo did not make, since
    ``--workdir ~`` must not delete a home directory. Only the marker the demo writes says so: a
    folder whose names were the demo's own (``oversight.db``, ``dead-letter.jsonl``, ``models``)
    was taken for one, and those are the service's defaults, so ``run``'s database was deleted."""
    if work.exists():
        if not work.is_dir():
            raise UsageError(f"--workdir {work}: is a file, not a folder")
        if any(work.iterdir()) and not (work / WORKDIR_MARKER).is_file():
            raise UsageError(
                f"--workdir {work}: not empty and not a folder `oversight demo` made ({WORKDIR_MARKER} is missing);"
                " refusing to delete it"
            )
        shutil.rmtree(work)
    work.mkdir(parents=True)
    (work / WORKDIR_MARKER).write_text("made by oversight demo; emptied by the next demo run\n")


def run_demo(
    *,
    config: str | None,
    overrides: list[str],
    workdir: str,
    port: int,
    review_port: int,
    exit_after_replay: bool,
    progress: bool = True,
) -> int:
    """The closed loop (``oversight simulate``) on the bundled traffic, told as a story.

    ``overrides`` (``--set``) come after the demo's own settings, so a user's --set wins.
    """
    from monitor.config import literal_override, load_settings
    from monitor.service import install_signal_handlers
    from monitor.simulate import BUNDLED_CONFIG, bundled, run_simulation

    work = Path(workdir)
    data = bundled_traffic()
    extra = [
        "dev=true",
        "source.kind=file",
        literal_override("source.path", str(data)),
        literal_override("database.url", f"sqlite:///{(work / 'oversight.db').resolve()}"),
        literal_override("dead_letter.path", str(work / "dead-letter.jsonl")),
        literal_override("reward.models_dir", str(work / "models")),
        f"server.port={port}",
    ]
    settings = load_settings(config if config is not None else str(bundled(BUNDLED_CONFIG)), [*extra, *overrides])
    # Only a valid configuration empties the folder of the previous run.
    prepare_workdir(work)
    print(
        f"The closed loop on {data.name}: real AlpacaEval traffic (see monitor/data/README.md).\n"
        "  stream chat:      gpt-3.5-turbo-1106, replaced by alpaca-7b half way (a real policy swap; nothing in\n"
        "                    the episodes announces it)\n"
        "  stream assistant: claude-2 throughout\n"
        f"{settings.simulate.reviewers} simulated reviewers label what the monitor samples, through the review API,"
        " answering from the judge's preference (metadata.judge_pref, which nothing else reads)."
    )

    def on_start(sim: Any, store: Any) -> None:
        _accounts(store, sim.review_url)
        base = str(sim.metrics_url).rstrip("/")
        print(f"Metrics: {base}/metrics   health: {base}/healthz\n", flush=True)

    def while_serving(report: dict[str, Any]) -> None:
        (work / "report.json").write_text(json.dumps(report, indent=2, sort_keys=True, default=str) + "\n")
        _summary(report)
        print(f"\nReport: {work / 'report.json'}   dead letters: {settings.dead_letter.path}")
        if exit_after_replay:
            return
        print("Review UI and /metrics stay up until Ctrl-C.")
        stop = threading.Event()
        install_signal_handlers(stop, settings.pipeline.drain_timeout_s)
        stop.wait()

    run_simulation(
        settings, str(data), progress=progress, review_port=review_port, on_start=on_start, while_serving=while_serving
    )
    return 0


def _accounts(store: Any, url: str | None) -> None:
    """Two accounts for a person to look at the review UI while the loop runs (passwords printed once)."""
    from monitor.review import auth

    print(f"\nReview UI: {url}  (dev mode; the simulated reviewers work in the same queue)")
    for name, role in (("admin", "admin"), ("reviewer", "reviewer")):
        password = auth.generate_password()
        if auth.find_user(store, name) is None:
            auth.create_user(store, name, role, password)
            print(f"  {role:<9} login: {name:<9} password: {password}")


def _num(x: float | None) -> str:
    return "-" if x is None else f"{x:.3f}"


def _summary(report: dict[str, Any]) -> None:
    pipe = report["pipeline"]
    letters = ", ".join(f"{k}={v}" for k, v in pipe["dead_letters"].items())
    print(f"\n{pipe['episodes']} records: {pipe['invalid']} invalid (dead-lettered: {letters})")
    events = report["drift_events"]
    print(f"\nDrift: {len(events)} event(s); each boosts its stream's human and reward-model sampling")
    for ev in events[:10]:
        print(f"  input #{ev['index']:<5} {ev['stream']:<10} {ev['signal']:<22} {ev['detector']}")
    print("\nHuman sampling (mean inclusion probability of sampled episodes):")
    for stream, ph in report["sampling"].items():
        parts = [
            f"{name} {v['mean_p']:.3f} ({v['sampled']} sampled)" for name, v in ph.items() if v["mean_p"] is not None
        ]
        print(f"  {stream:<10} " + ", ".join(parts))
    lab = report["labels_collected"]
    print(f"\nLabels: {lab['total']} by the simulated reviewers ({lab['by_stream']})")
    for inc in report["incidents"]:
        up = inc["update"] or {}
        print(
            f"  incident {inc['incident']}: alarm at input #{inc['alarm_index']} on {', '.join(inc['signals'])};"
            f" {inc['labels_after_alarm']} labels of the new traffic before the update;"
            f" update {up.get('state')} in {up.get('wall_seconds_alarm_to_decision')} s"
            f" (training {up.get('train_seconds')} s)"
        )
    print("\nReward-model versions (pairwise agreement with held-out judge pairs, after / before the change):")
    for v in report["rm_versions"]:
        an, ao = v["agreement_new"], v["agreement_old"]
        reason = (v.get("gate") or {}).get("reason") or ""
        print(f"  {v['version']}  {v['status']:<8} new {_num(an)}  old {_num(ao)}")
        # The gate's whole rule: a refusal names the kinds and numbers, which a cut line would lose.
        print(textwrap.fill(reason, 100, initial_indent="      ", subsequent_indent="      "))
        for caveat in (v.get("gate") or {}).get("caveats") or ():
            print(textwrap.fill(f"caveat: {caveat}", 100, initial_indent="      ", subsequent_indent="        "))
    print("\nPolicy retraining requests (one per incident):")
    for r in report["retrain_requests"]:
        events = r.get("events_total", len(r["drift_events"]))
        print(
            f"  {r['id']} for {r['incident']}: {events} drift event(s), reward model {r['rm_version']},"
            f" {r['state']} via {', '.join(sorted((r.get('sinks') or {}).keys())) or '-'}"
        )
    print("\nHorvitz-Thompson estimate of the mean judge preference over ALL traffic, from the labelled sample:")
    for stream, e in report["estimates"].items():
        if e["estimate"] is None:
            continue
        print(
            f"  {stream:<10} {e['estimate']:.3f}  95% CI [{e['ci_low']:.3f}, {e['ci_high']:.3f}]"
            f"  from {e['n_labelled']} of {e['population']} episodes; true mean {e['true_mean']:.3f}"
            f" ({'covered' if e['covered'] else 'not covered'})"
        )
    hacking = report["reward_hacking_suspected"]
    print(f"\nReward hacking suspected: {', '.join(hacking) if hacking else 'no stream'}")
    sys.stdout.flush()
