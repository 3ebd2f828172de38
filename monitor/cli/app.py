"""The parser built from the command table, and the one place a command is run: logging set up,
paths checked, errors turned into one line and an exit code.

Exit codes: 0 done; 1 the command could not do its work (a missing or unwritable file, an
unreachable database or broker, a failed operation); 2 the command line or the configuration is
wrong (argparse errors, unknown names, invalid settings); 3 ``run`` stopped on an unrecoverable
pipeline error; 130 interrupted (Ctrl-C); 141 stdout was closed early (``oversight ... | head``),
quietly, as a process killed by SIGPIPE would report in a shell; 143 a command without a drain of its
own (``replay``, ``simulate``, ``rm train``, ...) was sent SIGTERM (:class:`Terminated`).
"""

from __future__ import annotations

import argparse
import atexit
import contextlib
import logging
import os
import signal
import sys
import threading
from collections.abc import Iterable, Iterator
from typing import Any, NoReturn

from monitor.cli import admin, importing, ingest, pipeline, query, reviewers, rm, rm_sensitivity, users
from monitor.cli.common import (
    EXIT_ABORTED,
    EXIT_BROKEN_PIPE,
    EXIT_FAILED,
    EXIT_INTERRUPTED,
    EXIT_OK,
    EXIT_TERMINATED,
    EXIT_USAGE,
    OPTION_GROUPS,
    PATH_TYPES,
    Command,
    InputDir,
    InputFile,
    OutputDir,
    OutputFile,
    log_options,
    one_line,
)
from monitor.errors import (
    CommandFailed,
    UsageError,
    require_readable,
    require_readable_dir,
    require_writable_dir,
    require_writable_file,
)

log = logging.getLogger("oversight")

# The whole command line, in the order ``--help`` lists it.
COMMANDS: tuple[Command, ...] = (
    *pipeline.COMMANDS,
    *query.ESTIMATE,
    *users.COMMANDS,
    *reviewers.COMMANDS,
    *ingest.COMMANDS,
    *importing.COMMANDS,
    *query.DRIFT,
    *rm.COMMANDS,
    *rm_sensitivity.COMMANDS,
    *admin.COMMANDS,
)
GROUPS = {
    "users": "review users and their API tokens",
    "reviewers": "reviewer quality from canaries, and the assistance experiment",
    "drift": "drift events and re-referencing",
    "rm": "reward model: preference pairs, training, evaluation, versions, updates",
    "db": "database migrations",
    "config": "show or check the effective configuration",
    "ingest": "the HTTP ingest API and its bearer tokens",
    "tokens": "ingest bearer tokens",
}


class Parser(argparse.ArgumentParser):
    """argparse, with its errors on one line (the usage is one ``--help`` away)."""

    def error(self, message: str) -> NoReturn:
        self.exit(EXIT_USAGE, f"{self.prog}: error: {one_line(message)} (see {self.prog} --help)\n")


class CommandParser(Parser):
    """A command's (or a group's) parser: it refuses what it does not know itself. argparse hands a
    subparser's leftovers up to the root parser, so ``oversight rm update --bogus`` was the top
    level's error, pointing to ``oversight --help``; now it is ``oversight rm update``'s."""

    def parse_known_args(
        self, args: Iterable[str] | None = None, namespace: Any = None
    ) -> tuple[Any, list[str]]:  # Any: typeshed's overloads give back the namespace's own type
        parsed, extras = super().parse_known_args(args, namespace)
        if extras:
            self.error(f"unrecognized arguments: {' '.join(extras)}")
        return parsed, extras


def literal(text: str) -> str:
    """A help text as argparse prints it literally: argparse %-formats every help (``%(default)s``),
    so a plain "95%" in a command's help broke ``--help`` of its whole group with a traceback."""
    return text.replace("%", "%%")


def build_parser() -> argparse.ArgumentParser:
    parser = Parser(
        prog="oversight", description="Continuous deployment-time oversight monitor for deployed language models."
    )
    # dest show_version: a subcommand's own --version (rm score-backlog's, a reward-model version)
    # must never land in this flag's attribute, or the command prints the package's version instead.
    parser.add_argument("--version", action="store_true", dest="show_version", help="print the version and exit")
    top = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=CommandParser)
    groups: dict[tuple[str, ...], Any] = {(): top}  # path prefix -> its subparsers
    for cmd in COMMANDS:
        for depth in range(1, len(cmd.path)):
            prefix = cmd.path[:depth]
            if prefix not in groups:
                p = groups[prefix[:-1]].add_parser(prefix[-1], help=literal(GROUPS[prefix[-1]]))
                groups[prefix] = p.add_subparsers(
                    dest=f"{prefix[-1]}_command", metavar="ACTION", required=True, parser_class=CommandParser
                )
        leaf = groups[cmd.path[:-1]].add_parser(cmd.path[-1], help=literal(cmd.help), description=cmd.help)
        if cmd.arguments is not None:
            cmd.arguments(leaf)
        for group in cmd.options:
            OPTION_GROUPS[group](leaf)
        log_options(leaf)
        leaf.set_defaults(func=cmd.run, command_name=cmd.name)
    return parser


