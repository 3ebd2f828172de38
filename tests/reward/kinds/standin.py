"""STAND-IN servers for the remote kinds (no LLM can run here): a real
HTTP server in a thread that speaks the OpenAI chat-completions protocol, and one that speaks a
generic JSON scoring protocol, with scripted failures, slowness, malformed answers and logprobs."""

from __future__ import annotations

import json
import math
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any


@dataclass
class Script:
    """What the stand-in answers. ``fail_first``: that many requests get a 500 first; ``mode``:
    ok | fail (500 always) | malformed | slow (sleep ``delay`` s) | hold (wait for ``release``) |
    overloaded (429 but to every ``answer_every``-th request, as a judge over its rate limit).
    ``refuse``: a request whose body holds it gets a 400, as a judge refuses a prompt it will not
    grade (a content policy), in any mode."""

    mode: str = "ok"
    logprobs: bool = True
    delay: float = 0.0
    fail_first: int = 0
    refuse: str | None = None
    answer_every: int = 4
    release: threading.Event = field(default_factory=threading.Event)
    hits: int = 0
    in_flight: int = 0
    max_in_flight: int = 0
    auth: list[str | None] = field(default_factory=list)
    bodies: list[dict[str, Any]] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)


def judge_score(response: str) -> int:
    """The stand-in judge's verdict: longer answers score higher (1..10), deterministic."""
    return max(1, min(10, 1 + len(response) // 40))


def chat_answer(body: dict[str, Any], script: Script) -> dict[str, Any]:
    user = body["messages"][-1]["content"]
    response = user.split("<<<RESPONSE\n", 1)[1].rsplit("\nRESPONSE>>>", 1)[0]
    s = judge_score(response)
    msg = {"role": "assistant", "content": str(s)}
    choice: dict[str, Any] = {"index": 0, "message": msg, "finish_reason": "stop"}
    if script.logprobs and body.get("logprobs"):
        # 70 % on s, 30 % on the neighbour (and a non-score token that must be ignored).
        other = s + 1 if s < 10 else s - 1
        tops = [
            {"token": str(s), "logprob": math.log(0.6)},
            {"token": str(other), "logprob": math.log(0.3)},
            {"token": "The", "logprob": math.log(0.1)},
        ]
        choice["logprobs"] = {"content": [{"token": str(s), "logprob": math.log(0.6), "top_logprobs": tops}]}
    return {
        "id": "chatcmpl-standin",
        "object": "chat.completion",
        "model": body.get("model"),
        "choices": [choice],
        "usage": {"prompt_tokens": len(user) // 4, "completion_tokens": 1, "total_tokens": len(user) // 4 + 1},
    }


def chat_answer_by(score: Callable[[str], int]) -> Callable[[dict[str, Any], Script], dict[str, Any]]:
    """A STAND-IN judge with another verdict: ``score(response)`` (1..10), plain text, no logprobs."""

    def answer(body: dict[str, Any], script: Script) -> dict[str, Any]:
        user = body["messages"][-1]["content"]
        response = user.split("<<<RESPONSE\n", 1)[1].rsplit("\nRESPONSE>>>", 1)[0]
        msg = {"role": "assistant", "content": str(max(1, min(10, score(response))))}
        return {"choices": [{"index": 0, "message": msg, "finish_reason": "stop"}], "usage": {}}

    return answer


def json_answer_by(score: Callable[[str], float]) -> Callable[[dict[str, Any], Script], dict[str, Any]]:
    """A STAND-IN JSON endpoint (batched, ``scores`` list) with the verdict ``score(response)``."""

    def answer(body: dict[str, Any], script: Script) -> dict[str, Any]:
        return {"scores": [score(i["response"]) for i in body["inputs"]]}

    return answer


def json_answer(body: dict[str, Any], script: Script) -> dict[str, Any]:
    items = body.get("inputs", [body])
    scores = [[float(judge_score(i["response"]))] for i in items]
    return {"outputs": [{"data": scores}]} if "inputs" in body else {"outputs": [{"data": scores[0]}]}


class _Handler(BaseHTTPRequestHandler):
    server: Any

    def log_message(self, *args: Any) -> None:
        return None

    def do_POST(self) -> None:
        script: Script = self.server.script
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        with script.lock:
            script.hits += 1
            hit = script.hits
            script.in_flight += 1
            script.max_in_flight = max(script.max_in_flight, script.in_flight)
            script.auth.append(self.headers.get("Authorization"))
            script.bodies.append(body)
        try:
            self._answer(script, body, hit)
        finally:
            with script.lock:
                script.in_flight -= 1

    def _answer(self, script: Script, body: dict[str, Any], hit: int) -> None:
        if script.mode == "slow":
            time.sleep(script.delay)
        if script.mode == "hold":
            script.release.wait(60)
        if script.refuse is not None and script.refuse in json.dumps(body):
            self._send(400, b'{"error": {"message": "the prompt was refused by the content policy"}}')
            return
        if script.mode == "fail" or hit <= script.fail_first:
            self._send(500, b'{"error": "scripted failure"}')
            return
        if script.mode == "overloaded" and hit % script.answer_every:
            self._send(429, b'{"error": {"message": "rate limit reached"}}')
            return
        if script.mode == "malformed":
            self._send(200, json.dumps({"choices": [{"message": {"content": "I think it is good"}}]}).encode())
            return
        answer = self.server.answer(body, script)
        self._send(200, json.dumps(answer).encode())

    def _send(self, code: int, data: bytes) -> None:
        try:
            self.send_response(code)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)
        except (BrokenPipeError, ConnectionResetError):  # the client timed out and left
            pass


@dataclass
class StandIn:
    url: str
    script: Script


def serve(answer: Any) -> Iterator[StandIn]:
    server = ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
    server.daemon_threads = True
    server.script = Script()  # type: ignore[attr-defined]
    server.answer = answer  # type: ignore[attr-defined]
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield StandIn(f"http://127.0.0.1:{server.server_address[1]}", server.script)  # type: ignore[attr-defined]
    finally:
        server.script.release.set()  # type: ignore[attr-defined]
        server.shutdown()
        server.server_close()
