"""HTTP POSTs whose whole exchange has a deadline: connecting, sending, the status line, every
header and the body.

A timeout of a synchronous HTTP client (urllib's, httpx's) bounds each socket read, not the
exchange: a server that sends its headers a byte a second held the caller for as long as it liked
(the action worker's dispatch thread, and with it every retraining request, for hours). Here the
exchange runs as a task on an event loop of its own, under ``asyncio.timeout``, which cancels
whatever read is pending when the deadline comes; the caller's thread waits on the task's future.
The answer's body is read up to ``max_bytes`` (counted decompressed): more is left unread.

Compression is decoded here, never by httpx: it decoded a whole network chunk, every layer of a
``Content-Encoding: gzip, gzip`` or a zstd frame at once, before the size was counted, so 7 KB on
the wire held 8 GB in memory, and on the loop's thread no deadline could interrupt it. The request
asks for ``identity``; an answer in one layer of ``gzip`` or ``deflate`` anyway is decoded at most
``max_bytes + 1`` bytes at a time, and any other encoding is not decoded at all (``Answer.undecodable``).

Redirects are never followed: a redirected POST would carry its signature or API key elsewhere.
Used by the webhook sink (``monitor.actions.sinks``) and the remote reward-model kinds
(``monitor.reward.kinds.resilience``).
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import ssl
import threading
import zlib
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

# Content-Encoding -> zlib's wbits: the encodings decoded here, one layer.
_DECODABLE = {"gzip": 31, "x-gzip": 31, "deflate": 15}


class DeadlineExceeded(TimeoutError):
    """The exchange did not finish within its deadline."""


@dataclass(frozen=True)
class Answer:
    status: int
    headers: Mapping[str, str]
    body: bytes  # at most max_bytes
    complete: bool  # False: the body went on past max_bytes
    # The Content-Encoding of a body that was not decoded (an encoding other than one layer of gzip
    # or deflate, or one that failed to decode): ``body`` is then empty and says nothing.
    undecodable: str | None = None


class DeadlineClient:
    """Thread-safe; one event loop thread and one connection pool per client, started at the
    first request."""

    def __init__(self, name: str, max_connections: int = 16, verify: ssl.SSLContext | bool = True):
        self._name = name
        self._max_connections = max_connections
        self._verify = verify
        self._lock = threading.Lock()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._client: Any = None
        self._closed = False

    def _started(self) -> asyncio.AbstractEventLoop:
        with self._lock:
            if self._closed:
                raise RuntimeError(f"{self._name}: the HTTP client is closed")
            if self._loop is None:
                loop = asyncio.new_event_loop()
                self._thread = threading.Thread(target=loop.run_forever, name=f"{self._name}-http", daemon=True)
                self._thread.start()
                self._loop = loop
            return self._loop

    async def _exchange(
        self,
        url: str,
        content: bytes,
        headers: Mapping[str, str],
        timeout_s: float,
        max_bytes: int,
    ) -> Answer:
        import httpx

        if self._client is None:  # on the loop's thread: the client belongs to this loop
            limits = httpx.Limits(max_connections=self._max_connections)
            self._client = httpx.AsyncClient(follow_redirects=False, limits=limits, verify=self._verify)
        try:
            async with asyncio.timeout(timeout_s):
                request = self._client.build_request(
                    "POST", url, content=content, headers={"Accept-Encoding": "identity", **headers}, timeout=timeout_s
                )
                resp = await self._client.send(request, stream=True)
                try:
                    return await _read(resp, max_bytes)
                finally:
                    await resp.aclose()
        except TimeoutError:
            raise DeadlineExceeded(f"no complete answer within {timeout_s} s") from None

    def post(
        self,
        url: str,
        content: bytes,
        headers: Mapping[str, str],
        *,
        timeout_s: float,
        max_bytes: int,
    ) -> Answer:
        """The answer, its body read up to ``max_bytes``. Raises :class:`DeadlineExceeded`, or what
        httpx raises (``httpx.HTTPError`` and its timeouts, ``httpx.InvalidURL``)."""
        loop = self._started()
        future = asyncio.run_coroutine_threadsafe(self._exchange(url, content, headers, timeout_s, max_bytes), loop)
        try:
            # The task ends itself at the deadline; the margin covers its cancellation.
            return future.result(timeout_s + 5.0)
        except concurrent.futures.TimeoutError:
            future.cancel()
            raise DeadlineExceeded(f"no complete answer within {timeout_s} s") from None

    def close(self) -> None:
        with self._lock:
            self._closed = True
            loop, thread, self._loop = self._loop, self._thread, None
        if loop is None:
            return
        if self._client is not None:
            closing = asyncio.run_coroutine_threadsafe(self._client.aclose(), loop)
            with contextlib.suppress(Exception):  # closing: nothing left to do with an error
                closing.result(5.0)
        loop.call_soon_threadsafe(loop.stop)
        if thread is not None:
            thread.join(5.0)
        if not loop.is_running():
            loop.close()


async def _read(resp: Any, max_bytes: int) -> Answer:
    """The answer with its body decoded, at most ``max_bytes`` of it (see the module)."""
    status, headers = resp.status_code, dict(resp.headers)
    coding = resp.headers.get("content-encoding", "identity").strip().lower() or "identity"
    if coding != "identity" and coding not in _DECODABLE:
        return Answer(status, headers, b"", False, undecodable=coding[:40])
    inflate = zlib.decompressobj(wbits=_DECODABLE[coding]) if coding != "identity" else None
    chunks: list[bytes] = []
    size = 0
    async for raw in resp.aiter_raw():
        try:
            # Never more out than the room left, plus one byte to know the body goes on.
            chunk = raw if inflate is None else inflate.decompress(raw, max_bytes + 1 - size)
        except zlib.error:
            return Answer(status, headers, b"", False, undecodable=f"{coding} (invalid)")
        chunks.append(chunk)
        size += len(chunk)
        if size > max_bytes:
            return Answer(status, headers, b"".join(chunks)[:max_bytes], False)
    return Answer(status, headers, b"".join(chunks), True)
