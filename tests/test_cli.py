"""The CLI as users run it: subprocesses, real files, real signals, real HTTP."""

from __future__ import annotations

import gzip
import json
import os
import signal
import socket
import sqlite3
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest

from monitor.simulate.demo import bundled_traffic

OVERSIGHT = [sys.executable, "-m", "monitor.cli"]


def run(*args: str, timeout: float = 120, **kw: object) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*OVERSIGHT, *args], capture_output=True, text=True, timeout=timeout, check=False, **kw)  # type: ignore[call-overload, no-any-return]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def get(url: str) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(url, timeout=5) as r:
            return r.status, r.read().decode()
    except urllib.error.HTTPError as e:
        return e.code, e.read().decode()


def test_help_is_fast() -> None:
    t0 = time.perf_counter()
    out = subprocess.run(
        [str(Path(sys.executable).parent / "oversight"), "--help"], capture_output=True, text=True, check=True
    )
    assert time.perf_counter() - t0 < 2.0
    assert "replay" in out.stdout and "demo" in out.stdout


def test_every_help_renders(capsys: pytest.CaptureFixture[str]) -> None:
    """``--help`` of every command and group prints (argparse %-formats each help text, so one
    stray "%" in a command's help broke its whole group's ``--help`` with a traceback)."""
    from monitor.cli.app import COMMANDS, main

    paths = {cmd.path[:depth] for cmd in COMMANDS for depth in range(1, len(cmd.path) + 1)}
    assert len(paths) > 20
    helps = {}
    for path in sorted(paths):
        with pytest.raises(SystemExit) as done:
            main([*path, "--help"])
        assert done.value.code == 0, path
        helps[path] = capsys.readouterr().out
        assert f"usage: oversight {' '.join(path)}" in helps[path]
    assert "(95% intervals)" in helps[("reviewers",)]


def test_no_heavy_imports_at_cli_import() -> None:
    heavy = "('torch', 'transformers', 'alibi_detect', 'sqlalchemy', 'kafka')"
    code = f"import monitor.cli, sys; print(sorted(m for m in {heavy} if m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


# End to end (two replays of the bundled traffic, about 30 s): make test-slow.
@pytest.mark.slow
def test_replay_report_is_deterministic(tmp_path: Path) -> None:
    data = bundled_traffic()
    reports = []
    for i in range(2):
        rep = tmp_path / f"r{i}.json"
        res = run(
            "replay",
            "--input",
            str(data),
            "--report",
            str(rep),
            "--db",
            f"sqlite:///{tmp_path / f'db{i}.sqlite'}",
            "--set",
            f"dead_letter.path={tmp_path / f'dlq{i}.jsonl'}",
            timeout=300,  # about 40 s of CPU: embeddings of the drift-sampled episodes
        )
        assert res.returncode == 0, res.stderr
        reports.append(json.loads(rep.read_text()))
    a, b = reports
    a.pop("timing")
    b.pop("timing")
    assert a == b
    assert a["episodes"] == 2420 and a["invalid"] == 5
    # The bundled chat stream swaps policy half way (gpt-3.5-turbo-1106 -> alpaca-7b).
    assert a["drift_events"], "the policy swap in the demo traffic was not detected"
    for ev in a["drift_events"]:
        assert set(ev) >= {"index", "episode_id", "stream", "signal", "detector"}
        assert 0 <= ev["index"] < 2420
    assert set(a["sampled"]) == {"human", "rm", "drift"}
    assert a["streams"]["chat"]["episodes"] == 1610 and a["streams"]["assistant"]["episodes"] == 805
    assert a["sampled"]["rm"] >= a["sampled"]["human"] > 0
    assert sum(st["sampled"]["rm"] for st in a["streams"].values()) == a["sampled"]["rm"]


def every_episode_stored(tmp_path: Path) -> list[str]:
    """A fresh SQLite database under ``tmp_path`` that keeps every episode (human sampling at 1), no drift."""
    return [
        "--db",
        f"sqlite:///{tmp_path / 'db.sqlite'}",
        "--set",
        "sampling.human.rate=1.0",
        "--set",
        "drift.enabled=false",
        "--set",
        f"dead_letter.path={tmp_path / 'd.jsonl'}",
    ]


