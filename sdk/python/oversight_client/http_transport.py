"""Delivery over the monitor's HTTP ingest API (``POST /v1/episodes``, NDJSON), and :class:`Client`."""

from __future__ import annotations

import json
from collections.abc import Mapping
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
            hdrs["Authorization"] = f"Bearer {token}"
        self._url = endpoint(url)
        self._http = httpx.Client(timeout=timeout_s, headers=hdrs, transport=transport)

    def deliver(self, batch: list[Item], ctx: Delivery) -> None:
        stack = [batch]
        while stack:
            chunk = stack.pop()
            resp = self._post(chunk, ctx)
            if resp is None:
                continue  # failed and reported
            if resp.status_code == 413 and len(chunk) > 1:
                half = len(chunk) // 2
                stack += [chunk[half:], chunk[:half]]
                continue
            report(chunk, resp, ctx)

    def _post(self, chunk: list[Item], ctx: Delivery) -> httpx.Response | None:
        """The first final answer (2xx or a non-retryable error), or None once retries are spent."""
        body = b"\n".join(i.payload for i in chunk) + b"\n"
        attempt = 0
        while True:
            ctx.request()
            try:
                resp = self._http.post(self._url, content=body)
            except httpx.TransportError as e:
                # Refused, reset or timed out: the server may have stored the batch before it
                # died, and a retry is then answered "duplicate" (idempotent by episode_id).
                reason, retry_after = f"connection_error: {type(e).__name__}", None
            else:
                if not retryable(resp.status_code):
                    return resp
                reason, retry_after = f"http_{resp.status_code}", parse_retry_after(resp.headers.get("retry-after"))
            if not ctx.retry(attempt, retry_after):
                ctx.results(chunk, "failed", reason)
                return None
            attempt += 1

    def close(self) -> None:
        self._http.close()


def retryable(status: int) -> bool:
    return status >= 500 or status in RETRYABLE_4XX


def report(chunk: list[Item], resp: httpx.Response, ctx: Delivery) -> None:
    """Per-record results of a final answer."""
    detail = resp.text[:MAX_DETAIL_CHARS] or None
    if resp.status_code == 413:
        ctx.results(chunk, "rejected", "oversize", detail)
    elif not resp.is_success:
        ctx.results(chunk, "failed", f"http_{resp.status_code}", detail)
    else:
        for index, (status, reason, why) in per_record(resp, len(chunk)).items():
            ctx.result(chunk[index], status, reason, why)
        # A 2xx is a durable hand-off of every record it does not say otherwise about.
        ctx.results(chunk, "accepted")


def per_record(resp: httpx.Response, n: int) -> dict[int, tuple[Status, str | None, str | None]]:
    """``{index: (status, reason, detail)}`` from the body's ``results``; unreadable entries are skipped."""
    try:
        results = resp.json().get("results")
    except (ValueError, AttributeError):
        return {}
    out: dict[int, tuple[Status, str | None, str | None]] = {}
    for r in results if isinstance(results, list) else ():
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

        client = Client("https://monitor.example.com", token=os.environ["OVERSIGHT_INGEST_TOKEN"])
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
