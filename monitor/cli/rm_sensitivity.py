"""``oversight rm sensitivity``: a reward-model version's sensitivity per perturbation kind."""

from __future__ import annotations

import argparse
import json
from typing import Any

from monitor.cli.common import (
    Command,
    InputDir,
    non_negative_int,
    open_existing_store,
    settings_from_args,
)
from monitor.errors import CommandFailed, UsageError


def sensitivity_arguments(p: argparse.ArgumentParser) -> None:
    # Its own dest: ``args.version`` is the top-level ``oversight --version``.
    p.add_argument("--version", dest="rm_version", metavar="V", help="a registered version (default: the active one)")
    p.add_argument(
        "--model", metavar="DIR", type=InputDir, help="a version folder instead of the registry (no database needed)"
    )
    p.add_argument("--stream", help="probe texts from this stream's stored episodes (default: every stream)")
    p.add_argument(
        "--pairs-per-kind",
        type=non_negative_int,
        help="probe pairs per perturbation kind (default: reward.update.sensitivity_pairs)",
    )
    p.add_argument("--seed", type=int, help="probe-set seed (default: reward.update.sensitivity_seed)")
    p.add_argument("--json", action="store_true", help="print one JSON object instead of the table")


def _load(path: Any, device: str | None, version: str) -> Any:
    from monitor.reward.kinds import load_backend
    from monitor.reward.kinds.base import BackendError, PairScorer

    try:
        return PairScorer(load_backend(path, device=device))
    except (BackendError, OSError, ValueError, KeyError) as e:
        raise CommandFailed(f"cannot load reward-model version {version}: {e}") from None


def _registered(args: argparse.Namespace, settings: Any, store: Any) -> tuple[str, Any]:
    """(version, folder) of ``--version`` or of the active version."""
    from monitor.reward.registry import Registry

    registry = Registry.for_settings(store, settings)
    if args.rm_version:
        if registry.get(args.rm_version) is None:
            raise CommandFailed(f"unknown reward-model version {args.rm_version!r} (see oversight rm versions)")
        return args.rm_version, registry.path_of(args.rm_version)
    active = registry.active()
    if active is None:
        raise CommandFailed("no active reward-model version (give --version V or --model DIR)")
    return active[0], active[1]


def cmd_rm_sensitivity(args: argparse.Namespace) -> int:
    from monitor.reward import sensitivity as rs
    from monitor.reward.kinds.base import BackendError

    if args.model and args.rm_version:
        raise UsageError("give --version or --model, not both")
    settings = settings_from_args(args)
    ucfg = settings.reward.update
    per_kind = ucfg.sensitivity_pairs if args.pairs_per_kind is None else args.pairs_per_kind
    seed = ucfg.sensitivity_seed if args.seed is None else args.seed
    if per_kind <= 0:
        raise UsageError("--pairs-per-kind must be at least 1 (reward.update.sensitivity_pairs is 0)")
    store = None if args.model and not args.stream else open_existing_store(settings)
    try:
        version, path = (str(args.model), args.model) if args.model else _registered(args, settings, store)
        items = rs.probe_set(store, streams=[args.stream] if args.stream else None, seed=seed, per_kind=per_kind)
    finally:
        if store is not None:
            store.close()
    model = _load(path, settings.reward.device, version)
    try:
        measured = rs.measure(model, items)
    except (BackendError, ValueError) as e:
        raise CommandFailed(f"cannot score the probe set with {version}: {e}") from None
    finally:
        model.backend.close()
    rows = rs.table(measured.per_kind)
    blind = rs.blind_spots(rows)
    if args.json:
        out = {"version": version, "seed": seed, "pairs": len(items), "per_kind": rows, "blind_spots": blind}
        print(json.dumps(out, sort_keys=True, ensure_ascii=True))
        return 0
    print(f"reward model {version!r}: sensitivity per perturbation kind, {len(items)} probe pairs, seed {seed}")
    print(rs.render(rows))
    print(f"cannot see (upper bound < 0.5): {', '.join(blind) or 'none'}")
    return 0


COMMANDS = (
    Command(
        ("rm", "sensitivity"),
        "a reward-model version's sensitivity per perturbation kind (share of probe pairs scored the right way)",
        cmd_rm_sensitivity,
        sensitivity_arguments,
    ),
)