def check_paths(args: argparse.Namespace) -> None:
    """Every path argument, before the command does anything. A path argument's value has the
    type of its kind (``type=InputFile`` ...); its flag is its dest's (all are ``--long-options``)."""
    for dest, value in vars(args).items():
        if not isinstance(value, PATH_TYPES):
            continue
        flag = "--" + dest.replace("_", "-")
        if not value:  # "" is the current folder to pathlib: "is a folder, not a file" misled
            raise UsageError(f"{flag}: an empty path")
        if isinstance(value, InputFile):
            require_readable(value, flag)
        elif isinstance(value, InputDir):
            require_readable_dir(value, flag)
        elif isinstance(value, OutputDir):
            require_writable_dir(value, flag)
        else:
            require_writable_file(value, flag)
    refuse_overwriting_an_input(args)


def refuse_overwriting_an_input(args: argparse.Namespace) -> None:
    """An output file that is one of the command's input files (``replay --input x --report x``)
    would be truncated before, or replaced after, the input was read: refused before either."""
    paths = [("--" + dest.replace("_", "-"), v) for dest, v in vars(args).items()]
    inputs = [(flag, v) for flag, v in paths if isinstance(v, InputFile) and v != "-"]
    for out_flag, out in ((flag, v) for flag, v in paths if isinstance(v, OutputFile)):
        for in_flag, given in inputs:
            with contextlib.suppress(OSError):  # an output not there yet is no input's file
                if os.path.samefile(given, out):
                    raise UsageError(f"{out_flag} {out} is the file {in_flag} reads: it would be overwritten")