def test_replay_from_stdin_with_set_overrides(tmp_path: Path) -> None:
    lines = [json.dumps({"episode_id": f"e{i}", "prompt": "p", "response": "r", "timestamp": i}) for i in range(300)]
    rep = tmp_path / "r.json"
    res = run(
        "replay",
        "--input",
        "-",
        "--report",
        str(rep),
        *every_episode_stored(tmp_path),
        input="\n".join(lines) + "\n\n",
    )
    assert res.returncode == 0, res.stderr
    report = json.loads(rep.read_text())
    assert report["episodes"] == 300 and report["sampled"]["human"] == 300 and report["sampled"]["rm"] == 300


@pytest.mark.parametrize("command", ["replay", "import"])
def test_a_damaged_gzip_input_is_one_line_exit_1_after_the_report(tmp_path: Path, command: str) -> None:
    """A gzip cut short (an export copied while written): the episodes before the cut are processed,
    committed and reported, then the command fails with one line naming the file and the cause. It
    used to stop with "unexpected EOFError", the batch in progress lost and the input's offset stored
    (so the replay could be neither finished nor run again)."""
    lines = b"".join(
        json.dumps({"episode_id": f"e{i}", "prompt": "p" * 50, "response": "r" * 200, "timestamp": i}).encode() + b"\n"
        for i in range(3000)
    )
    data = gzip.compress(lines)
    cut = tmp_path / "cut.jsonl.gz"
    cut.write_bytes(data[: len(data) // 2])
    rep = tmp_path / "r.json"
    res = run(
        command,
        "--input",
        str(cut),
        "--report",
        str(rep),
        "--dev",
        *every_episode_stored(tmp_path),
    )
    assert res.returncode == 1, res.stderr
    assert "Traceback" not in res.stderr and "unexpected" not in res.stderr
    last = res.stderr.strip().splitlines()[-1]
    assert last.startswith(f"oversight {command}: error: reading {command}:{cut} failed after byte"), last
    assert "end-of-stream marker" in last and "were processed and committed" in last
    report = json.loads(rep.read_text())
    read = report["episodes"]
    assert 1000 < read < 3000 and report["invalid"] == 0 and report["sampled"]["human"] == read
    assert report["input_error"] in last
    with sqlite3.connect(tmp_path / "db.sqlite") as db:
        assert db.execute("SELECT count(*) FROM episodes").fetchone()[0] == read


def test_config_errors_exit_2_with_message(tmp_path: Path) -> None:
    res = run("config", "check", "--set", "sampling.humna.rate=0.1")
    assert res.returncode == 2 and "sampling.humna: unknown key" in res.stderr
    bad = tmp_path / "c.yaml"
    bad.write_text("sampling: [1\n")
    res = run("config", "show", "--config", str(bad))
    assert res.returncode == 2 and "not valid YAML" in res.stderr
    bad.write_bytes(b"sampling:\n  key: \xff\xfe\n")  # not UTF-8: one line, not "unexpected UnicodeDecodeError"
    res = run("config", "check", "--config", str(bad))
    assert res.returncode == 2 and "is not UTF-8 text" in res.stderr and "unexpected" not in res.stderr
    res = run("run", "--input", str(bundled_traffic()), "--db", f"sqlite:///{tmp_path / 'x.db'}")
    assert res.returncode == 2 and "sampling.key is not set" in res.stderr
    shown = run("config", "show", "--set", "sampling.key=topsecret-5f0c9e2a7b4d1e8c")
    assert shown.returncode == 0 and "topsecret" not in shown.stdout and "**" in shown.stdout
    # Credentials in URLs too: the database password (a Secret in the chart), a webhook's user and token.
    shown = run(
        "config", "show", "--db", "postgresql://app:S3CRETPW@db:5432/o?sslmode=require&password=QPW",
        "--set", "actions.webhook.url=https://hook:HOOKPW@hooks.example/x?token=TOK&team=1",
    )  # fmt: skip
    assert shown.returncode == 0, shown.stderr
    assert not any(s in shown.stdout for s in ("S3CRETPW", "QPW", "HOOKPW", "TOK"))
    assert "postgresql://app:***@db:5432/o?sslmode=require&password=***" in shown.stdout
    assert "https://hook:***@hooks.example/x?token=***&team=1" in shown.stdout


def test_web_servers_in_use_port_is_one_line_error_and_port_0_logs_the_real_url(tmp_path: Path) -> None:
    """``oversight serve`` and ``oversight ingest serve`` on a port in use: exit 2 with one line naming
    the setting (before, uvicorn logged the address as served, then ended the process itself)."""
    db = f"sqlite:///{tmp_path / 'w.db'}"
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = str(taken.getsockname()[1])
        for cmd, setting in ((["serve"], "review.host/port"), (["ingest", "serve"], "ingest.host/port")):
            res = run(*cmd, "--dev", "--db", db, "--port", port, "--set", "review.metrics_port=0")
            assert res.returncode == 2, res.stderr
            assert f"{setting}: cannot listen on 127.0.0.1:{port}" in res.stderr
            assert "Traceback" not in res.stderr and " at http" not in res.stderr
    proc = subprocess.Popen(
        [*OVERSIGHT, "ingest", "serve", "--dev", "--db", db, "--port", "0"], stderr=subprocess.PIPE, text=True
    )
    try:
        assert proc.stderr is not None
        line = proc.stderr.readline()
        assert "ingest API at http://127.0.0.1:" in line and ":0/" not in line, line
        url = line.split(" at ", 1)[1].split("/v1/", 1)[0]
        assert get(f"{url}/healthz") == (200, '{"status":"ok"}')
    finally:
        proc.terminate()
        proc.wait(timeout=15)


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT])
@pytest.mark.parametrize("command", ["serve", "ingest serve"])
def test_a_web_service_stops_cleanly_on_a_signal(tmp_path: Path, command: str, signum: int) -> None:
    """``oversight serve`` and ``oversight ingest serve`` shut down on SIGTERM (Kubernetes) or SIGINT
    (Ctrl-C), run their cleanup (store, hand-off) and exit 0. uvicorn's own signal handling raised
    the signal again after its shutdown: the process died of it (status 143) before the command's
    cleanup ran, and a Ctrl-C could end in a KeyboardInterrupt traceback."""
    args = [*OVERSIGHT, *command.split(), "--dev", "--db", f"sqlite:///{tmp_path / 'w.db'}", "--port", "0"]
    if command == "serve":
        args += ["--set", "review.metrics_port=0"]
    env = {k: v for k, v in os.environ.items() if not k.startswith("OVERSIGHT_")}
    proc = subprocess.Popen(args, stderr=subprocess.PIPE, text=True, env=env)
    try:
        assert proc.stderr is not None
        seen: list[str] = []
        line = ""
        while "review UI at " not in line and "ingest API at " not in line:
            line = proc.stderr.readline()
            assert line, "".join(seen)  # ended before serving
            seen.append(line)
        url = line.split(" at ", 1)[1].strip().split("/v1/", 1)[0].rstrip("/")
        assert get(f"{url}/healthz")[0] == 200
        proc.send_signal(signum)
        rest = proc.stderr.read()
        assert proc.wait(timeout=30) == 0, "".join(seen) + rest
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    name = "review UI" if command == "serve" else "ingest API"
    assert f"{name} stopped" in rest and signal.Signals(signum).name in rest, rest
    assert "Traceback" not in rest, rest


