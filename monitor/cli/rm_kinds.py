"""``oversight rm register --kind hf|judge|http``: bring your own reward model (``monitor/reward/kinds``)."""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import TYPE_CHECKING, Any

from monitor.cli.common import InputFile
from monitor.errors import CommandFailed, UsageError

if TYPE_CHECKING:
    from monitor.config import Settings
    from monitor.store import Store


def kind_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--kind",
        choices=["builtin", "hf", "judge", "http"],
        help="reward-model kind (default: reward.kind). builtin: --model is a version directory from rm train; "
        "hf: --model is a sequence-classification checkpoint directory; judge, http: --kind-config",
    )
    p.add_argument(
        "--kind-config",
        metavar="FILE",
        type=InputFile,
        help="YAML or JSON: the kind's settings (README 'Bring your own')",
    )
    p.add_argument(
        "--kind-set",
        dest="kind_overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="set one of the kind's settings (repeatable; dotted keys, YAML values), e.g. --kind-set model=gpt-4o-mini",
    )
    p.add_argument(
        "--gate",
        action="store_true",
        help="evaluate it against the active version on held-out human labels (--stream, --since); promote or reject",
    )
    p.add_argument("--stream", help="with --gate: the stream whose fresh labels decide")
    p.add_argument("--since", type=float, default=0.0, help="with --gate: event time (epoch s) where 'fresh' starts")


def kind_config(args: argparse.Namespace) -> dict[str, Any]:
    import yaml

    from monitor.config import load_yaml
    from monitor.fileio import FileTooLarge, read_text_limited

    raw: dict[str, Any] = {}
    if args.kind_config:
        try:
            loaded = load_yaml(read_text_limited(args.kind_config))
        except (OSError, yaml.YAMLError, UnicodeDecodeError, FileTooLarge) as e:
            raise UsageError(f"--kind-config {args.kind_config}: {str(e).splitlines()[0]}") from None
        if not isinstance(loaded, dict):
            raise UsageError(f"--kind-config {args.kind_config}: not a mapping")
        raw = loaded
    for item in args.kind_overrides:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise UsageError(f"--kind-set {item!r}: expected KEY=VALUE")
        node = raw
        *parents, last = key.split(".")
        for depth, k in enumerate(parents, 1):
            node = node.setdefault(k, {})
            if not isinstance(node, dict):
                where = ".".join(parents[:depth])
                raise UsageError(f"--kind-set {item!r}: {where} is already set to a value, not a mapping")
        try:
            node[last] = load_yaml(value)
        except yaml.YAMLError as e:
            raise UsageError(f"--kind-set {item!r}: the value is not YAML: {str(e).splitlines()[0]}") from None
    if args.kind == "hf" and args.model:
        raw["path"] = str(Path(args.model).resolve())
    return raw


def register_kind(args: argparse.Namespace, settings: Settings, store: Store) -> dict[str, Any]:
    """Register (and gate or activate) a version of a non-built-in kind; the command's JSON result."""
    from monitor.reward.kinds import BackendError, KindVersion
    from monitor.reward.registry import Registry

    if args.kind == "hf" and not args.model:
        raise UsageError("--kind hf needs --model DIR (the checkpoint directory)")
    try:
        kv = KindVersion.create(args.kind, kind_config(args))
    except BackendError as e:
        raise UsageError(str(e)) from None
    registry = Registry.for_settings(store, settings)
    version = registry.register(kv, data_window=kv.metadata["training"], metrics={"identity": kv.identity})
    out: dict[str, Any] = {"version": version, "kind": args.kind, "active": False}
    if args.gate:
        out["gate"] = gate(args, settings, store, version)
        out["active"] = bool(out["gate"]["passed"])
    elif args.activate:
        out["generation"] = registry.promote(version, {"passed": True, "reason": "activated by hand"})
        out["active"] = True
    return out


def gate(args: argparse.Namespace, settings: Settings, store: Store, version: str) -> dict[str, Any]:
    from monitor.reward.kinds import BackendError
    from monitor.reward.kinds.gate import gate_version
    from monitor.reward.update import UpdateError

    if not args.stream:
        raise UsageError("--gate needs --stream (whose held-out human labels decide)")
    try:
        verdict = gate_version(settings, store, version, stream=args.stream, since=args.since)
    except (UpdateError, BackendError) as e:
        raise CommandFailed(f"gate could not decide; {version} stays a candidate: {e}") from None
    return json.loads(json.dumps(verdict, default=str))  # type: ignore[no-any-return]


def backlog_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--stream", help="only episodes of this stream")
    p.add_argument("--limit", type=int, help="try at most this many episodes (the oldest first); the rest are deferred")
    p.add_argument("--batch", type=int, default=32, help="episodes fetched and sent per round (default 32)")
    p.add_argument(
        "--version",
        # Not `version`: that is the top-level --version flag's, which would print the package's
        # version and exit 0 without scoring anything.
        dest="rm_version",
        metavar="V",
        help="score with this registered version instead of the active one (its scores carry its version id)",
    )


def cmd_rm_score_backlog(args: argparse.Namespace) -> int:
    """Score sampled episodes still without a reward-model score (a remote kind's backlog) now.
    Prints one JSON object (scored, failed, deferred, waiting, version); exit 0 when nothing failed,
    1 when some items failed and still wait, 2 on bad usage."""
    import sys

    from monitor.cli.common import open_existing_store, progress_of, settings_from_args
    from monitor.reward.kinds import BackendError, load_backend
    from monitor.reward.kinds.background import backlog_count, score_backlog
    from monitor.reward.kinds.resilience import BackendMetrics
    from monitor.reward.registry import Registry

    if args.limit is not None and args.limit < 1:
        raise UsageError("--limit must be at least 1")
    if args.batch < 1:
        raise UsageError("--batch must be at least 1")
    settings = settings_from_args(args)
    store = open_existing_store(settings)
    try:
        registry = Registry.for_settings(store, settings)
        if args.rm_version:
            if registry.get(args.rm_version) is None:
                raise CommandFailed(f"no registered version {args.rm_version}")
            version, path = args.rm_version, registry.path_of(args.rm_version)
        else:
            active = registry.active()
            if active is None:
                raise CommandFailed("no active reward-model version (rm register --activate, or --version)")
            version, path = active[0], active[1]
        before = backlog_count(store, args.stream)
        try:
            backend = load_backend(path, device=settings.reward.device, batch_size=settings.reward.batch_size)
        except (BackendError, OSError, ValueError) as e:
            raise CommandFailed(f"cannot load {version}: {str(e).splitlines()[0]}") from None
        show = progress_of(args)

        def progress(c: dict[str, int]) -> None:
            if show:
                print(f"scored {c['scored']}, failed {c['failed']} of {before} waiting", file=sys.stderr, flush=True)

        try:
            counts = score_backlog(
                store,
                backend,
                BackendMetrics.on(None),
                batch=args.batch,
                stream=args.stream,
                limit=args.limit,
                progress=progress,
            )
        finally:
            backend.close()
    finally:
        store.close()
    print(json.dumps({**counts, "version": version, "stream": args.stream, "before": before}, sort_keys=True))
    return 1 if counts["failed"] else 0
