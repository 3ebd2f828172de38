"""``oversight db upgrade | current | purge`` and ``oversight config show | check``."""

from __future__ import annotations

import argparse
import json
import logging
import os
from typing import TYPE_CHECKING

from monitor.cli.common import Command, one_line, open_existing_store, settings_from_args, shown_url
from monitor.errors import CommandFailed, UsageError, require_readable, require_writable_dir, sqlite_file

if TYPE_CHECKING:
    from monitor.config import KafkaConfig, Settings

log = logging.getLogger("oversight")

# How long config check waits for a broker that does not answer.
BROKER_TIMEOUT_MS = 5000


def cmd_db_upgrade(args: argparse.Namespace) -> int:
    from monitor.store import Store

    store = Store.open(settings_from_args(args).database, migrate=True)
    try:
        revision = store.revision()
    finally:
        store.close()
    print(revision or "none")
    return 0


def cmd_db_current(args: argparse.Namespace) -> int:
    store = open_existing_store(settings_from_args(args), require_schema=False)
    try:
        revision = store.revision()
    finally:
        store.close()
    print(revision or "none")
    return 0


def purge_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--days",
        type=float,
        help="keep this many days of each stream's event time (default: database.retention.days)",
    )
    p.add_argument(
        "--reset-horizon",
        metavar="STREAM",
        action="append",
        default=[],
        help="first forget the stream's retention horizon (repeatable): one that a wall clock stepped into the"
        " future saved, which deleted new episodes and started its estimates there; the purge computes it again",
    )


def cmd_db_purge(args: argparse.Namespace) -> int:
    from monitor.store.retention import purge, reset_horizon

    settings = settings_from_args(args)
    cfg = settings.database.retention
    if args.days is not None:
        from pydantic import ValidationError

        try:  # the setting's own bounds (above 0, at most a century: beyond, the cutoff overflows)
            cfg = type(cfg).model_validate({**cfg.model_dump(), "days": args.days})
        except ValidationError as e:
            raise UsageError(f"--days {args.days}: {e.errors()[0]['msg']}") from None
    if cfg.days is None and not args.reset_horizon:
        raise UsageError("nothing to purge: set database.retention.days or pass --days")
    store = open_existing_store(settings)
    try:
        reset = {stream: reset_horizon(store, stream) for stream in args.reset_horizon}
        if cfg.days is None:
            print(json.dumps({"reset": reset}))
            return 0
        purged = purge(store, cfg, settings.source.max_future_s)
    finally:
        store.close()
    out = {"deleted": purged.deleted, "streams": len(purged.horizons), "failed_chunks": purged.failed_chunks}
    print(json.dumps({**out, "held": purged.held, **({"reset": reset} if reset else {})}))
    return 0


def cmd_config_show(args: argparse.Namespace) -> int:
    print(json.dumps(settings_from_args(args).redacted(), indent=2, sort_keys=True))
    return 0


def check_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--offline", action="store_true", help="check the configuration and paths only: do not connect to anything"
    )


def source_problem(settings: Settings) -> str | None:
    if settings.source.kind != "file" or settings.source.path is None:
        return None
    try:
        require_readable(settings.source.path, "source.path")
    except CommandFailed as e:
        return str(e)
    return None


def dead_letter_problem(settings: Settings) -> str | None:
    if settings.source.kind == "kafka":
        return None
    if os.path.isdir(settings.dead_letter.path):
        return f"dead_letter.path {settings.dead_letter.path} is a folder: name a file (in it)"
    try:
        # The sink creates the file and its folders: the nearest existing folder must be writable.
        require_writable_dir(os.path.dirname(os.path.abspath(settings.dead_letter.path)), "dead_letter.path")
    except CommandFailed as e:
        return str(e)
    return None