class StandInServer:
    """A stand-in for uvicorn.Server (the attributes serve_until_signalled uses): serves until asked
    to exit, or raises ``fail`` at start."""

    def __init__(self, fail: BaseException | None = None) -> None:
        self.should_exit = False
        self.force_exit = False
        self.started = False
        self.fail = fail
        self.sockets: list[socket.socket] = []

    def run(self, sockets: list[socket.socket]) -> None:
        self.sockets = sockets
        if self.fail is not None:
            raise self.fail
        self.started = True
        while not self.should_exit:
            time.sleep(0.01)


def test_serve_until_signalled_stops_on_a_signal_and_raises_what_the_server_raised() -> None:
    """The mechanism under the two commands: a signal asks the server to exit and the call returns;
    the handlers before are put back; what the server's thread raised is
    raised to the caller, as uvicorn's run() on the caller's thread did (the CLI turns it into one line)."""
    import threading

    from monitor.ops import serve_until_signalled

    before = signal.getsignal(signal.SIGTERM)
    with socket.socket() as sock:
        server = StandInServer()
        threading.Timer(0.3, lambda: os.kill(os.getpid(), signal.SIGTERM)).start()
        assert serve_until_signalled(server, sock, "stand-in") is True
        assert server.should_exit and not server.force_exit and server.sockets == [sock]
        assert signal.getsignal(signal.SIGTERM) == before
        with pytest.raises(OSError, match="no such address"):
            serve_until_signalled(StandInServer(fail=OSError("no such address")), sock, "stand-in")
        assert signal.getsignal(signal.SIGTERM) == before


