"""One refusal for text that cannot be stored: a NUL character anywhere in a request, or an
unpaired UTF-16 surrogate in a JSON body.

PostgreSQL's ``text`` refuses NUL (``psycopg.DataError``) and UTF-8 cannot encode a lone
surrogate (``UnicodeEncodeError``), so either one, met by the store or by the encoder of an answer
that echoes it, was a 500 with a traceback in the log: on a sign-in too, before anyone is known,
so anyone could cause one with every request. SQLite stores both, so the same requests passed the
tests there. One check in front of every route, instead of a validator on each string field of each
request model and each query parameter, so that a route added later is covered as well.

No review request carries binary data (there are no uploads), so a NUL *byte* anywhere in a body is
refused whatever its type; ``%00`` in the path, the query or a form body decodes to NUL, and a
JSON body's ``\\u0000`` or unpaired ``\\ud800``-``\\udfff`` escape is found by parsing it (only when
it holds an escape at all: a body without one cannot hold either).
"""

from __future__ import annotations

import json
import re
from typing import Any

from fastapi import HTTPException
from fastapi.responses import JSONResponse
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from monitor.review.schemas import validation_detail

NUL = "NUL characters are not allowed"
SURROGATE = "unpaired UTF-16 surrogates are not allowed"
# json.loads joins a valid surrogate pair into one code point: any surrogate left is unpaired.
_UNSTORABLE = re.compile("[\x00\ud800-\udfff]")


def json_refusal(body: bytes) -> str | None:
    """Why a JSON body cannot be stored (``NUL`` or ``SURROGATE``), or None.

    >>> json_refusal(b'{"flags": ["\\\\ud800"]}') == SURROGATE
    True
    >>> json_refusal(b'{"a": "\\\\ud83d\\\\ude00 \\\\\\\\u0000"}') is None  # a pair; an escaped backslash
    True
    """
    if b"\\u" not in body:
        return None
    try:
        doc = json.loads(body)
    except (ValueError, RecursionError):
        return None  # not JSON: the route refuses it as such
    stack: list[Any] = [doc]
    while stack:  # iterative: a deeply nested document must not exhaust the recursion limit here
        node = stack.pop()
        if isinstance(node, str):
            m = _UNSTORABLE.search(node)
            if m:
                return NUL if m.group() == "\x00" else SURROGATE
        elif isinstance(node, dict):
            stack.extend(node.keys())
            stack.extend(node.values())
        elif isinstance(node, list):
            stack.extend(node)
    return None


def body_refusal(body: bytes, content_type: bytes) -> str | None:
    if b"\x00" in body:
        return NUL
    if content_type.startswith(b"application/x-www-form-urlencoded") and b"%00" in body:
        return NUL
    return json_refusal(body)


def url_refusal(scope: Scope) -> tuple[str, str] | None:
    """(where, why) when the path or the query string holds a NUL."""
    if "\x00" in str(scope.get("path", "")):
        return "path", NUL
    query = bytes(scope.get("query_string", b""))
    if b"%00" in query or b"\x00" in query:
        return "query", NUL
    return None


class StorableText:
    """Refuses (422, FastAPI's validation shape) a request with text that cannot be stored (see the
    module). The body is read whole before the route runs: innermost, inside ``BodyLimit``, so
    that it is never more than ``review.max_request_bytes``; the limit's 413, raised while the body
    is read, is answered here."""

    def __init__(self, app: ASGIApp):
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        refused = url_refusal(scope)
        if refused is not None:
            await self.refuse(refused[0], refused[1], scope, receive, send)
            return
        try:
            body, disconnected = await read_body(receive)
        except HTTPException as e:
            await JSONResponse({"detail": e.detail}, status_code=e.status_code)(scope, receive, send)
            return
        if disconnected:
            return  # the client went away: nobody to answer
        why = body_refusal(body, dict(scope.get("headers") or ()).get(b"content-type", b""))
        if why is not None:
            await self.refuse("body", why, scope, receive, send)
            return
        replayed = False

        async def replay() -> Message:
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": body, "more_body": False}
            return await receive()  # after the body: the disconnect a streaming answer waits for

        await self.app(scope, replay, send)

    @staticmethod
    async def refuse(where: str, why: str, scope: Scope, receive: Receive, send: Send) -> None:
        await JSONResponse(validation_detail((where,), why), status_code=422)(scope, receive, send)


async def read_body(receive: Receive) -> tuple[bytes, bool]:
    """The whole request body, and whether the client disconnected before sending it."""
    chunks: list[bytes] = []
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            return b"", True
        chunks.append(message.get("body", b""))
        if not message.get("more_body", False):
            return b"".join(chunks), False