def database_problem(settings: Settings) -> tuple[str | None, str]:
    """(problem, what was found) for the database ``run`` would use; creates nothing."""
    url = settings.database.url
    path = sqlite_file(url)
    if path is not None and not path.exists():
        if not settings.database.migrate:
            return f"database {path} does not exist and database.migrate is false (oversight db upgrade creates it)", ""
        try:
            require_writable_dir(str(path.parent), "database.url")
        except CommandFailed as e:
            return str(e), ""
        return None, f"database {path} will be created"
    import sqlalchemy as sa

    from monitor.store import Store

    store = Store(url, migrate=False)
    try:
        revision = store.revision()
    except sa.exc.SQLAlchemyError as e:
        return f"database {shown_url(url)} unavailable: {one_line(getattr(e, 'orig', None) or e)}", ""
    finally:
        store.close()
    if revision is None and not settings.database.migrate:
        return f"database {shown_url(url)} has no schema and database.migrate is false (run oversight db upgrade)", ""
    return None, f"database {shown_url(url)} reachable (schema {revision or 'none yet'})"


def uses_broker(settings: Settings) -> bool:
    return (
        settings.source.kind == "kafka"
        or "kafka" in settings.actions.retrain_sinks
        or "kafka" in settings.actions.rm_update_sinks
    )


def broker_problem(cfg: KafkaConfig, topic_needed: bool) -> tuple[str | None, str]:
    from kafka import KafkaConsumer
    from kafka.errors import KafkaError

    from monitor.sources.kafka import client_security

    servers = ",".join(cfg.bootstrap_servers)
    try:
        consumer = KafkaConsumer(
            bootstrap_servers=cfg.bootstrap_servers,
            client_id="oversight-config-check",
            bootstrap_timeout_ms=BROKER_TIMEOUT_MS,
            **client_security(cfg),
        )
        try:
            topics = consumer.topics()
        finally:
            consumer.close()
    except KafkaError as e:
        return f"broker {servers} unavailable: {one_line(e)}", ""
    found = f"broker {servers} reachable"
    if topic_needed and cfg.topic not in topics:
        found += f" (topic {cfg.topic} does not exist yet)"
    return None, found


def cmd_config_check(args: argparse.Namespace) -> int:
    """What ``run`` would refuse, refused here: invalid settings and a missing sampling key (exit
    2), then a source file, dead-letter folder, database or broker it could not use (exit 1)."""
    from monitor.config import ConfigError

    settings = settings_from_args(args)
    settings.sampling_key()
    settings.sampling_policy()
    from monitor.actions.sinks import check_sinks

    check_sinks(settings)  # a webhook without its URL or secret, a missing Job template folder: exit 2
    if settings.review.assist.enabled:
        from monitor.assist import check_experiment

        check_experiment(settings.review.assist)  # an unknown assistant or bad parameters: exit 2
    notes: list[str] = []
    try:
        settings.review_secret()
    except ConfigError as e:
        notes.append(f"{e} (only serve and run --review need it)")
    if settings.source.kind == "file" and settings.source.path is None:
        notes.append("source.path is not set: run needs --input FILE")
    problems = [p for p in (source_problem(settings), dead_letter_problem(settings)) if p]
    found: list[str] = []
    if not args.offline:
        results = [database_problem(settings)]
        if uses_broker(settings):
            results.append(broker_problem(settings.kafka, settings.source.kind == "kafka"))
        problems += [problem for problem, _ in results if problem]
        found += [seen for problem, seen in results if not problem]
    for note in notes:
        log.warning("%s", one_line(note))
    if problems:
        raise CommandFailed("; ".join(problems))
    if args.offline:
        found.append("database and broker not checked (--offline)")
    print("configuration is valid: " + "; ".join(found) if found else "configuration is valid")
    return 0


COMMANDS = (
    Command(("db", "upgrade"), "apply all migrations (creates the database and its schema)", cmd_db_upgrade),
    Command(("db", "current"), "print the current schema revision ('none' before the first upgrade)", cmd_db_current),
    Command(
        ("db", "purge"),
        "delete stored episodes older than the retention window (labelled ones stay), with their samples,"
        " scores and traffic counts",
        cmd_db_purge,
        purge_arguments,
    ),
    Command(("config", "show"), "print the effective configuration (secrets redacted)", cmd_config_show),
    Command(
        ("config", "check"),
        "check what run checks: the settings, the sampling key, paths, and that the database and broker answer",
        cmd_config_check,
        check_arguments,
    ),
)
