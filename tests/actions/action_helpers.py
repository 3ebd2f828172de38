"""Helpers for the action-sink tests: a real webhook receiver that checks signatures and deduplicates.

Imported by module name (pytest puts this directory on sys.path; there is no ``__init__.py`` in tests/ subdirs).
"""

from __future__ import annotations

import hashlib
import hmac
import json
import threading
import time
from http.server import BaseHTTPRequestHandler
from typing import Any

SECRET = b"webhook-test-secret"


class Gate:
    def __init__(self) -> None:
        self.arrived = threading.Event()
        self.release = threading.Event()


class Receiver:
    """What a retraining system's webhook endpoint should do: verify, deduplicate, process once.

    ``script`` holds (status, headers) answers given, in order, to the next verified deliveries
    before accepting; each of ``gates`` stops one delivery, in order, until the test releases it.
    """

    def __init__(self, secret: bytes):
        self.secret = secret
        self.script: list[tuple[int, dict[str, str]]] = []
        self.gates: list[Gate] = []
        self.deliveries: list[dict[str, Any]] = []  # every POST seen, verified or not
        self.processed: dict[str, dict[str, Any]] = {}  # idempotency key -> body, each processed once
        self.duplicates: list[str] = []
        self.lock = threading.Lock()
        self.url = ""

    def handle(self, headers: dict[str, str], body: bytes) -> tuple[int, dict[str, str], dict[str, Any]]:
        want = "sha256=" + hmac.new(self.secret, body, hashlib.sha256).hexdigest()
        verified = hmac.compare_digest(want, headers.get("x-oversight-signature", ""))
        with self.lock:
            self.deliveries.append({"headers": headers, "body": body, "verified": verified})
        if not verified:
            return 401, {}, {"error": "bad signature"}
        doc = json.loads(body)
        ts = int(headers["x-oversight-timestamp"])
        # The timestamp is signed (sent_at in the body): an old replay is refused.
        if doc.get("sent_at") != ts or abs(time.time() - ts) > 300:
            return 401, {}, {"error": "stale or mismatched timestamp"}
        key = headers.get("idempotency-key", "")
        if key != doc["id"]:
            return 400, {}, {"error": "idempotency key is not the request id"}
        gate = None
        with self.lock:
            if self.script:
                status, extra = self.script.pop(0)
                return status, extra, {"error": "try later"}
            if self.gates:
                gate = self.gates.pop(0)
        if gate is not None:
            gate.arrived.set()
            gate.release.wait(30)
        with self.lock:
            if key in self.processed:
                self.duplicates.append(key)
                return 200, {}, {"duplicate": True}
            self.processed[key] = doc
        return 202, {}, {"accepted": True}

    def verified(self) -> list[dict[str, Any]]:
        with self.lock:
            return [d for d in self.deliveries if d["verified"]]


def handler(receiver: Receiver) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        def do_POST(self) -> None:
            body = self.rfile.read(int(self.headers.get("Content-Length", "0")))
            status, extra, doc = receiver.handle({k.lower(): v for k, v in self.headers.items()}, body)
            out = json.dumps(doc).encode()
            self.send_response(status)
            for k, v in extra.items():
                self.send_header(k, v)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(out)))
            self.end_headers()
            self.wfile.write(out)

        def log_message(self, fmt: str, *args: Any) -> None:  # quiet test output
            pass

    return Handler
