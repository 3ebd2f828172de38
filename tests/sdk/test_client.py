"""oversight_client against a stand-in of the ingest API (sdk_helpers.StandIn, a real HTTP
server whose answers each test scripts): buffer policies, retries, rejections, flush and close,
and that the counters account for every episode."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
import threading
from datetime import UTC, datetime, timedelta
from email.utils import format_datetime
from pathlib import Path

import pytest
from oversight_client import (
    Backoff,
    BufferFull,
    Client,
    ClientClosed,
    Result,
    Stats,
    chat_episode,
    message,
    text_episode,
    tool_call,
)
from oversight_client.retry import parse_retry_after
from sdk_helpers import Planned, StandIn, ep

FAST = Backoff(initial_s=0.01, max_s=0.05)
SDK = Path(__file__).resolve().parents[2] / "sdk" / "python"


def balanced(s: Stats) -> bool:
    return s.enqueued == s.accepted + s.duplicates + s.rejected + s.dropped + s.failed + s.pending


def client(standin: StandIn, results: list[Result] | None = None, **kw: object) -> Client:
    settings: dict[str, object] = {"backoff": FAST, "flush_interval_s": 0.05, **kw}
    return Client(standin.url, "tok", on_result=results.append if results is not None else None, **settings)  # type: ignore[arg-type]


def test_delivers_and_reports_per_record_results(standin: StandIn) -> None:
    results: list[Result] = []
    with client(standin, results) as c:
        for i in range(10):
            c.log(ep(i))
        c.log({"episode_id": "bad", "prompt": "no response"})
        c.log(ep(0))  # the same id again: the server says duplicate
        assert c.flush(10)
        s = c.stats
    assert (s.enqueued, s.accepted, s.rejected, s.duplicates, s.pending, s.retries) == (12, 10, 1, 1, 0, 0)
    assert balanced(s)
    bad = [r for r in results if r.episode_id == "bad"]
    assert bad == [Result("bad", "rejected", "missing_field", "response")]
    assert set(standin.stored) == {f"e-s-{i}" for i in range(10)}


def test_fills_episode_id_and_default_stream(standin: StandIn) -> None:
    results: list[Result] = []
    with client(standin, results, stream="chat") as c:
        c.log({"prompt": "p", "response": "r"})
        c.log({"prompt": "p", "response": "r", "stream": "other"})
    lines = [json.loads(x) for b in standin.bodies for x in b.splitlines()]
    assert [x["stream"] for x in lines] == ["chat", "other"]
    assert all(len(x["episode_id"]) == 32 for x in lines)
    assert sorted(r.episode_id for r in results) == sorted(x["episode_id"] for x in lines)


def test_log_snapshots_the_record(standin: StandIn) -> None:
    record = ep(1)
    with client(standin, flush_interval_s=5) as c:
        c.log(record)
        record["response"] = "changed after log"
    assert json.loads(standin.bodies[0])["response"] == "a1"


def test_retries_429_honouring_retry_after(standin: StandIn) -> None:
    standin.plan.append(Planned(429, {"Retry-After": "1"}))
    with client(standin) as c:
        c.log(ep(1))
        assert c.flush(10)
        s = c.stats
    assert (s.accepted, s.retries, s.requests) == (1, 1, 2)
    # The backoff alone would wait 5-10 ms; the server asked for a second.
    assert standin.request_times[1] - standin.request_times[0] >= 0.95


def test_retries_503_5xx_and_dropped_connections(standin: StandIn) -> None:
    standin.plan.extend([Planned(503, {"Retry-After": "0"}), Planned(drop=True), Planned(500), Planned(502)])
    with client(standin) as c:
        for i in range(5):
            c.log(ep(i))
        assert c.flush(10)
        s = c.stats
    assert (s.accepted, s.retries, s.failed) == (5, 4, 0)
    assert len(standin.stored) == 5


def test_retries_are_bounded_and_failures_counted(standin: StandIn) -> None:
    standin.plan.extend([Planned(503)] * 10)
    results: list[Result] = []
    with client(standin, results, max_retries=2) as c:
        c.log(ep(1))
        assert c.flush(10)
        s = c.stats
    assert (s.failed, s.retries, s.requests, s.accepted) == (1, 2, 3, 0)
    assert results == [Result("e-s-1", "failed", "http_503")]


def test_rejection_and_auth_errors_are_final(standin: StandIn) -> None:
    with client(standin) as c:
        c.log({"episode_id": "bad", "prompt": "p"})
        assert c.flush(10)
        assert (c.stats.rejected, c.stats.retries, c.stats.requests) == (1, 0, 1)
    results: list[Result] = []
    with Client(standin.url, "wrong", backoff=FAST, on_result=results.append) as c:
        c.log(ep(1))
        assert c.flush(10)
        s = c.stats
    assert (s.failed, s.retries, s.requests) == (1, 0, 1)
    assert [(r.status, r.reason) for r in results] == [("failed", "http_401")]


def test_too_large_batch_is_split(standin: StandIn) -> None:
    standin.max_records = 3
    with client(standin, batch_size=10, flush_interval_s=5) as c:
        for i in range(10):
            c.log(ep(i))
        assert c.flush(10)
        s = c.stats
    assert (s.accepted, s.failed, s.retries) == (10, 0, 0)
    sizes = [len(b.splitlines()) for b in standin.bodies]
    assert sizes == [10, 5, 2, 3, 5, 2, 3]  # halves until each fits
    standin.max_records = 0  # even one record is too large: final rejection, no loop
    results: list[Result] = []
    with client(standin, results) as c:
        c.log(ep(99))
    assert [(r.status, r.reason) for r in results] == [("rejected", "oversize")]


def hold_one_in_flight(standin: StandIn, c: Client) -> None:
    """Make the sender's first request wait at the server, so the buffer fills behind it."""
    standin.gate.clear()
    c.log(ep(0))
    assert standin.arrived.wait(10)


