"""``oversight estimate`` and ``oversight drift events | rereference``: questions to the store."""

from __future__ import annotations

import argparse
import json

from monitor.cli.common import (
    Command,
    open_existing_store,
    positive_int,
    print_json,
    probability,
    quoted,
    require_stream,
    settings_from_args,
)
from monitor.errors import UsageError

METADATA_PREFIX = "metadata."


def parse_time(value: str | None, flag: str) -> float | None:
    """RFC 3339 with an offset, or epoch seconds."""
    if value is None:
        return None
    from monitor.episodes import InvalidEpisode, parse_timestamp

    try:
        # ASCII digits: str.isdigit() takes "²", which float() refuses (an "unexpected ValueError").
        numeric = value.replace(".", "", 1).isascii() and value.replace(".", "", 1).isdigit()
        return parse_timestamp(float(value)) if numeric else parse_timestamp(value)
    except InvalidEpisode as e:
        raise UsageError(f"{flag} {value!r}: {e.detail}") from None


def check_quantity(quantity: str) -> None:
    """Refuse a quantity no episode can have: it would estimate over nothing and look like an answer."""
    from monitor.quality.estimates import BUILTIN_QUANTITIES

    if quantity in BUILTIN_QUANTITIES:
        return
    if quantity.startswith(METADATA_PREFIX) and all(quantity[len(METADATA_PREFIX) :].split(".")):
        return
    raise UsageError(f"unknown quantity {quantity!r}: use one of {', '.join(BUILTIN_QUANTITIES)} or metadata.KEY")


def estimate_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--stream", required=True, help="the stream whose traffic is estimated over")
    p.add_argument(
        "--channel", default="rm", choices=["human", "rm", "drift"], help="sampling channel whose items are used"
    )
    p.add_argument(
        "--quantity",
        required=True,
        help="per-episode quantity: response_chars, prompt_chars, empty_response, or metadata.KEY (numeric or boolean)",
    )
    p.add_argument("--since", help="window start (RFC 3339 or epoch seconds)")
    p.add_argument("--until", help="window end (RFC 3339 or epoch seconds)")
    p.add_argument("--confidence", type=probability, default=0.95, help="confidence level of the interval")


def cmd_estimate(args: argparse.Namespace) -> int:
    check_quantity(args.quantity)
    since, until = parse_time(args.since, "--since"), parse_time(args.until, "--until")
    if since is not None and until is not None and since >= until:
        # An empty span is an estimate over nothing, which looked like an answer.
        raise UsageError(f"--since {args.since} is not before --until {args.until}")
    settings = settings_from_args(args)
    from monitor.quality.estimates import estimate_stream

    store = open_existing_store(settings)
    try:
        require_stream(store, args.stream)
        est = estimate_stream(store, args.stream, args.channel, args.quantity, since, until, args.confidence)
    finally:
        store.close()
    print_json(est, indent=2)
    return 0


def events_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--stream", help="only this stream's events")
    p.add_argument("--limit", type=positive_int, default=50, help="newest N events (at most 10,000)")


def cmd_drift_events(args: argparse.Namespace) -> int:
    store = open_existing_store(settings_from_args(args))
    try:
        if args.stream is not None:
            require_stream(store, args.stream)
        rows = store.drift_events(stream=args.stream, limit=min(args.limit, 10_000), newest_first=True)
    finally:
        store.close()
    from monitor.drift import detail_text

    for row in rows:
        # ``detail`` is what the detector measured; ``size`` says it in words (shift and interval).
        print_json({**row, "size": detail_text(row.get("detail"))})
    return 0


def rereference_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--stream", required=True, help="the stream whose traffic changed")
    p.add_argument("--signal", help="only this signal (default: all of the stream's signals)")
    p.add_argument("--reason", required=True, help="what changed (recorded in the audit log)")
    p.add_argument("--actor", default="cli", help="who acknowledges the change (recorded in the audit log)")


def cmd_drift_rereference(args: argparse.Namespace) -> int:
    from monitor.drift import EMBEDDING, request_rereference

    if not args.reason.strip():  # the audit log's record of why the detectors forgot their reference
        raise UsageError("--reason must say what changed (a new policy version, a prompt change...)")
    settings = settings_from_args(args)
    if args.signal is not None:
        signals = sorted({*settings.drift.signals, EMBEDDING})
        if args.signal not in signals:
            raise UsageError(f"unknown signal {json.dumps(args.signal)}; drift.signals has {quoted(signals, 50)}")
    store = open_existing_store(settings)
    try:
        require_stream(store, args.stream)
        rid = request_rereference(store, args.stream, args.signal, args.reason, args.actor)
    finally:
        store.close()
    print_json({"request": rid, "stream": args.stream, "signal": args.signal, "status": "pending"})
    return 0


ESTIMATE = (
    Command(
        ("estimate",),
        "Horvitz-Thompson estimate over all traffic of a stream from sampled items",
        cmd_estimate,
        estimate_arguments,
    ),
)
DRIFT = (
    Command(("drift", "events"), "list recent drift events as JSON lines", cmd_drift_events, events_arguments),
    Command(
        ("drift", "rereference"),
        "acknowledge a change (e.g. a new policy version): the stream's detectors warm up again",
        cmd_drift_rereference,
        rereference_arguments,
    ),
)
