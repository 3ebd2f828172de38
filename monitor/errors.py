"""What entry points (the CLI, the demo) share: their error classes and the checks of the paths
they are given, made before any work starts.

A path is checked up front because the alternative is finding out at the end: a report path in a
missing folder used to fail only after a whole replay had run. Stdlib only: the CLI imports this
before any command runs.
"""

from __future__ import annotations

import os
import stat
from pathlib import Path


class UsageError(Exception):
    """The command line is wrong: a flag's value, a name that does not exist. Exit code 2."""


class CommandFailed(Exception):
    """The command could not do its work: a file it needs is missing, unreadable or not writable, a
    database or broker does not answer, an operation failed. Exit code 1."""


def require_readable(path: str, flag: str) -> None:
    """``path`` (a file, FIFO or '-' for stdin) can be opened for reading."""
    if path == "-":
        return
    try:
        mode = os.stat(path).st_mode
    except FileNotFoundError:
        raise CommandFailed(f"{flag} {path}: no such file") from None
    except OSError as e:
        raise CommandFailed(f"{flag} {path}: {e.strerror}") from None
    if stat.S_ISDIR(mode):
        raise CommandFailed(f"{flag} {path}: is a folder, not a file")
    if not os.access(path, os.R_OK):
        raise CommandFailed(f"{flag} {path}: permission denied")


def require_readable_dir(path: str, flag: str) -> None:
    if not os.path.isdir(path):
        raise CommandFailed(f"{flag} {path}: no such folder")
    if not os.access(path, os.R_OK | os.X_OK):
        raise CommandFailed(f"{flag} {path}: permission denied")


def require_writable_file(path: str, flag: str) -> None:
    """``path`` can be created or overwritten: its folder exists and is writable. Nothing is created."""
    target = Path(path)
    if target.is_dir():
        raise CommandFailed(f"{flag} {path}: is a folder, not a file")
    folder = target.parent if str(target.parent) else Path(".")
    if not folder.is_dir():
        raise CommandFailed(f"{flag} {path}: folder {folder} does not exist")
    if not os.access(folder, os.W_OK | os.X_OK) or (target.exists() and not os.access(target, os.W_OK)):
        raise CommandFailed(f"{flag} {path}: permission denied")


def require_writable_dir(path: str, flag: str) -> None:
    """``path`` is a folder that can be written, or can be created (its nearest existing ancestor
    is a writable folder). Nothing is created."""
    target = Path(path).absolute()
    if target.exists() and not target.is_dir():
        raise CommandFailed(f"{flag} {path}: is a file, not a folder")
    existing = target
    while not existing.exists():
        existing = existing.parent
    if not existing.is_dir():
        raise CommandFailed(f"{flag} {path}: {existing} is a file, not a folder")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise CommandFailed(f"{flag} {path}: permission denied on {existing}")


def sqlite_file(url: str) -> Path | None:
    """The file of a SQLite URL (``sqlite:///PATH``), None for an in-memory or non-SQLite URL."""
    if not url.startswith("sqlite"):
        return None
    path = url.split("///", 1)[1] if "///" in url else ""
    path = path.split("?", 1)[0]
    if path in ("", ":memory:"):
        return None
    return Path(path).expanduser()