def setup_logging(level: str) -> None:
    logging.basicConfig(
        level=getattr(logging, level), format="%(asctime)s %(levelname)s %(name)s: %(message)s", stream=sys.stderr
    )
    for noisy in ("kafka", "httpx", "alembic"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    # transformers draws a progress bar on stderr for every model it loads ("Loading weights:
    # 100%|...| 103/103"), a carriage-return line in a service's log at every start and hot swap.
    # Read when transformers is first imported, which every command does after this; a user who
    # wants the bars sets the variable to 0.
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")


def classify(e: BaseException) -> tuple[int, str] | None:
    """(exit code, message) for an error of a library the command used; None for a bug.

    A library's classes are looked up only when it was imported: a command that never touched
    the database did not raise a database error, and ``--help`` stays free of those imports.
    """
    config = sys.modules.get("monitor.config")
    if config is not None and isinstance(e, config.ConfigError):
        return EXIT_USAGE, str(e)
    retry = sys.modules.get("monitor.retry")
    if retry is not None and isinstance(e, retry.Aborted):
        # The pipeline gave up (an outage that outlasted its retries, a loop without progress).
        return EXIT_ABORTED, str(e)
    sa_exc = sys.modules.get("sqlalchemy.exc")
    if sa_exc is not None and isinstance(e, sa_exc.SQLAlchemyError):
        reason = getattr(e, "orig", None) or e
        if isinstance(e, sa_exc.OperationalError | sa_exc.InterfaceError):
            return EXIT_FAILED, f"database unavailable: {one_line(reason)}"
        return EXIT_FAILED, f"database error: {one_line(reason)}"
    store = sys.modules.get("monitor.store")
    if store is not None and isinstance(e, store.SchemaMismatch):
        return EXIT_FAILED, str(e)
    alembic_exc = sys.modules.get("alembic.util.exc")
    if alembic_exc is not None and isinstance(e, alembic_exc.CommandError):
        return EXIT_FAILED, f"database migration failed: {e}"
    kafka_errors = sys.modules.get("kafka.errors")
    if kafka_errors is not None and isinstance(e, kafka_errors.KafkaError):
        return EXIT_FAILED, f"broker unavailable: {e}"
    if isinstance(e, OSError):
        where = f"{e.filename}: " if e.filename else ""
        return EXIT_FAILED, f"{where}{e.strerror or e}"
    return None


def _silence_stdout() -> None:
    """After the reader of stdout went away: later writes (the interpreter's final flush among
    them) go nowhere instead of raising again at exit."""
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        os.close(devnull)
    except (OSError, ValueError, AttributeError):  # AttributeError: no stdout at all (None)
        pass


def flush_stdout() -> None:
    """Flush stdout if there is one: started with it closed (``>&-``), Python has ``None`` there,
    and ``print`` writes nowhere, but ``sys.stdout.flush()`` was an AttributeError."""
    if sys.stdout is not None:
        sys.stdout.flush()


class Terminated(BaseException):
    """SIGTERM reached a command that has no drain of its own: a batch (``replay``, ``simulate``,
    ``rm train``, ``db purge``, ...), which Kubernetes or a supervisor stops with SIGTERM where a
    person presses Ctrl-C. It unwinds like Ctrl-C's KeyboardInterrupt: the ``finally`` blocks run
    (the store closed, the services stopped), a transaction in flight rolls back, and the command
    says so in one line and exits 143. Without it SIGTERM's default action ended the process at
    once, silently, with none of that cleanup.

    A BaseException, as KeyboardInterrupt is, so that no ``except Exception`` on the way takes it
    for a failure to log and carry on from. The commands that drain (``run``, ``infer``, ``demo``,
    the servers) install their own handlers over this one."""


def raise_terminated(signum: int, frame: Any) -> None:
    raise Terminated


@contextlib.contextmanager
def sigterm_raises() -> Iterator[None]:
    """SIGTERM raises :class:`Terminated` in the main thread during the block, and the handler
    before it is put back after it: a SIGTERM once the command has returned (its exit handlers
    running) ends the process by its default action, not with a traceback. Only the main thread
    may set a handler; a caller on another thread (a test's) keeps the one it has."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    before = signal.signal(signal.SIGTERM, raise_terminated)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, before)


def run_command(args: argparse.Namespace) -> int:
    name = f"oversight {args.command_name}"
    try:
        check_paths(args)
        code = int(args.func(args))
        # A reader that went away shows up at the latest here, where it is still handled.
        flush_stdout()
        return code
    except BrokenPipeError:
        _silence_stdout()
        return EXIT_BROKEN_PIPE
    except KeyboardInterrupt:
        print(f"{name}: interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED
    except Terminated:
        print(f"{name}: terminated (SIGTERM)", file=sys.stderr)
        return EXIT_TERMINATED
    except UsageError as e:
        code, message = EXIT_USAGE, str(e)
    except CommandFailed as e:
        code, message = EXIT_FAILED, str(e)
    except Exception as e:
        known = classify(e)
        if known is None:
            # A bug: one line for the user, the traceback for whoever asks with --log-level DEBUG.
            log.debug("%s failed", name, exc_info=True)
            known = EXIT_FAILED, f"unexpected {type(e).__name__}: {e} (--log-level DEBUG shows where)"
        code, message = known
    print(f"{name}: error: {one_line(message)}", file=sys.stderr)
    return code


def entry() -> int:
    """The ``oversight`` script: :func:`main` in a process of its own, which ends with the
    command's status once every exit handler has run (:func:`_end_process`)."""
    outcome: list[int] = []
    # Registered before anything else can register one, so it runs last (handlers run in reverse).
    atexit.register(_end_process, outcome)
    try:
        code = main()
    except KeyboardInterrupt:  # Ctrl-C before a command runs (its imports, the parser): run_command handles the rest
        print("oversight: interrupted", file=sys.stderr)
        code = EXIT_INTERRUPTED
    outcome.append(code)
    return code


def _end_process(outcome: list[int]) -> None:
    """The last exit handler: flush the logs and the standard streams, then end the process with
    the command's status, skipping the rest of the interpreter's shutdown (module teardown, then
    the C++ libraries' static destructors). Those of PyTorch's and ONNX Runtime's native thread
    pools aborted a process that had finished cleanly, now and then, once a model had run on a
    worker thread: "terminate called without an active exception" after "stopped after N
    records", status -6, with no Python frame left. Everything of ours is closed by then (the
    service closes its sinks, store and consumer itself); Python's own exit handlers have run
    (multiprocessing's children, temporary directories). A command that raised is left to the
    interpreter, which reports it."""
    if not outcome:
        return
    logging.shutdown()
    for stream in (sys.stdout, sys.stderr):
        # A reader that went away, a stream already closed, or none at all (started with it closed).
        with contextlib.suppress(OSError, ValueError, AttributeError):
            stream.flush()
    os._exit(outcome[0])


def print_version() -> int:
    """``--version``, with a reader gone or a full disk handled as a command's output is."""
    from monitor import __version__

    try:
        print(__version__)
        flush_stdout()
    except BrokenPipeError:
        _silence_stdout()
        return EXIT_BROKEN_PIPE
    except OSError as e:
        print(f"oversight: error: cannot write to stdout: {one_line(str(e))}", file=sys.stderr)
        return EXIT_FAILED
    return EXIT_OK


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.show_version:
        return print_version()
    if getattr(args, "func", None) is None:
        parser.print_help(sys.stderr)
        return EXIT_USAGE
    setup_logging(args.log_level)
    with sigterm_raises():
        return run_command(args)
