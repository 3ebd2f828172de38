"""Hostile and mistaken invocations that once did the wrong thing quietly, or answered with an
unexpected exception: each now gets one clear line and its exit status, and nothing is lost.

Found by running every command against hostile inputs (2026-12): an output path that is the
input, non-finite numbers, records of the wrong shape, text that is not Unicode, and a Ctrl-C
that reaches the whole process group, as a terminal sends it.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
from pathlib import Path

from outage_helpers import episode, free_port, wait_for
from test_cli_errors import ENV, OVERSIGHT, one_error_line, run
from test_drain import stored


def db_url(tmp_path: Path) -> str:
    return f"sqlite:///{tmp_path / 'db.sqlite'}"


def test_an_output_that_is_the_input_is_refused_before_either_is_touched(tmp_path: Path) -> None:
    episodes = tmp_path / "episodes.jsonl"
    text = "".join(json.dumps(episode(i)) + "\n" for i in range(3))
    episodes.write_text(text, encoding="utf-8")
    res = run("replay", "--dev", "--input", str(episodes), "--report", str(episodes), "--db", db_url(tmp_path))
    assert res.returncode == 2
    line = one_error_line(res)
    assert "--report" in line and "--input" in line and "overwritten" in line
    assert episodes.read_text(encoding="utf-8") == text
    assert not (tmp_path / "db.sqlite").exists()
    # Another path to the same file (a link) is the same file.
    link = tmp_path / "link.jsonl"
    link.symlink_to(episodes)
    res = run("replay", "--dev", "--input", str(episodes), "--report", str(link), "--db", db_url(tmp_path))
    assert res.returncode == 2 and "overwritten" in one_error_line(res)
    # A report beside it is fine.
    res = run(
        "replay", "--dev", "--input", str(episodes), "--report", str(tmp_path / "r.json"), "--db", db_url(tmp_path)
    )
    assert res.returncode == 0, res.stderr


def test_a_dead_letter_path_that_is_a_folder_is_named_as_the_setting(tmp_path: Path) -> None:
    episodes = tmp_path / "episodes.jsonl"
    episodes.write_text(json.dumps(episode(0)) + "\n", encoding="utf-8")
    folder = ["--set", f"dead_letter.path={tmp_path}"]
    res = run("config", "check", "--dev", "--offline", *folder)
    assert res.returncode == 1 and "dead_letter.path" in one_error_line(res) and "folder" in res.stderr
    report = str(tmp_path / "r.json")
    res = run("replay", "--dev", "--input", str(episodes), "--report", report, "--db", db_url(tmp_path), *folder)
    assert res.returncode != 0
    line = one_error_line(res)
    assert "dead_letter.path" in line and "unexpected" not in line, line


def test_paths_and_urls_are_taken_as_given_not_read_as_yaml(tmp_path: Path) -> None:
    """--input, --db and the demo's folder are strings: a file named like a date, ``null`` or
    holding ": ", and the in-memory SQLite URL, were read as YAML (a date, no path, a mapping) and
    refused as "Input should be a valid string"."""
    text = "".join(json.dumps(episode(i)) + "\n" for i in range(3))
    for name in ("2024-01-01", "null", "a: b.jsonl", "1e3"):
        (tmp_path / name).write_text(text, encoding="utf-8")
        db = f"sqlite:///{name.replace(':', '')}.db"  # relative: YAML reads "/tmp/.../null" as a string
        args = ["replay", "--dev", "--input", name, "--report", "r.json", "--db", db]
        res = subprocess.run([OVERSIGHT, *args], capture_output=True, text=True, env=ENV, cwd=tmp_path, check=False)
        assert res.returncode == 0 and json.loads(res.stdout)["episodes"] == 3, (name, res.stderr)
    args = ["replay", "--dev", "--input", str(tmp_path / "null"), "--report", str(tmp_path / "r.json")]
    res = run(*args, "--db", "sqlite:///:memory:")
    assert res.returncode == 0 and json.loads(res.stdout)["episodes"] == 3, res.stderr


def test_an_empty_path_and_a_folder_as_the_database_are_named(tmp_path: Path) -> None:
    episodes = tmp_path / "episodes.jsonl"
    episodes.write_text(json.dumps(episode(0)) + "\n", encoding="utf-8")
    res = run("replay", "--dev", "--input", str(episodes), "--report", "", "--db", db_url(tmp_path))
    assert res.returncode == 2 and one_error_line(res).endswith("--report: an empty path"), res.stderr
    folder = tmp_path / "db.sqlite"
    folder.mkdir()
    report = str(tmp_path / "r.json")
    for args in (
        ("replay", "--dev", "--input", str(episodes), "--report", report),
        ("estimate", "--stream", "chat", "--quantity", "response_chars"),
        ("db", "upgrade"),
    ):
        res = run(*args, "--db", f"sqlite:///{folder}")
        assert res.returncode == 1, res.stderr
        assert one_error_line(res).endswith(f"{folder}: a folder, not a SQLite database file (database.url)"), (
            res.stderr
        )


def test_purge_refuses_days_it_cannot_compute_a_cutoff_for(tmp_path: Path) -> None:
    for days in ("inf", "nan", "1e308", "0"):
        res = run("db", "purge", "--dev", "--days", days, "--db", db_url(tmp_path))
        assert res.returncode == 2 and "--days" in one_error_line(res), (days, res.stderr)
    res = run("config", "check", "--dev", "--set", "database.retention.days=1e308")
    assert res.returncode == 2 and "database.retention.days" in one_error_line(res)


def test_rating_records_of_the_wrong_shape_are_named_by_line(tmp_path: Path) -> None:
    ratings = tmp_path / "ratings.jsonl"
    good = {"prompt": "p", "response": "r", "rating": 5}
    for bad, words in [
        ("[1]", "expected a JSON object"),
        ('{"rating": 1}', "'prompt' must be a string"),
        ('{"prompt": "p", "response": "r", "rating": "x"}', "'rating' must be a finite number"),
        ('{"prompt": "p", "response": "r", "rating": NaN}', "'rating' must be a finite number"),
        ('{"prompt": "p", "response": "r", "rating": 1, "skipped": "no"}', "'skipped'"),
    ]:
        ratings.write_text(json.dumps(good) + "\n" + bad + "\n", encoding="utf-8")
        res = run("rm", "pairs", "--source", "ratings", "--ratings", str(ratings), "--out", str(tmp_path / "p.jsonl"))
        assert res.returncode == 1, res.stderr
        line = one_error_line(res)
        assert f"{ratings}:2" in line and words in line, line


def test_rm_train_refuses_pairs_it_cannot_train_on_before_loading_a_model(tmp_path: Path) -> None:
    pairs = tmp_path / "pairs.jsonl"
    pairs.write_text("", encoding="utf-8")
    res = run("rm", "train", "--pairs", str(pairs), "--out", str(tmp_path / "m"))
    assert res.returncode == 1 and "holds no pairs" in one_error_line(res)
    pairs.write_text('{"prompt": "\\ud800", "chosen": "a", "rejected": "b"}\n', encoding="utf-8")
    res = run("rm", "train", "--pairs", str(pairs), "--out", str(tmp_path / "m"))
    assert res.returncode == 2 and "lone surrogate" in one_error_line(res)
    assert not (tmp_path / "m").exists()


def test_a_password_that_is_not_utf8_is_refused(tmp_path: Path) -> None:
    res = subprocess.run(
        [OVERSIGHT, "users", "add", "ann", "--role", "reviewer", "--db", db_url(tmp_path)],
        input=b"\xff\xfe a password of bytes\n",
        capture_output=True,
        timeout=120,
        check=False,
        env=ENV,
    )
    out = subprocess.CompletedProcess(res.args, res.returncode, res.stdout.decode(), res.stderr.decode())
    assert out.returncode == 2 and "not UTF-8" in one_error_line(out)


def test_an_ingest_token_for_a_stream_no_record_can_name_is_refused(tmp_path: Path) -> None:
    for stream in ("a\x01b", "s" * 129):
        res = run("ingest", "tokens", "add", "app", "--stream", stream, "--db", db_url(tmp_path))
        assert res.returncode == 2 and "stream must" in one_error_line(res)
    res = run("ingest", "tokens", "add", "app", "--stream", "chat", "--db", db_url(tmp_path))
    assert res.returncode == 0 and res.stdout.strip(), res.stderr


def test_ctrl_c_at_a_terminal_stops_run_without_a_traceback(tmp_path: Path) -> None:
    """A terminal's Ctrl-C reaches the process group: the service drains, and the detector
    calibration child (a process of its own) does not print its KeyboardInterrupt."""
    db = tmp_path / "db.sqlite"
    args = [OVERSIGHT, "run", "--dev", "--input", "-", "--db", f"sqlite:///{db}"]
    args += ["--set", f"server.port={free_port()}", "--set", f"dead_letter.path={tmp_path / 'd.jsonl'}"]
    proc = subprocess.Popen(
        args,
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        env=ENV,
        start_new_session=True,  # its own group, as a shell's job: the signal reaches only it
    )
    assert proc.stdin is not None
    try:
        proc.stdin.write(b"".join(json.dumps(episode(i)).encode() + b"\n" for i in range(20)))
        proc.stdin.flush()
        # Serving (its records committed, so its signal handlers are in place) with the child alive.
        wait_for(lambda: proc.poll() is not None or stored(db) >= 20, 120, "the records committed")
        wait_for(lambda: proc.poll() is not None or calibration_child(proc.pid), 60, "the calibration child")
        assert proc.poll() is None
        os.killpg(proc.pid, signal.SIGINT)
        _, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(10)
    text = err.decode(errors="replace")
    assert "Traceback" not in text and "KeyboardInterrupt" not in text, text[-3000:]
    assert proc.returncode == 0, text[-2000:]


def test_sigterm_stops_a_batch_command_in_one_line_keeping_what_it_committed(tmp_path: Path) -> None:
    """Kubernetes stops a Job's ``replay`` with SIGTERM to its process alone. The command unwinds as
    on Ctrl-C: one line, status 143, no report claiming a finished replay, and the batches it
    committed kept (its default action ended the process silently, without its cleanup)."""
    db = tmp_path / "db.sqlite"
    report = tmp_path / "report.json"
    args = [OVERSIGHT, "replay", "--input", "-", "--report", str(report), "--db", f"sqlite:///{db}"]
    args += ["--set", f"dead_letter.path={tmp_path / 'd.jsonl'}", "--set", "pipeline.batch_size=10"]
    proc = subprocess.Popen(args, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=ENV)
    assert proc.stdin is not None
    try:
        proc.stdin.write(b"".join(json.dumps(episode(i)).encode() + b"\n" for i in range(20)))
        proc.stdin.flush()  # and left open: the replay waits for more
        wait_for(lambda: proc.poll() is not None or stored(db) >= 20, 120, "the records committed")
        assert proc.poll() is None
        proc.send_signal(signal.SIGTERM)
        out, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)
    text = err.decode(errors="replace")
    assert proc.returncode == 143, text[-2000:]
    assert "Traceback" not in text and text.strip().splitlines()[-1] == "oversight replay: terminated (SIGTERM)"
    assert not out.strip() and not report.exists()
    assert stored(db) == 20


def calibration_child(pid: int) -> bool:
    """Whether process ``pid`` has a child (the detector calibration process, started at build):
    any process in /proc whose parent it is (no /proc/PID/task/*/children, which some kernels lack)."""
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            # "pid (comm) state ppid ...": the command name may hold spaces and parentheses.
            fields = stat.read_text(encoding="ascii", errors="replace").rpartition(")")[2].split()
        except OSError:  # gone meanwhile
            continue
        if len(fields) > 1 and fields[1] == str(pid):
            return True
    return False
