"""The pieces every command uses: the command table's row, the shared option groups, argument
types, settings from the command line, and opening the store without side effects.

Stdlib only at import time: the parser is built from these on every ``oversight`` call,
``--help`` included, and must stay fast.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from monitor.errors import CommandFailed, UsageError, sqlite_file

if TYPE_CHECKING:
    from monitor.config import Settings
    from monitor.store import Store

# Exit codes (README "Commands"): see monitor.cli.app's docstring.
EXIT_OK = 0
EXIT_FAILED = 1
EXIT_USAGE = 2
EXIT_ABORTED = 3
EXIT_INTERRUPTED = 130
EXIT_BROKEN_PIPE = 141
EXIT_TERMINATED = 143

Run = Callable[[argparse.Namespace], int]
Arguments = Callable[[argparse.ArgumentParser], None]


# --- path arguments -------------------------------------------------------------------------
# A path argument's type says what it must be, so that the dispatcher checks every path of a
# command before the command starts (``check_paths``): a report in a missing folder used to fail
# only after a whole replay. The types are plain ``str`` subclasses: parsing itself never touches
# the file system (the deploy tests parse the chart's and compose file's arguments on a machine
# where those paths do not exist).


class InputFile(str):
    """A file (or FIFO; '-' for stdin where the command allows it) the command reads."""

    __slots__ = ()


class InputDir(str):
    """A folder the command reads."""

    __slots__ = ()


class OutputFile(str):
    """A file the command writes: its folder must exist and be writable."""

    __slots__ = ()


class OutputDir(str):
    """A folder the command writes (created with its parents when missing)."""

    __slots__ = ()


PATH_TYPES: tuple[type[str], ...] = (InputFile, InputDir, OutputFile, OutputDir)


def port(value: str) -> int:
    n = int(value)
    if not 0 <= n <= 65535:
        raise argparse.ArgumentTypeError(f"{value} is not a port (0-65535; 0 picks a free one)")
    return n


def positive_int(value: str) -> int:
    n = int(value)
    if n < 1:
        raise argparse.ArgumentTypeError(f"{value} is not a positive integer")
    return n


def non_negative_int(value: str) -> int:
    n = int(value)
    if n < 0:
        raise argparse.ArgumentTypeError(f"{value} is negative")
    return n


def probability(value: str) -> float:
    """A number strictly between 0 and 1 (a share, a confidence level), and far enough from 1 that a
    two-sided level's quantile, 0.5 + x/2, is still below 1 in floating point (0.9999999999999999
    was an "unexpected StatisticsError")."""
    x = float(value)
    if not (0.0 < x < 1.0 and 0.5 + x / 2 < 1.0):
        raise argparse.ArgumentTypeError(f"{value} is not strictly between 0 and 1")
    return x


def non_negative_float(value: str) -> float:
    x = float(value)
    if not x >= 0.0:  # also refuses nan
        raise argparse.ArgumentTypeError(f"{value} is not a non-negative number")
    return x


# --- the shared option groups -----------------------------------------------------------------


def settings_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", metavar="FILE", type=InputFile, help="YAML configuration file")
    p.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override a setting by dotted key (repeatable), the value read as YAML, e.g. --set"
        " sampling.human.rate=0.05; KEY:=VALUE sets the string VALUE as given",
    )
    p.add_argument(
        "--dev", action="store_true", default=None, help="development mode (the built-in sampling key is allowed)"
    )


def db_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--db", metavar="URL", help="database URL (sqlite:///PATH or postgresql://...); database.url")


def progress_options(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--progress",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="progress bars on stderr (default: on when stderr is a terminal)",
    )


def log_options(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--log-level", default="INFO", choices=["DEBUG", "INFO", "WARNING", "ERROR"], help="log level (stderr)"
    )


OPTION_GROUPS: dict[str, Arguments] = {
    "settings": settings_options,
    "db": db_options,
    "progress": progress_options,
}


@dataclass(frozen=True)
class Command:
    """One leaf command: where it sits (``("rm", "pairs")``), its help, its own arguments, the
    shared option groups it takes and the one function that runs it."""

    path: tuple[str, ...]
    help: str
    run: Run
    arguments: Arguments | None = None
    options: tuple[str, ...] = ("settings", "db")

    @property
    def name(self) -> str:
        return " ".join(self.path)


# --- helpers of the commands -------------------------------------------------------------------


def progress_of(args: argparse.Namespace) -> bool:
    """--progress / --no-progress, or by default whether a person is watching stderr."""
    chosen = getattr(args, "progress", None)
    return bool(sys.stderr.isatty()) if chosen is None else bool(chosen)


def settings_from_args(args: argparse.Namespace, extra: Iterable[str] = ()) -> Settings:
    """The effective settings: ``extra`` (the command's own) first, so the user's --db, --dev and
    --set win over them."""
    from monitor.config import literal_override, load_settings

    overrides = list(extra)
    if getattr(args, "db", None):
        overrides.append(literal_override("database.url", args.db))
    if getattr(args, "dev", None):
        overrides.append("dev=true")
    overrides.extend(getattr(args, "overrides", []))
    return load_settings(getattr(args, "config", None), overrides)


def input_overrides(path: str) -> list[str]:
    """Settings for ``--input FILE`` ('-': stdin)."""
    from monitor.config import literal_override

    return ["source.kind=stdin"] if path == "-" else ["source.kind=file", literal_override("source.path", path)]


def shown_url(url: str) -> str:
    """A database URL fit for a message: the password hidden."""
    from sqlalchemy.engine import make_url

    try:
        return make_url(url).render_as_string(hide_password=True)
    except Exception:
        return "(unparseable database URL)"


def open_existing_store(settings: Settings, *, require_schema: bool = True) -> Store:
    """The store of a command that reads (or adds to) what is there: never creates a SQLite file,
    never migrates, and fails with one line when the database is missing, unreachable or empty."""
    from monitor.store import Store

    url = settings.database.url
    path = sqlite_file(url)
    # Checked before the engine exists: opening SQLite creates the file (and its folder).
    if path is not None and path.is_dir():
        raise CommandFailed(f"database {path}: a folder, not a SQLite database file (database.url)")
    if path is not None and not path.is_file():
        raise CommandFailed(f"database {path} does not exist (oversight db upgrade creates it)")
    store = Store.open(settings.database, migrate=False, check_schema=False)
    try:
        # revision() connects: an unreachable server raises here, with the driver's reason.
        revision = store.revision()
    except BaseException:
        store.close()
        raise
    if require_schema and revision is None:
        store.close()
        raise CommandFailed(f"database {shown_url(url)} has no schema (oversight db upgrade creates it)")
    if require_schema and (problem := store.schema_problem(revision)) is not None:
        store.close()
        raise CommandFailed(f"database {shown_url(url)}: {problem}")
    return store


def open_store(settings: Settings) -> Store:
    """The store of a command that may be the first to use the database (creates and migrates it
    as database.migrate says, like ``run``)."""
    from monitor.store import Store

    return Store.open(settings.database)


def one_line(message: object) -> str:
    """A message on one line, with anything unprintable escaped (messages may quote untrusted text)."""
    lines = [ln.strip() for ln in str(message).splitlines() if ln.strip()]
    if not lines:
        return "(no details)"
    text = lines[0] if len(lines) == 1 else f"{lines[0]} {'; '.join(lines[1:])}"
    return "".join(c if c.isprintable() else ascii(c)[1:-1] for c in text)


def quoted(names: Iterable[str], limit: int = 20) -> str:
    """Names from the database (stream names come from episodes: untrusted) for a message."""
    items = [json.dumps(n, ensure_ascii=True) for n in names]
    if not items:
        return "none"
    more = f" and {len(items) - limit} more" if len(items) > limit else ""
    return ", ".join(items[:limit]) + more


def require_stream(store: Store, stream: str) -> None:
    """Refuse a stream the database has never seen: a typo must not give an empty answer."""
    known = store.streams()
    if stream not in known:
        raise UsageError(f"unknown stream {json.dumps(stream, ensure_ascii=True)}; the database has {quoted(known)}")


def print_json(obj: Any, *, indent: int | None = None) -> None:
    print(json.dumps(obj, ensure_ascii=True, sort_keys=True, indent=indent, default=str))


def write_json(path: str, obj: Any) -> None:
    with open(path, "w", encoding="utf-8") as fh:
        json.dump(obj, fh, indent=2, sort_keys=True, default=str)
        fh.write("\n")


def ended_early(input_error: str | None, episodes: int) -> None:
    """Fail the command (exit 1, one line) when its input ended at damage (``input_error``), after
    its report: the ``episodes`` before the damage are committed, the rest was never read."""
    if input_error is not None:
        raise CommandFailed(f"{input_error}; the {episodes} episodes before it were processed and committed")
