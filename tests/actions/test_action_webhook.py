"""The webhook sink against a real HTTP server (conftest.Receiver) that verifies the HMAC signature and the
signed timestamp and processes each Idempotency-Key once; the log sink; building sinks from settings."""

from __future__ import annotations

import json
import logging
import socket
import time
from pathlib import Path
from typing import Any

import pytest
from action_helpers import Receiver
from slow_server import SlowHeaders

from monitor.actions.sinks import KafkaSink, LogSink, SinkError, WebhookSink, encode, make_sinks
from monitor.config import ConfigError, WebhookConfig, load_settings


def request(rid: str = "retrain-0123456789abcdef", **extra: Any) -> dict[str, Any]:
    return {
        "id": rid,
        "kind": "retrain",
        "key": "chat:41",
        "stream": "chat",
        "state": "running",
        "payload": {"events": [41, 42], "signal": "embedding"},
        "created_at": 1_767_225_600.5,
        **extra,
    }


class Sleeps:
    """Records the backoff delays instead of waiting them out (the HTTP traffic itself is real)."""

    def __init__(self) -> None:
        self.delays: list[float] = []

    def __call__(self, seconds: float) -> None:
        self.delays.append(seconds)


def sink(url: str, secret_file: Path, sleeps: Sleeps | None = None, **cfg: Any) -> WebhookSink:
    config = WebhookConfig(url=url, secret_file=str(secret_file), **{"timeout_s": 5, "backoff_s": 0.5, **cfg})
    return WebhookSink(config, sleep=sleeps or Sleeps())


def test_delivery_is_signed_and_carries_the_request(receiver: Receiver, secret_file: Path) -> None:
    req = request(stream="chat\n\u202eevil", payload={"note": "caf\u00e9 <b>"})
    result = sink(receiver.url, secret_file).send(req)
    assert result == {"status": 202, "attempts": 1}
    (d,) = receiver.verified()
    h = d["headers"]
    assert h["idempotency-key"] == req["id"]
    assert h["content-type"] == "application/json"
    assert h["x-oversight-kind"] == "retrain"
    assert abs(int(h["x-oversight-timestamp"]) - time.time()) < 60
    # Canonical JSON: sorted keys, ASCII only, so the receiver's HMAC input is unambiguous.
    body: bytes = d["body"]
    assert body.isascii()
    doc = json.loads(body)
    assert body == encode(doc)
    assert doc == {
        "schema_version": 1,
        "id": req["id"],
        "kind": "retrain",
        "key": "chat:41",
        "stream": "chat\n\u202eevil",
        "payload": {"note": "caf\u00e9 <b>"},
        "created_at": 1_767_225_600.5,
        "sent_at": int(h["x-oversight-timestamp"]),
    }
    assert receiver.processed.keys() == {req["id"]}


def test_5xx_is_retried_with_backoff_until_accepted_and_a_replay_is_recognised(
    receiver: Receiver, secret_file: Path
) -> None:
    receiver.script = [(503, {}), (503, {}), (502, {})]
    sleeps = Sleeps()
    s = sink(receiver.url, secret_file, sleeps, max_attempts=5)
    assert s.send(request()) == {"status": 202, "attempts": 4}
    assert len(receiver.verified()) == 4
    assert sleeps.delays == [0.5, 1.0, 2.0]
    assert list(receiver.processed) == [request()["id"]]
    # The same request again (what a crash between send and finish causes): delivered, not processed twice.
    assert s.send(request())["status"] == 200
    assert receiver.duplicates == [request()["id"]]
    assert len(receiver.processed) == 1


def test_retry_after_is_respected_on_429_and_503(receiver: Receiver, secret_file: Path) -> None:
    later = time.strftime("%a, %d %b %Y %H:%M:%S GMT", time.gmtime(time.time() + 30))
    receiver.script = [(429, {"Retry-After": "3"}), (503, {"Retry-After": later}), (408, {})]
    sleeps = Sleeps()
    assert sink(receiver.url, secret_file, sleeps).send(request())["attempts"] == 4
    assert sleeps.delays[0] == 3.0
    assert 25 <= sleeps.delays[1] <= 31
    assert sleeps.delays[2] == 2.0  # 408 without Retry-After: the exponential backoff


def test_an_excessive_retry_after_is_capped(receiver: Receiver, secret_file: Path) -> None:
    receiver.script = [(503, {"Retry-After": "86400"})]
    sleeps = Sleeps()
    sink(receiver.url, secret_file, sleeps).send(request())
    assert sleeps.delays == [120.0]


def test_transient_failures_give_up_after_max_attempts(receiver: Receiver, secret_file: Path) -> None:
    receiver.script = [(503, {})] * 10
    sleeps = Sleeps()
    with pytest.raises(SinkError) as e:
        sink(receiver.url, secret_file, sleeps, max_attempts=3).send(request())
    assert not e.value.permanent
    assert str(e.value) == "transient failure, gave up after 3 attempts: HTTP 503 Service Unavailable"
    assert len(receiver.verified()) == 3
    assert sleeps.delays == [0.5, 1.0]
    assert receiver.processed == {}


def test_connection_refused_is_transient(secret_file: Path) -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # closed again: nothing listens there
    sleeps = Sleeps()
    with pytest.raises(SinkError) as e:
        sink(f"http://127.0.0.1:{port}/", secret_file, sleeps, max_attempts=3).send(request())
    assert not e.value.permanent
    assert "gave up after 3 attempts: connection error" in str(e.value)
    assert sleeps.delays == [0.5, 1.0]


