"""``oversight reviewers quality`` and ``oversight reviewers experiment``: reviewer quality from
canaries, and the assistance experiment's report (monitor/quality/canaries.py)."""

from __future__ import annotations

import argparse

from monitor.cli.common import Command, open_existing_store, print_json, settings_from_args


def quality_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--days", type=float, default=28.0, help="canary labels of the last this many days (default 28)")
    p.add_argument("--bucket", choices=["day", "week"], default="day", help="trend bucket (default day)")


def cmd_quality(args: argparse.Namespace) -> int:
    from monitor.quality import canaries

    settings = settings_from_args(args)
    if not args.days > 0:
        from monitor.errors import UsageError

        raise UsageError("--days must be positive")
    store = open_existing_store(settings)
    try:
        since = canaries.window_start(args.days)
        rows = canaries.reviewer_quality(store, settings.review.canaries.min_detection_rate, since, args.bucket)
    finally:
        store.close()
    # JSON with ASCII escapes: reviewer names are data, never terminal control sequences.
    print_json(rows, indent=2)
    return 0


def cmd_experiment(args: argparse.Namespace) -> int:
    from monitor.quality import canaries

    settings = settings_from_args(args)
    store = open_existing_store(settings)
    try:
        cfg = settings.review.assist
        report = canaries.experiment_report(store, cfg.name, list(cfg.conditions))
    finally:
        store.close()
    print_json({**report, "enabled": cfg.enabled}, indent=2)
    return 0


COMMANDS = (
    Command(
        ("reviewers", "quality"),
        "per reviewer and perturbation kind: canary detection rate, false flags, time per item (95% intervals)",
        cmd_quality,
        quality_arguments,
    ),
    Command(
        ("reviewers", "experiment"),
        "the assistance experiment per condition and kind, with differences from the control",
        cmd_experiment,
    ),
)
