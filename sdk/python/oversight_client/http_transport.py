"""Delivery over the monitor's HTTP ingest API (``POST /v1/episodes``, NDJSON), and :class:`Client`."""

from __future__ import annotations

import contextlib
import json
import socket
import threading
import time
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import httpx

from oversight_client.buffer import Item, OnFull
from oversight_client.core import BaseClient, Delivery, OnResult
from oversight_client.retry import Backoff, parse_retry_after
from oversight_client.stats import Status

ENDPOINT = "/v1/episodes"
# Worth retrying: the server is busy (429), restarting or its hand-off is down (5xx), or slow (408).
# Every other 4xx is final: retrying a bad token or a malformed request cannot succeed.
RETRYABLE_4XX = frozenset({408, 425, 429})
_RESULT_STATUS: dict[str, Status] = {"duplicate": "duplicate", "rejected": "rejected"}
# The server's words end up in the application's logs: keep them short.
MAX_DETAIL_CHARS = 500
# An answer of the ingest API lists a result per record: under 100 bytes each, and a request holds at
# most 10,000 records. Read whole, an answer could be anything: a gzip answer of a megabyte took the
# serving process to 3 GB, one that never ended grew it by 250 MB a second.
MAX_ANSWER_BYTES = 8 * 2**20


@dataclass(frozen=True)
class Answer:
    """A final answer of the server: its status, its headers, and its body (at most
    ``MAX_ANSWER_BYTES``; ``complete`` is False when it went on)."""

    status: int
    headers: httpx.Headers
    body: bytes
    complete: bool

    @property
    def text(self) -> str:
        return self.body.decode("utf-8", "replace")


def endpoint(url: str) -> str:
    """``url`` itself if it names the endpoint, else the endpoint under it."""
    url = url.rstrip("/")
    return url if url.endswith(ENDPOINT) else url + ENDPOINT


class HttpTransport:
    """POSTs a batch as NDJSON; splits a batch the server finds too large (413) in halves."""

    def __init__(
        self,
        url: str,
        token: str | None,
        timeout_s: float,
        headers: Mapping[str, str] | None = None,
        transport: httpx.BaseTransport | None = None,
    ):
        hdrs = {"Content-Type": "application/x-ndjson", "User-Agent": "oversight-client/0.1", **(headers or {})}
        if token:
            if not all("!" <= c <= "~" for c in token):
                # Sent, a CR or LF was refused at every attempt as a "connection error".
                raise ValueError("token holds a space, a control or a non-ASCII character (a line break from a file?)")
            hdrs["Authorization"] = f"Bearer {token}"
        self._url = endpoint(url)
        self._timeout_s = timeout_s
        # One connection: the sender posts one batch at a time, so the socket the last connection
        # opened is the one an exchange reads from (see _exchange).
        limits = httpx.Limits(max_connections=1, max_keepalive_connections=1)
        self._http = httpx.Client(timeout=timeout_s, headers=hdrs, transport=transport, limits=limits)
        self._socket: socket.socket | None = None

    def deliver(self, batch: list[Item], ctx: Delivery) -> None:
        stack = [batch]
        while stack:
            chunk = stack.pop()
            resp = self._post(chunk, ctx)
            if resp is None:
                continue  # failed and reported
            if resp.status == 413 and len(chunk) > 1:
                half = len(chunk) // 2
                stack += [chunk[half:], chunk[:half]]
                continue
            report(chunk, resp, ctx)

    def _post(self, chunk: list[Item], ctx: Delivery) -> Answer | None:
        """The first final answer (2xx or a non-retryable error), or None once retries are spent."""
        body = b"\n".join(i.payload for i in chunk) + b"\n"
        attempt = 0
        while True:
            ctx.request()
            try:
                answer = self._exchange(body)
            except (httpx.HTTPError, TimeoutError) as e:
                # Refused, reset, timed out, or an answer that does not decode: the server may have
                # stored the batch before it died, and a retry is then answered "duplicate"
                # (idempotent by episode_id).
                reason, retry_after = f"connection_error: {type(e).__name__}", None
            else:
                if not retryable(answer.status):
                    return answer
                reason, retry_after = f"http_{answer.status}", parse_retry_after(answer.headers.get("retry-after"))
            if not ctx.retry(attempt, retry_after):
                ctx.results(chunk, "failed", reason)
                return None
            attempt += 1

    def _exchange(self, body: bytes) -> Answer:
        """One request, its answer read up to ``MAX_ANSWER_BYTES`` (decompressed) and within
        ``timeout_s`` of its start. httpx's timeout bounds each read: an answer sent a byte every
        two seconds held the sender, and every batch behind it, for good. The body's reads check
        the deadline between pieces; the status line and headers are read inside httpx, so a
        watchdog shuts the connection's socket down at the deadline, which ends the read there
        (a transport given to the client opens no socket of ours: only the body is bounded then)."""
        deadline = time.monotonic() + self._timeout_s
        cut = threading.Event()
        watchdog = threading.Timer(self._timeout_s, self._hang_up, (cut,))
        watchdog.daemon = True
        watchdog.start()
        try:
            with self._http.stream("POST", self._url, content=body, extensions={"trace": self._trace}) as resp:
                chunks: list[bytes] = []
                size = 0
                for piece in resp.iter_bytes():
                    chunks.append(piece)
                    size += len(piece)
                    if size > MAX_ANSWER_BYTES:
                        break
                    if time.monotonic() > deadline:
                        raise TimeoutError(f"the answer still arriving after {self._timeout_s} s")
                if cut.is_set():  # the shutdown ends a body read to the connection's end as an end
                    raise TimeoutError(f"no complete answer within {self._timeout_s} s")
                data = b"".join(chunks)
                return Answer(resp.status_code, resp.headers, data[:MAX_ANSWER_BYTES], size <= MAX_ANSWER_BYTES)
        except httpx.HTTPError:
            if cut.is_set():
                raise TimeoutError(f"no complete answer within {self._timeout_s} s") from None
            raise
        finally:
            watchdog.cancel()

    def _trace(self, event: str, info: Mapping[str, Any]) -> None:
        """httpcore's trace hook: remembers the socket of each new connection."""
        if event == "connection.connect_tcp.complete":
            stream = info.get("return_value")
            sock = stream.get_extra_info("socket") if stream is not None else None
            self._socket = sock if isinstance(sock, socket.socket) else None

    def _hang_up(self, cut: threading.Event) -> None:
        """The exchange's deadline: its connection's socket is shut down (the connection is not
        reused after the error it gives; the next exchange opens another)."""
        sock = self._socket
        if sock is None:
            return
        cut.set()
        with contextlib.suppress(OSError):  # already closed: the exchange is over
            sock.shutdown(socket.SHUT_RDWR)

    def close(self) -> None:
        self._http.close()