@pytest.mark.parametrize("status", [400, 404, 422])
def test_other_4xx_fail_at_once(receiver: Receiver, secret_file: Path, status: int) -> None:
    receiver.script = [(status, {})]
    sleeps = Sleeps()
    with pytest.raises(SinkError) as e:
        sink(receiver.url, secret_file, sleeps).send(request())
    assert e.value.permanent
    assert str(e.value).startswith(f"permanent failure: HTTP {status}")
    assert len(receiver.deliveries) == 1
    assert sleeps.delays == []


def test_a_wrong_secret_is_refused_by_the_receiver(receiver: Receiver, tmp_path: Path) -> None:
    wrong = tmp_path / "wrong"
    wrong.write_text("not-the-secret")
    with pytest.raises(SinkError) as e:
        sink(receiver.url, wrong).send(request())
    assert e.value.permanent
    assert "HTTP 401" in str(e.value)
    assert receiver.verified() == [] and len(receiver.deliveries) == 1


def test_a_rotated_secret_is_used_at_the_next_delivery(receiver: Receiver, secret_file: Path) -> None:
    s = sink(receiver.url, secret_file)
    s.send(request("retrain-a"))
    secret_file.write_text("rotated-secret")
    receiver.secret = b"rotated-secret"
    s.send(request("retrain-b"))
    assert set(receiver.processed) == {"retrain-a", "retrain-b"}


def test_redirects_are_not_followed(secret_file: Path, receiver: Receiver) -> None:
    receiver.script = [(307, {"Location": receiver.url + "/elsewhere"})]
    with pytest.raises(SinkError) as e:
        sink(receiver.url, secret_file).send(request())
    assert e.value.permanent and "HTTP 307" in str(e.value)
    assert len(receiver.deliveries) == 1


def test_configuration_is_checked_up_front(tmp_path: Path) -> None:
    good = tmp_path / "s"
    good.write_text("x")
    with pytest.raises(ConfigError, match="url is required"):
        WebhookSink(WebhookConfig(secret_file=str(good)))
    with pytest.raises(ConfigError, match="http"):
        WebhookSink(WebhookConfig(url="file:///etc/passwd", secret_file=str(good)))
    with pytest.raises(ConfigError, match="secret_file is required"):
        WebhookSink(WebhookConfig(url="http://127.0.0.1:1/", secret_file=None))
    with pytest.raises(ConfigError, match="cannot read"):
        WebhookSink(WebhookConfig(url="http://127.0.0.1:1/", secret_file=str(tmp_path / "missing")))
    empty = tmp_path / "empty"
    empty.write_text("\n")
    with pytest.raises(ConfigError, match="empty"):
        WebhookSink(WebhookConfig(url="http://127.0.0.1:1/", secret_file=str(empty)))


def test_malformed_requests_are_permanent_failures(receiver: Receiver, secret_file: Path) -> None:
    s = sink(receiver.url, secret_file)
    for bad in (request(kind="deploy"), request(id=""), request(payload={"x": float("nan")})):
        with pytest.raises(SinkError) as e:
            s.send(bad)
        assert e.value.permanent
    assert receiver.deliveries == []


def test_log_sink_writes_one_escaped_line(caplog: pytest.LogCaptureFixture) -> None:
    req = request(stream="chat\nFAKE LOG LINE \u202e")
    with caplog.at_level(logging.INFO, logger="monitor.actions"):
        assert LogSink().send(req) == {"logged": True}
    (rec,) = caplog.records
    line = rec.getMessage()
    assert "\n" not in line and line.isascii()
    assert json.loads(line.removeprefix("action request "))["stream"] == req["stream"]


def test_make_sinks_builds_the_named_sinks(secret_file: Path, tmp_path: Path) -> None:
    settings = load_settings(
        None,
        [
            "dev=true",
            "actions.webhook.url=http://127.0.0.1:9/hook",
            f"actions.webhook.secret_file={secret_file}",
            f"actions.kubernetes.templates_dir={tmp_path}",
        ],
    )
    sinks = make_sinks(["log", "webhook", "kubernetes"], settings)
    assert [s.name for s in sinks] == ["log", "webhook", "kubernetes"]
    with pytest.raises(ConfigError, match="not a sink"):
        make_sinks(["local"], settings)
    with pytest.raises(ConfigError, match="unknown action sink"):
        make_sinks(["carrier-pigeon"], settings)
    with pytest.raises(ConfigError, match="twice"):
        make_sinks(["log", "log"], settings)
    assert KafkaSink.name == "kafka"


def test_an_odd_retry_after_is_the_backoff_not_a_crash(receiver: Receiver, secret_file: Path) -> None:
    """ "²" passed str.isdigit() and then failed float(): the delivery ended with a ValueError after
    one attempt and the request was marked failed for good."""
    receiver.script = [(503, {"Retry-After": "²"}), (503, {"Retry-After": "-1"})]
    sleeps = Sleeps()
    assert sink(receiver.url, secret_file, sleeps).send(request())["attempts"] == 3
    assert sleeps.delays == [0.5, 1.0]  # neither header is delta-seconds or a date: the backoff


def test_a_receiver_that_sends_its_headers_a_byte_at_a_time_is_a_timeout(secret_file: Path) -> None:
    """urllib's timeout bounded each read: such a receiver held the dispatch thread, and every request
    behind it, for hours, with no error counted. Each attempt now has a deadline on the whole exchange."""
    server = SlowHeaders()
    t0 = time.monotonic()
    try:
        with pytest.raises(SinkError, match=r"no complete answer within 1\.0 s") as e:
            sink(f"{server.url}/", secret_file, Sleeps(), timeout_s=1.0, max_attempts=2).send(request())
        assert not e.value.permanent and time.monotonic() - t0 < 6 and len(server.conns) == 2
    finally:
        server.close()
