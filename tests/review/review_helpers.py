"""Helpers for the review-app tests: settings, seeding episodes/review tasks, users, clients."""

from __future__ import annotations

import time
import warnings
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

from monitor.config import Settings, load_settings
from monitor.review import auth
from monitor.store import BatchWrite, EpisodeRow, Store
from monitor.store.store import bucket_of

with warnings.catch_warnings():
    warnings.simplefilter("ignore")  # starlette's "use httpx2" deprecation notice
    from fastapi.testclient import TestClient

# TestClient is re-exported: tests import it from here, so its first import, which warns, happens
# under the filter above. Names defined below need no entry here to be importable.
__all__ = ["TestClient"]

PASSWORD = "correct-horse-battery"
API = "/api/v1"


def make_settings(url: str, *overrides: str, dev: bool = True) -> Settings:
    # No canaries unless a test asks (review.canaries.share=...): these tests count queue items exactly.
    base = [*(["dev=true"] if dev else []), f"database.url={url}", "review.canaries.share=0"]
    return load_settings(None, [*base, *overrides])


def episode_row(
    eid: str,
    *,
    stream: str = "s",
    prompt: str = "prompt",
    response: str = "response",
    metadata: dict[str, Any] | None = None,
    model: str | None = "m",
    ts: float = 1_700_000_000.0,
) -> EpisodeRow:
    return {
        "episode_id": eid,
        "stream": stream,
        "model": model,
        "ts": ts,
        "prompt": prompt,
        "response": response,
        "metadata": metadata,
        "source": "test",
        "position": "0:0",
        "ingested_at": ts,
    }


def seed(
    store: Store,
    episodes: Iterable[EpisodeRow],
    *,
    slots: int | Callable[[int, EpisodeRow], int] = 1,
    probability: float = 0.05,
    created_at: float = 1_000.0,
) -> list[tuple[str, int]]:
    """Insert episodes, their human-channel samples and review tasks; returns the (episode, slot) keys.

    ``created_at`` grows by 1 ms per episode so the queue order is the insertion order."""
    batch = BatchWrite()
    keys = []
    for i, ep in enumerate(episodes):
        batch.episodes.append(ep)
        at = created_at + i / 1000.0
        batch.samples.append(
            {
                "episode_id": ep["episode_id"],
                "channel": "human",
                "stream": ep["stream"],
                "ts": ep["ts"],
                "inclusion_probability": probability,
                "created_at": at,
            }
        )
        n = slots(i, ep) if callable(slots) else slots
        for slot in range(n):
            batch.tasks.append(
                {
                    "episode_id": ep["episode_id"],
                    "slot": slot,
                    "stream": ep["stream"],
                    "status": "pending",
                    "created_at": at,
                }
            )
            keys.append((ep["episode_id"], slot))
        tkey = (ep["stream"], bucket_of(ep["ts"]))
        batch.traffic[tkey] = batch.traffic.get(tkey, 0) + round(1 / probability)
    store.commit_batch(batch)
    return keys


def seed_simple(store: Store, n: int, *, prefix: str = "e", slots: int = 1, **kw: Any) -> list[tuple[str, int]]:
    return seed(store, [episode_row(f"{prefix}{i:05d}", **kw) for i in range(n)], slots=slots)


class FakeClock:
    """An injectable clock for ``create_app(clock=...)``: starts at the real time (so rows other
    code writes with the real time compare sensibly) and moves only when the test says so."""

    def __init__(self, start: float | None = None):
        self.now = time.time() if start is None else start

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


@dataclass
class Env:
    """A review app over a fresh database, with helpers to make users and clients."""

    url: str
    settings: Settings
    store: Store
    app: Any
    clients: list[TestClient] = field(default_factory=list)
    tokens: dict[str, str] = field(default_factory=dict)
    users: dict[str, auth.User] = field(default_factory=dict)

    def user(self, name: str, role: str = "reviewer", password: str = PASSWORD) -> auth.User:
        u = auth.create_user(self.store, name, role, password)
        self.users[name] = u
        self.tokens[name] = auth.create_api_token(self.store, u, "test")
        return u

    def client(self, name: str | None = None) -> TestClient:
        """A client; authenticated by Bearer token when ``name`` is given."""
        c = TestClient(self.app)
        self.clients.append(c)
        if name is not None:
            c.headers["Authorization"] = f"Bearer {self.tokens[name]}"
        return c

    def session_client(self, name: str, password: str = PASSWORD) -> TestClient:
        """A browser-like client: session cookie plus the X-CSRF-Token header."""
        c = TestClient(self.app)
        self.clients.append(c)
        r = c.post(f"{API}/auth/login", json={"name": name, "password": password})
        assert r.status_code == 200, r.text
        c.headers["X-CSRF-Token"] = r.json()["csrf_token"]
        return c

    def close(self) -> None:
        for c in self.clients:
            c.close()
        self.store.close()


def make_env(url: str, *overrides: str, clock: Callable[[], float] = time.time) -> Env:
    from monitor.review.app import create_app

    settings = make_settings(url, *overrides)
    store = Store(url)
    return Env(url, settings, store, create_app(settings, store, clock=clock))


def put_label(
    store: Store,
    eid: str,
    user: auth.User,
    rating: int,
    flags: Iterable[str] = (),
    *,
    preference: str | None = None,
    critique: str = "",
    stream: str = "s",
) -> None:
    """A reviewer's label written as the queue writes it (flags sorted), without a lease: for
    tests of what reads labels (adjudication), where the queue itself is not under test."""
    from monitor.store import tables as t

    with store.engine.begin() as conn:
        conn.execute(
            t.labels.insert().values(
                episode_id=eid,
                slot=0,
                user_id=user.id,
                stream=stream,
                skipped=False,
                rating=rating,
                flags=sorted(flags),
                critique=critique,
                preference=preference,
                time_spent_ms=1000,
                created_at=time.time(),
            )
        )


def label_body(item: dict[str, Any], **kw: Any) -> dict[str, Any]:
    body = {"episode_id": item["episode_id"], "slot": item["slot"], "fence": item["fence"], "rating": 4}
    body.update(kw)
    return body


def lease(item: dict[str, Any]) -> dict[str, Any]:
    return {"episode_id": item["episode_id"], "slot": item["slot"], "fence": item["fence"]}


def wait_until(pred: Callable[[], bool], timeout: float = 5.0) -> bool:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if pred():
            return True
        time.sleep(0.02)
    return pred()