def test_full_buffer_drop_oldest_counts_drops(standin: StandIn) -> None:
    results: list[Result] = []
    c = client(standin, results, max_buffer=5, batch_size=1, on_full="drop_oldest")
    hold_one_in_flight(standin, c)
    for i in range(1, 9):
        c.log(ep(i))
    s = c.stats
    assert (s.enqueued, s.dropped, s.pending) == (9, 3, 6)
    standin.gate.set()
    s = c.close(10)
    assert (s.accepted, s.dropped, s.pending) == (6, 3, 0)
    assert balanced(s)
    assert sorted(r.episode_id for r in results if r.status == "dropped") == ["e-s-1", "e-s-2", "e-s-3"]
    assert set(standin.stored) == {f"e-s-{i}" for i in (0, 4, 5, 6, 7, 8)}


def test_full_buffer_raise(standin: StandIn) -> None:
    c = client(standin, max_buffer=2, batch_size=1, on_full="raise")
    hold_one_in_flight(standin, c)
    c.log(ep(1))
    c.log(ep(2))
    with pytest.raises(BufferFull):
        c.log(ep(3))
    assert (c.stats.enqueued, c.stats.pending) == (3, 3)  # the refused one is not counted
    standin.gate.set()
    s = c.close(10)
    assert (s.accepted, s.dropped, s.pending) == (3, 0, 0)


def test_full_buffer_block_waits_for_room(standin: StandIn) -> None:
    c = client(standin, max_buffer=1, batch_size=1, on_full="block")
    hold_one_in_flight(standin, c)
    c.log(ep(1))
    blocked = threading.Thread(target=c.log, args=(ep(2),))
    blocked.start()
    blocked.join(0.5)
    assert blocked.is_alive()  # no room until the server answers
    standin.gate.set()
    blocked.join(10)
    assert not blocked.is_alive()
    s = c.close(10)
    assert (s.accepted, s.dropped, s.enqueued) == (3, 0, 3)


def test_full_buffer_block_times_out(standin: StandIn) -> None:
    c = client(standin, max_buffer=1, batch_size=1, on_full="block", block_timeout_s=0.2)
    hold_one_in_flight(standin, c)
    c.log(ep(1))
    with pytest.raises(BufferFull):
        c.log(ep(2))
    standin.gate.set()
    assert c.close(10).accepted == 2


def test_close_flushes_and_refuses_later_logs(standin: StandIn) -> None:
    c = client(standin, batch_size=1000, flush_interval_s=60)
    for i in range(50):
        c.log(ep(i))
    s = c.close(10)
    assert (s.accepted, s.pending) == (50, 0)
    assert len(standin.bodies) == 1
    with pytest.raises(ClientClosed):
        c.log(ep(99))
    assert c.close().accepted == 50  # idempotent


def test_close_gives_up_on_an_endless_outage(standin: StandIn) -> None:
    standin.plan.extend([Planned(503)] * 10_000)
    results: list[Result] = []
    c = client(standin, results, max_retries=None)
    for i in range(3):
        c.log(ep(i))
    s = c.close(0.5)
    assert (s.failed, s.pending, s.accepted) == (3, 0, 0)
    assert {r.status for r in results} == {"failed"}


def test_flushes_at_interpreter_exit(standin: StandIn) -> None:
    script = textwrap.dedent(f"""
        from oversight_client import Client
        c = Client({standin.url!r}, "tok", flush_interval_s=60)
        for i in range(20):
            c.log({{"episode_id": f"x{{i}}", "prompt": "p", "response": "r"}})
    """)
    subprocess.run([sys.executable, "-c", script], check=True, timeout=60)
    assert set(standin.stored) == {f"x{i}" for i in range(20)}