def test_run_serves_ops_endpoints_and_drains_on_sigterm(tmp_path: Path) -> None:
    """A file source that is being appended to (a FIFO) keeps the service running; SIGTERM drains."""
    fifo = tmp_path / "in.fifo"
    os.mkfifo(fifo)
    port = free_port()
    db = tmp_path / "db.sqlite"
    proc = subprocess.Popen(
        [
            *OVERSIGHT,
            "run",
            "--input",
            str(fifo),
            "--db",
            f"sqlite:///{db}",
            "--set",
            # Like the old "k3y": none of e0-e24 is drift-sampled, so no embedder loads within the deadline.
            "sampling.key=cli-test-key-05-3e9a1f7c5b2d",
            "--set",
            f"server.port={port}",
            "--set",
            "sampling.rm.rate=1.0",
            "--set",
            f"dead_letter.path={tmp_path / 'd.jsonl'}",
            "--set",
            "pipeline.batch_size=10",
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    writer = open(fifo, "w")  # noqa: SIM115 (held open across the test)
    try:
        for i in range(25):
            writer.write(json.dumps({"episode_id": f"e{i}", "prompt": "p", "response": "r"}) + "\n")
        writer.write("{not json\n")
        writer.flush()
        deadline = time.time() + 30
        body = ""
        while time.time() < deadline:
            try:
                code, body = get(f"http://127.0.0.1:{port}/metrics")
                if 'oversight_sampled_total{channel="rm",stream="default"} 25.0' in body:
                    break
            except OSError:
                pass
            time.sleep(0.2)
        assert 'oversight_sampled_total{channel="rm",stream="default"} 25.0' in body
        assert 'oversight_dead_letters_total{reason="invalid_json"} 1.0' in body
        assert "oversight_processing_latency_seconds_bucket" in body
        assert get(f"http://127.0.0.1:{port}/healthz")[0] == 200
        code, ready = get(f"http://127.0.0.1:{port}/readyz")
        checks = json.loads(ready)["checks"]
        assert code == 200 and {"source", "database"} <= set(checks) and all(checks.values()), checks
        assert get(f"http://127.0.0.1:{port}/nope")[0] == 404
        t0 = time.time()
        proc.send_signal(signal.SIGTERM)
        rc = proc.wait(timeout=10)
        assert rc == 0 and time.time() - t0 < 10
    finally:
        writer.close()
        if proc.poll() is None:
            proc.kill()
    from monitor.store import Store

    store = Store(f"sqlite:///{db}")
    assert store.traffic_count("default") == 25 and store.sample_counts()["default"]["rm"] == 25
    store.close()


def test_run_resumes_a_file_where_it_stopped(tmp_path: Path) -> None:
    path = tmp_path / "in.jsonl.gz"
    with gzip.open(path, "wt") as fh:
        for i in range(500):
            fh.write(json.dumps({"episode_id": f"e{i}", "prompt": "p", "response": "r", "timestamp": i}) + "\n")
    common = [
        "--input",
        str(path),
        "--db",
        f"sqlite:///{tmp_path / 'db.sqlite'}",
        "--set",
        "sampling.key=cli-test-key-7d2b9e4a1c6f3058",
        "--set",
        "drift.enabled=false",
        "--set",
        "server.port=0",
        "--set",
        f"dead_letter.path={tmp_path / 'd.jsonl'}",
    ]
    assert run("run", *common).returncode == 0
    with gzip.open(path, "at") as fh:
        for i in range(500, 700):
            fh.write(json.dumps({"episode_id": f"e{i}", "prompt": "p", "response": "r", "timestamp": i}) + "\n")
    res = run("run", *common)
    assert res.returncode == 0, res.stderr
    assert "stopped after 200 records" in res.stderr
    from monitor.store import Store

    store = Store(f"sqlite:///{tmp_path / 'db.sqlite'}")
    assert store.traffic_count("default") == 700
    store.close()


@pytest.mark.slow
def test_demo_runs_end_to_end(tmp_path: Path) -> None:
    """The demo's story on the bundled traffic (training cut to head-only phases to save minutes)."""
    res = run(
        "demo",
        "--exit-after-replay",
        "--port",
        "0",
        "--review-port",
        "0",
        "--workdir",
        str(tmp_path / "demo"),
        "--set",
        'simulate.bootstrap_train={"epochs": 0}',
        "--set",
        'reward.update.train={"epochs": 0}',
        timeout=600,
    )
    assert res.returncode == 0, res.stderr
    assert "Loading weights" not in res.stderr  # no progress bar of transformers' in the log
    out = res.stdout
    assert "2420 records: 5 invalid" in out and "Review UI: http://" in out and "/metrics" in out
    report = json.loads((tmp_path / "demo" / "report.json").read_text())
    assert report["pipeline"]["invalid"] == 5
    assert len((tmp_path / "demo" / "dead-letter.jsonl").read_text().splitlines()) == 5
    # The story: drift on chat (the swap), a boost, an update, one retraining request.
    (first, *_) = [e for e in report["drift_events"] if e["stream"] == "chat"]
    assert f"input #{first['index']:<5} chat" in out
    assert report["sampling"]["chat"]["boosted"]["sampled"] > 0 and "boosted 0.250" in out
    # The update is trained and gated; its verdict is the truthful gate's (head-only training on
    # about 90 labels may not prove a gain, and the candidate may lose a sensitivity the starting
    # version has), printed with its rule. tests/loop/test_closed_loop.py covers promotion.
    start, candidate = report["rm_versions"][0], report["rm_versions"][-1]
    assert len(report["rm_versions"]) >= 2
    assert [v["status"] for v in (start, candidate)].count("active") == 1  # one or the other serves
    assert candidate["status"] in ("active", "rejected", "undecided") and candidate["gate"]["reason"]
    assert f"{candidate['version']}  {candidate['status']:<8} new " in out
    assert " ".join(str(candidate["gate"]["reason"]).split()) in " ".join(out.split())  # the whole rule
    # What a promotion's gain does not show is printed under it (a refused candidate has none).
    assert candidate["gate"]["caveats"] == [] or candidate["status"] == "active"
    for caveat in candidate["gate"]["caveats"]:
        assert " ".join(f"caveat: {caveat}".split()) in " ".join(out.split())
    (incident,) = [p for p in report["incidents"] if p["stream"] == "chat"]
    assert incident["update"]["version"] == candidate["version"]
    (req,) = report["retrain_requests"]
    assert req["id"] in out and "covered" in out


def test_estimate_command(tmp_path: Path) -> None:
    db = f"sqlite:///{tmp_path / 'db.sqlite'}"
    res = run(
        "replay",
        "--input",
        str(bundled_traffic()),
        "--report",
        str(tmp_path / "r.json"),
        "--db",
        db,
        "--set",
        "sampling.rm.rate=0.3",
        "--set",
        "drift.enabled=false",  # estimates only: no need to load the embedding model
        "--set",
        f"dead_letter.path={tmp_path / 'd.jsonl'}",
    )
    assert res.returncode == 0, res.stderr
    res = run(
        "estimate", "--db", db, "--stream", "chat", "--channel", "rm", "--quantity", "metadata.judge_pref", "--dev"
    )
    assert res.returncode == 0, res.stderr
    out = json.loads(res.stdout)
    assert out["population"] == 1610 and out["estimate"]["method"] == "hajek"  # a metadata key: see estimate_stream
    assert 0.0 < out["estimate"]["ci_low"] < out["estimate"]["mean"] < out["estimate"]["ci_high"] < 1.0
