"""A stand-in for the monitor's ``POST /v1/episodes`` (the real server is ``oversight ingest
serve``, tested in test_sdk_e2e.py): a real HTTP server on a local port whose answers the tests
script (429, 503, 413, a dropped connection, a held request) to drive the client's policies.

It answers like the real API: ``{"accepted", "duplicates", "rejected", "results": [{"index",
"episode_id", "status", "reason", "detail"}]}``, idempotent by episode_id; a record without a
``response`` is rejected as ``missing_field``.
"""

from __future__ import annotations

import json
import threading
import time
from collections import Counter, deque
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any


@dataclass
class Planned:
    """The answer to one coming request instead of the normal one."""

    status: int = 200
    headers: dict[str, str] = field(default_factory=dict)
    # Close the connection without answering (the client sees a protocol error).
    drop: bool = False


class StandIn:
    def __init__(self, token: str = "tok") -> None:
        self.token = token
        self.plan: deque[Planned] = deque()
        self.stored: Counter[str] = Counter()
        self.bodies: list[bytes] = []
        self.request_times: list[float] = []
        self.max_records: int | None = None  # 413 above this many records in one request
        self.gate = threading.Event()  # cleared: requests wait until it is set again
        self.gate.set()
        self.arrived = threading.Event()  # set by every request, before the gate
        self.lock = threading.Lock()
        self._server = ThreadingHTTPServer(("127.0.0.1", 0), self._handler())
        self._server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self._server.server_address[1]}"
        self._thread = threading.Thread(target=self._server.serve_forever, args=(0.05,), daemon=True)
        self._thread.start()

    def close(self) -> None:
        self.gate.set()
        self._server.shutdown()
        self._server.server_close()

    def answer(self, body: bytes) -> tuple[int, dict[str, Any]]:
        lines = [ln for ln in body.split(b"\n") if ln.strip()]
        if self.max_records is not None and len(lines) > self.max_records:
            return 413, {"reason": "too_large"}
        results = [self._record(i, ln) for i, ln in enumerate(lines)]
        n = Counter(r["status"] for r in results)
        return 200, {
            "accepted": n["accepted"],
            "duplicates": n["duplicate"],
            "rejected": n["rejected"],
            "results": results,
        }

    def _record(self, index: int, line: bytes) -> dict[str, Any]:
        try:
            rec = json.loads(line)
        except ValueError:
            return {"index": index, "episode_id": None, "status": "rejected", "reason": "invalid_json", "detail": ""}
        eid = rec.get("episode_id")
        if "response" not in rec and "messages" not in rec:
            return {
                "index": index,
                "episode_id": eid,
                "status": "rejected",
                "reason": "missing_field",
                "detail": "response",
            }
        with self.lock:
            self.stored[eid] += 1
            status = "accepted" if self.stored[eid] == 1 else "duplicate"
        return {"index": index, "episode_id": eid, "status": status, "reason": None, "detail": None}

    def _handler(self) -> type[BaseHTTPRequestHandler]:
        standin = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 (the base class names it)
                pass

            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers.get("Content-Length", "0")))
                standin.arrived.set()
                standin.gate.wait()
                with standin.lock:
                    standin.request_times.append(time.monotonic())
                    standin.bodies.append(body)
                    planned = standin.plan.popleft() if standin.plan else None
                if planned is not None and planned.drop:
                    self.close_connection = True
                    return
                if self.headers.get("Authorization") != f"Bearer {standin.token}":
                    self._send(401, {"reason": "unauthorized"}, {})
                elif planned is not None:
                    self._send(planned.status, {"reason": "planned"}, planned.headers)
                else:
                    self._send(*standin.answer(body), {})

            def _send(self, status: int, payload: dict[str, Any], headers: dict[str, str]) -> None:
                data = json.dumps(payload).encode()
                self.send_response(status)
                for k, v in headers.items():
                    self.send_header(k, v)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

        return Handler


@contextmanager
def standin_server(token: str = "tok") -> Iterator[StandIn]:
    s = StandIn(token)
    try:
        yield s
    finally:
        s.close()


def ep(i: int, stream: str = "s", **extra: Any) -> dict[str, Any]:
    return {"episode_id": f"e-{stream}-{i}", "stream": stream, "prompt": f"q{i}", "response": f"a{i}", **extra}