def retryable(status: int) -> bool:
    return status >= 500 or status in RETRYABLE_4XX


def report(chunk: list[Item], resp: Answer, ctx: Delivery) -> None:
    """Per-record results of a final answer."""
    detail = resp.text[:MAX_DETAIL_CHARS] or None
    if resp.status == 413:
        ctx.results(chunk, "rejected", "oversize", detail)
    elif not 200 <= resp.status < 300:
        ctx.results(chunk, "failed", f"http_{resp.status}", detail)
    else:
        results = ingest_results(resp)
        if results is None:
            # Not the ingest API's answer (a proxy's page, a wrong path): nothing says the records
            # were stored. They counted as accepted, and were lost without a word.
            ctx.results(chunk, "failed", "unexpected_answer", detail)
            return
        for index, (status, reason, why) in per_record(results, len(chunk)).items():
            ctx.result(chunk[index], status, reason, why)
        # A 2xx is a durable hand-off of every record it does not say otherwise about.
        ctx.results(chunk, "accepted")


def ingest_results(resp: Answer) -> list[Any] | None:
    """The ``results`` list of an answer of the ingest API; None when the answer is not one."""
    if not resp.complete:
        return None
    try:
        data = json.loads(resp.body)
    except (ValueError, RecursionError):
        return None
    results = data.get("results") if isinstance(data, dict) else None
    return results if isinstance(results, list) else None


def per_record(results: list[Any], n: int) -> dict[int, tuple[Status, str | None, str | None]]:
    """``{index: (status, reason, detail)}`` from the answer's ``results``; unreadable entries are skipped."""
    out: dict[int, tuple[Status, str | None, str | None]] = {}
    for r in results:
        if not isinstance(r, dict):
            continue
        index, status = r.get("index"), r.get("status")
        if type(index) is not int or not 0 <= index < n or status == "accepted":
            continue
        known = _RESULT_STATUS.get(status) if isinstance(status, str) else None
        if known is None:
            out[index] = ("rejected", f"unknown_status: {str(status)[:40]}", _short(r.get("detail")))
        else:
            out[index] = (known, _short(r.get("reason")), _short(r.get("detail")))
    return out


def _short(value: Any) -> str | None:
    if value is None:
        return None
    s = value if isinstance(value, str) else json.dumps(value)
    return s[:MAX_DETAIL_CHARS]


class Client(BaseClient):
    """Logs episodes to the monitor's HTTP ingest API.

    Example::

        client = Client("https://monitor.example.com", token=os.environ["MONITOR_INGEST_TOKEN"])
        client.log({"prompt": "2+2?", "response": "4", "stream": "chat"})

    ``url`` is the service's base URL (``/v1/episodes`` is appended) or the endpoint itself.
    ``token`` is an ingest token (``Authorization: Bearer``). ``stream`` is the default for
    episodes that name none. Batches of up to ``batch_size`` episodes go out when that many wait,
    else every ``flush_interval_s``. A full buffer (``max_buffer`` episodes) drops the oldest
    (counted), blocks the caller (up to ``block_timeout_s``) or raises, per ``on_full``.
    429, 5xx, timeouts and connection errors are retried up to ``max_retries`` times (None:
    until close) with ``backoff`` and at least the server's ``Retry-After``; a record the server
    rejects is final. ``on_result`` receives each episode's :class:`Result` (on the sender thread,
    or on the caller's for a drop). See :attr:`stats`.
    """

    def __init__(
        self,
        url: str,
        token: str | None = None,
        *,
        stream: str | None = None,
        batch_size: int = 500,
        flush_interval_s: float = 1.0,
        max_buffer: int = 100_000,
        on_full: OnFull = "drop_oldest",
        block_timeout_s: float | None = None,
        timeout_s: float = 10.0,
        max_retries: int | None = 10,
        backoff: Backoff | None = None,
        on_result: OnResult | None = None,
        headers: Mapping[str, str] | None = None,
        http_transport: httpx.BaseTransport | None = None,
    ):
        super().__init__(
            HttpTransport(url, token, timeout_s, headers, http_transport),
            stream=stream,
            batch_size=batch_size,
            flush_interval_s=flush_interval_s,
            max_buffer=max_buffer,
            on_full=on_full,
            block_timeout_s=block_timeout_s,
            max_retries=max_retries,
            backoff=backoff,
            on_result=on_result,
        )