def test_stats_add_up_across_threads(standin: StandIn) -> None:
    accepted: set[str] = set()
    lock = threading.Lock()

    def on_result(r: Result) -> None:
        if r.status == "accepted":
            with lock:
                accepted.add(r.episode_id)

    standin.plan.extend([Planned(503), Planned(drop=True), Planned(429, {"Retry-After": "0"})])
    c = Client(standin.url, "tok", backoff=FAST, batch_size=100, flush_interval_s=0.05, on_result=on_result)

    def work(t: int) -> None:
        for i in range(500):
            c.log(ep(i, f"t{t}") if i % 50 else {"episode_id": f"bad-{t}-{i}", "prompt": "p"})

    threads = [threading.Thread(target=work, args=(t,)) for t in range(8)]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    s = c.close(30)
    assert balanced(s)
    assert (s.enqueued, s.accepted, s.rejected, s.failed, s.dropped) == (4000, 3920, 80, 0, 0)
    assert accepted == set(standin.stored)


def test_a_failing_callback_does_not_stop_delivery(standin: StandIn) -> None:
    def boom(r: Result) -> None:
        raise RuntimeError("application bug")

    with Client(standin.url, "tok", flush_interval_s=0.05, on_result=boom) as c:
        for i in range(3):
            c.log(ep(i))
        assert c.flush(10)
        assert c.stats.accepted == 3


def test_serialization(standin: StandIn) -> None:
    with client(standin) as c:
        # A lone surrogate (broken model output) is sent escaped for the server to judge.
        c.log(ep(1, response="bad \ud800 text"))
        with pytest.raises(TypeError):
            c.log(ep(2, metadata={"when": object()}))
        with pytest.raises(TypeError):
            c.log(["not", "a", "mapping"])  # type: ignore[arg-type]
        nested: dict[str, object] = {}
        cur = nested
        for _ in range(100_000):
            cur["x"] = cur = {}
        with pytest.raises(ValueError):
            c.log(ep(3, metadata=nested))
        assert c.flush(10)
        assert c.stats.enqueued == 1
    assert b"\\ud800" in standin.bodies[0]
    assert b"\n" not in standin.bodies[0].rstrip(b"\n")  # one NDJSON line per record


def test_episode_helpers(standin: StandIn) -> None:
    conv = chat_episode(
        [
            message("system", "be brief"),
            message("user", "weather?"),
            message("assistant", None, tool_calls=[tool_call("c1", "weather", '{"city": "Paris"}')]),
            message("tool", "21 C", tool_call_id="c1"),
            message("assistant", "21 C in Paris."),
        ],
        stream="agent",
        model="m1",
        metadata={"k": 1},
    )
    assert conv["schema_version"] == 2 and conv["messages"][2]["tool_calls"][0]["function"]["name"] == "weather"
    v1 = text_episode("p", "r", episode_id="id1", timestamp=5)
    assert v1 == {"episode_id": "id1", "timestamp": 5, "prompt": "p", "response": "r"}
    with client(standin) as c:
        c.log(conv)
        c.log(v1)
    assert c.stats.accepted == 2


def test_retry_after_and_backoff() -> None:
    now = datetime(2026, 1, 1, tzinfo=UTC)
    assert parse_retry_after("3") == 3.0
    assert parse_retry_after(" 1.5 ") == 1.5
    assert parse_retry_after(format_datetime(now + timedelta(seconds=30), usegmt=True), now) == pytest.approx(30)
    assert parse_retry_after(format_datetime(now - timedelta(seconds=30), usegmt=True), now) == 0.0
    for bad in (None, "", "soon", "-1", "1e999999"):
        assert parse_retry_after(bad) is None or parse_retry_after(bad) == float("inf")
    b = Backoff(initial_s=0.1, max_s=1.0)
    assert all(0.05 <= b.delay(0) <= 0.1 for _ in range(100))
    assert all(0.5 <= b.delay(10) <= 1.0 for _ in range(100))
    assert b.delay(0, retry_after_s=5) == 5
    assert b.delay(0, retry_after_s=1e9) == 60.0
    with pytest.raises(ValueError):
        Backoff(initial_s=0)


def test_invalid_settings_fail_at_construction(standin: StandIn) -> None:
    with pytest.raises(ValueError):
        Client(standin.url, on_full="ignore")  # type: ignore[arg-type]
    with pytest.raises(ValueError):
        Client(standin.url, max_buffer=0)
    with pytest.raises(ValueError):
        Client(standin.url, batch_size=0)


def test_import_is_light() -> None:
    """The client never pulls the monitor, torch, transformers or kafka-python into an application."""
    code = (
        "import sys, json, oversight_client; c = oversight_client.Client('http://127.0.0.1:9'); c.close(0);"
        "print(json.dumps(sorted({m.split('.')[0] for m in sys.modules})))"
    )
    out = subprocess.run([sys.executable, "-c", code], check=True, capture_output=True, text=True, timeout=60)
    loaded = set(json.loads(out.stdout))
    assert "oversight_client" in loaded and "httpx" in loaded
    assert not loaded & {"torch", "transformers", "monitor", "kafka", "numpy", "sampling", "detectors"}
