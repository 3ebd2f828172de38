"""Review service hardening (issue 13, items 10-14): login throttling that stops guessing
without letting anyone lock anyone out, bounded password hashing, claims that never fail on
an item's data nor leave a lease behind, blinding per stream, security headers on every
response, token revocation, the separate metrics listener, invisible characters shown."""

from __future__ import annotations

import json
import threading
import unicodedata
import warnings
from collections.abc import Callable
from typing import Any, cast

import httpx
import pytest
import sqlalchemy as sa
from review_helpers import API, PASSWORD, Env, FakeClock, episode_row, label_body, make_env, make_settings, seed

from monitor.review import auth, queue
from monitor.review.app import HSTS, create_app
from monitor.review.display import INVISIBLE, bounded
from monitor.review.server import BackgroundServer
from monitor.store import Store
from monitor.store import tables as t

with warnings.catch_warnings():
    warnings.simplefilter("ignore")
    from fastapi.testclient import TestClient

MakeEnv = Callable[..., Env]
ATTACKER, USER = "203.0.113.9", "198.51.100.7"
PROXIED = "review.trusted_proxies=[testclient]"  # the test client is the proxy: X-Forwarded-For names the client


def _login(c: TestClient, name: str, password: str, address: str | None = None) -> httpx.Response:
    headers = {"X-Forwarded-For": address} if address else {}
    # starlette's TestClient returns an httpx2.Response where httpx2 is installed (huggingface_hub 2 brings it).
    return cast(httpx.Response, c.post(f"{API}/auth/login", json={"name": name, "password": password}, headers=headers))


def _task(env: Env, eid: str) -> tuple[str, int | None]:
    rt = t.review_tasks
    with env.store.engine.connect() as conn:
        r = conn.execute(sa.select(rt.c.status, rt.c.lease_user_id).where(rt.c.episode_id == eid)).one()
    return str(r[0]), r[1]


# -- login throttling ------------------------------------------------------------------------


def test_guessing_from_another_address_does_not_lock_the_user_out(make_review_env: MakeEnv) -> None:
    env = make_review_env("review.login_max_failures=3", "review.login_backoff_s=60", PROXIED)
    env.user("alice")
    c = env.client()
    statuses = [_login(c, "alice", f"guess-{i}", ATTACKER).status_code for i in range(10)]
    assert statuses[:3] == [401, 401, 401] and set(statuses[3:]) == {429}, statuses
    # The rightful user, from her own address, signs in at once, wrong password first.
    assert _login(c, "alice", "typo-password", USER).status_code == 401
    r = _login(c, "alice", PASSWORD, USER)
    assert r.status_code == 200, r.text
    # ... and the attacker is still held back.
    assert _login(c, "alice", PASSWORD, ATTACKER).status_code == 429


def test_guessing_from_one_address_backs_off_exponentially(make_review_env: MakeEnv) -> None:
    clock = FakeClock()
    env = make_review_env("review.login_max_failures=2", "review.login_backoff_s=2", PROXIED, clock=clock)
    env.user("alice")
    c = env.client()
    assert [_login(c, "alice", "wrong-1", ATTACKER).status_code for _ in range(2)] == [401, 401]
    r = _login(c, "alice", PASSWORD, ATTACKER)
    assert r.status_code == 429, r.text
    first = int(r.headers["Retry-After"])
    assert first == 2  # 2 s from the last failure
    # Refused attempts check no password and extend nothing: the delay only runs down. (Steps
    # are binary fractions: the clock's sums are exact, so the boundaries below are too.)
    for waited in (0.5, 0.25, 0.75):
        clock.advance(waited)
        r = _login(c, "alice", PASSWORD, ATTACKER)
        assert r.status_code == 429 and int(r.headers["Retry-After"]) <= first
    assert r.headers["Retry-After"] == "1"  # 0.5 s left, rounded up
    clock.advance(0.5)
    assert _login(c, "alice", "wrong-2", ATTACKER).status_code == 401  # one guess per delay
    r = _login(c, "alice", PASSWORD, ATTACKER)
    assert r.status_code == 429
    second = int(r.headers["Retry-After"])
    assert second == 4  # the delay doubled
    clock.advance(3.875)
    assert _login(c, "alice", PASSWORD, ATTACKER).status_code == 429  # not a moment before
    clock.advance(0.125)
    assert _login(c, "alice", PASSWORD, ATTACKER).status_code == 200
    # Success ends that address's backoff: a typo afterwards is an ordinary failure.
    assert _login(c, "alice", "wrong-3", ATTACKER).status_code == 401


def test_an_address_is_limited_across_names_and_only_itself(make_review_env: MakeEnv) -> None:
    env = make_review_env("review.login_max_failures_per_address=4", PROXIED)
    for name in ("alice", "bob"):
        env.user(name)
    c = env.client()
    assert [_login(c, f"name{i}", "guess", ATTACKER).status_code for i in range(4)] == [401] * 4
    r = _login(c, "bob", PASSWORD, ATTACKER)
    assert r.status_code == 429 and int(r.headers["Retry-After"]) > 800  # until the window lets go
    assert _login(c, "bob", PASSWORD, USER).status_code == 200


def test_throttle_state_is_shared_by_replicas(make_review_env: MakeEnv) -> None:
    """Two apps over one database (two review replicas): guesses on one count on the other."""
    one = make_review_env("review.login_max_failures=2", "review.login_backoff_s=60", PROXIED)
    two = make_review_env("review.login_max_failures=2", "review.login_backoff_s=60", PROXIED)
    one.user("alice")
    assert [_login(one.client(), "alice", "guess", ATTACKER).status_code for _ in range(2)] == [401, 401]
    assert _login(two.client(), "alice", PASSWORD, ATTACKER).status_code == 429
    assert _login(two.client(), "alice", PASSWORD, USER).status_code == 200


def test_parallel_guesses_from_one_address_get_no_more_checks(make_review_env: MakeEnv) -> None:
    """The attempt is recorded before the throttle counts: of 12 parallel guesses at most
    ``login_max_failures`` get a password checked."""
    env = make_review_env("review.login_max_failures=3", "review.password_hash_slots=12")
    env.user("alice")
    ctx = env.app.state.review
    outcomes: list[int] = []
    lock = threading.Lock()
    barrier = threading.Barrier(12)

    def guess(i: int) -> None:
        barrier.wait()
        try:
            auth.login(env.store, "alice", f"guess-{i:04d}", ATTACKER, limits=ctx.limits, gate=ctx.gate, hours=1)
            status = 200
        except auth.AuthError as e:
            status = e.status
        with lock:
            outcomes.append(status)

    threads = [threading.Thread(target=guess, args=(i,)) for i in range(12)]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    assert len(outcomes) == 12 and set(outcomes) <= {401, 429}, outcomes
    assert outcomes.count(401) <= 3, outcomes


def test_expired_failures_of_names_and_addresses_that_never_return_are_pruned(make_review_env: MakeEnv) -> None:
    """A guesser who never repeats a name or an address (an IPv6 /64 holds 2^64) left one row per
    guess for good: only a returning name or address pruned its own. Each attempt now also
    deletes the oldest expired rows of any other, so the table holds about the window's guesses."""
    import sqlalchemy as sa

    from monitor.store import tables as t

    env = make_review_env()
    ctx = env.app.state.review
    window = ctx.limits.window_s

    def guess(i: int, at: float) -> None:
        with pytest.raises(auth.AuthError):
            auth.login(env.store, f"n{i}", "x", f"2001:db8::{i:x}", limits=ctx.limits, gate=ctx.gate, hours=1, now=at)

    def rows() -> int:
        with env.store.engine.connect() as conn:
            return int(conn.execute(sa.select(sa.func.count()).select_from(t.login_failures)).scalar_one())

    t0 = 1_000_000.0
    for i in range(250):  # a burst of guesses, each from a new address with a new name
        guess(i, t0 + i)
    assert rows() == 250
    later = t0 + 250 + window
    for j in range(3):  # three attempts after the window: each prunes up to 100 expired rows
        guess(1000 + j, later + j)
    assert rows() == 3, "the expired burst is gone; the new attempts stay"


# -- password hashing ------------------------------------------------------------------------


def test_a_login_without_a_free_hashing_slot_gets_503(make_review_env: MakeEnv) -> None:
    env = make_review_env("review.password_hash_slots=1", "review.password_hash_wait_s=0.1")
    env.user("alice")
    gate: auth.HashGate = env.app.state.review.gate
    held, release = threading.Event(), threading.Event()

    def hold() -> None:
        held.set()
        release.wait(10)

    holder = threading.Thread(target=gate.run, args=(hold,))
    holder.start()
    try:
        assert held.wait(5)
        c = env.client()
        for name in ("alice", "nobody"):  # unknown names take the same path: same cost, same answer
            r = _login(c, name, PASSWORD)
            assert r.status_code == 503 and r.headers["Retry-After"] == "1", (name, r.status_code, r.text)
    finally:
        release.set()
        holder.join()
    assert _login(env.client(), "alice", PASSWORD).status_code == 200
    # A refusal for load is not a failure: it did not count toward the throttle.
    with env.store.engine.connect() as conn:
        assert conn.execute(sa.select(sa.func.count()).select_from(t.login_failures)).scalar_one() == 0


def test_old_64_mib_hashes_verify_and_are_rehashed(make_review_env: MakeEnv) -> None:
    from argon2 import PasswordHasher

    env = make_review_env()
    u = env.user("alice")
    legacy = PasswordHasher(memory_cost=65536, time_cost=3, parallelism=4).hash(PASSWORD)
    with env.store.engine.begin() as conn:
        conn.execute(t.users.update().where(t.users.c.id == u.id).values(password_hash=legacy))
    assert _login(env.client(), "alice", PASSWORD).status_code == 200
    with env.store.engine.connect() as conn:
        stored = conn.execute(sa.select(t.users.c.password_hash).where(t.users.c.id == u.id)).scalar_one()
    assert f"m={auth.ARGON2_MEMORY_KIB},t={auth.ARGON2_TIME_COST},p={auth.ARGON2_PARALLELISM}" in stored
    assert _login(env.client(), "alice", PASSWORD).status_code == 200


# -- tokens ------------------------------------------------------------------------------------


def test_logout_with_a_bearer_token_revokes_it(make_review_env: MakeEnv) -> None:
    env = make_review_env()
    env.user("alice")
    c = env.client("alice")
    assert c.get(f"{API}/me").status_code == 200
    assert c.post(f"{API}/auth/logout").json() == {"logged_out": True}
    assert c.get(f"{API}/me").status_code == 401


def test_revoke_api_tokens_by_user_and_label(make_review_env: MakeEnv) -> None:
    env = make_review_env()
    alice, bob = env.user("alice"), env.user("bob")
    ci = [auth.create_api_token(env.store, alice, "ci") for _ in range(2)]
    laptop = auth.create_api_token(env.store, alice, "laptop")
    bobs = auth.create_api_token(env.store, bob, "ci")
    assert auth.revoke_api_tokens(env.store, "alice", label="ci") == 2
    assert [auth.user_from_api_token(env.store, tok) for tok in ci] == [None, None]
    assert auth.user_from_api_token(env.store, laptop) == alice
    assert auth.user_from_api_token(env.store, bobs) == bob
    assert auth.revoke_api_tokens(env.store, "alice") == 2  # the laptop token and the helper's "test" one
    assert auth.user_from_api_token(env.store, laptop) is None
    assert auth.revoke_api_tokens(env.store, "alice") == 0
    assert auth.revoke_api_tokens(env.store, "nobody") == 0


# -- claims: bounded, and never a lease left behind ---------------------------------------------


def _nested(depth: int) -> Any:
    value: Any = "bottom"
    for _ in range(depth):
        value = {"d": value}
    return value


def test_deeply_nested_metadata_is_shown_bounded(make_review_env: MakeEnv) -> None:
    env = make_review_env("review.metadata_fields=[deep,wide]")
    env.user("alice")
    meta = {"deep": _nested(300), "wide": list(range(500)), "hidden": "x"}
    seed(env.store, [episode_row("deep", metadata=meta)])
    r = env.client("alice").post(f"{API}/queue/claim")
    assert r.status_code == 200, r.text[:300]
    shown = r.json()["metadata"]
    assert shown == {"deep": bounded(_nested(300)), "wide": bounded(list(range(500)))}
    assert "nested deeper than" in json.dumps(shown) and "450 more items" in json.dumps(shown)


def test_metadata_too_deep_to_read_back_does_not_stop_the_queue(make_review_env: MakeEnv) -> None:
    """A row written before validation limited nesting: deeper than the JSON decoder can go."""
    env = make_review_env("review.metadata_fields=[deep]")
    env.user("alice")
    seed(env.store, [episode_row("abyss", metadata={"deep": 1})])
    raw = '{"deep": ' + '{"d": ' * 5000 + "1" + "}" * 5000 + "}"
    value = "CAST(:raw AS jsonb)" if env.store.dialect == "postgresql" else ":raw"
    with env.store.engine.begin() as conn:
        conn.execute(sa.text(f"UPDATE episodes SET metadata = {value} WHERE episode_id = 'abyss'"), {"raw": raw})
    c = env.client("alice")
    r = c.post(f"{API}/queue/claim")
    assert r.status_code == 200, r.text[:300]
    item = r.json()
    assert (item["episode_id"], item["metadata"]) == ("abyss", None)
    assert c.post(f"{API}/items/label", json=label_body(item)).status_code == 200
    env.user("root", "admin")
    for export in ("pairs.jsonl", "ratings.jsonl", "ratings.csv"):
        r = env.client("root").get(f"{API}/admin/export/{export}")
        assert r.status_code == 200 and ("abyss" in r.text or export == "pairs.jsonl"), export


def test_a_row_that_cannot_be_read_is_set_aside_and_the_next_item_claimed(sqlite_url: str) -> None:
    """Text that is not UTF-8 (written into SQLite by something other than the pipeline) fails
    the row's read inside the claim: the claim sets it aside and hands out the next item."""
    env = make_env(sqlite_url)
    try:
        env.user("alice")
        seed(env.store, [episode_row("corrupt"), episode_row("fine")])
        with env.store.engine.begin() as conn:
            conn.execute(
                sa.text("UPDATE episodes SET response = CAST(X'41EDA08042' AS TEXT) WHERE episode_id = 'corrupt'")
            )
        c = env.client("alice")
        r = c.post(f"{API}/queue/claim")
        assert r.status_code == 200, r.text[:300]
        assert r.json()["episode_id"] == "fine"
        assert _task(env, "corrupt") == ("error", None)
        (depth,) = c.get(f"{API}/queue").json()
        assert (depth["error"], depth["leased"], depth["waiting"]) == (1, 1, 0)
    finally:
        env.close()


def test_a_response_that_fails_after_the_claim_leaves_no_lease(
    make_review_env: MakeEnv, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Defence in depth for a failure nobody has found yet: a stand-in bug (to_json raising for
    one episode; every real cause known is handled earlier) fails the answer after the lease
    was taken. The item is set aside in the same request and the next claim gets the next item."""
    env = make_review_env()
    env.user("alice")
    seed(env.store, [episode_row("broken"), episode_row("fine")])
    real = queue.Item.to_json

    def to_json(self: queue.Item) -> dict[str, Any]:
        if self.claim.episode_id == "broken":
            raise RuntimeError("stand-in for an unknown bug")
        return real(self)

    monkeypatch.setattr(queue.Item, "to_json", to_json)
    c = env.client("alice")
    r = c.post(f"{API}/queue/claim")
    assert r.status_code == 500 and "set aside" in r.json()["detail"]
    assert r.headers["X-Content-Type-Options"] == "nosniff"
    assert _task(env, "broken") == ("error", None)
    r = c.post(f"{API}/queue/claim")
    assert r.status_code == 200 and r.json()["episode_id"] == "fine"
    registry = env.app.state.review.metrics.registry
    assert registry.get_sample_value("oversight_review_claim_errors_total") == 1
    # The review page takes the same path.
    seed(env.store, [episode_row("broken-page")], created_at=2000.0)
    env.user("bob")
    monkeypatch.setattr(queue.Item, "to_json", real)
    monkeypatch.setattr(queue.Item, "invisible_characters", lambda self: 1 / 0)
    page = env.session_client("bob").get("/")
    assert page.status_code == 500 and "could not be shown" in page.text
    assert _task(env, "broken")[0] == "error"


def test_a_non_finite_timestamp_is_shown_as_unknown(make_review_env: MakeEnv) -> None:
    env = make_review_env()
    env.user("alice")
    seed(env.store, [episode_row("inf")])
    with env.store.engine.begin() as conn:
        conn.execute(t.episodes.update().where(t.episodes.c.episode_id == "inf").values(ts=float("inf")))
    r = env.client("alice").post(f"{API}/queue/claim")
    assert r.status_code == 200 and r.json()["timestamp"] is None


# -- blinding ------------------------------------------------------------------------------------


def test_reviewers_see_no_metadata_and_no_model_by_default(make_review_env: MakeEnv) -> None:
    env = make_review_env()
    env.user("alice")
    seed(env.store, [episode_row("ep", model="policy-v7", metadata={"judge_pref": 0.93, "topic": "cooking"})])
    r = env.client("alice").post(f"{API}/queue/claim")
    item = r.json()
    assert (item["model"], item["metadata"]) == (None, None)
    assert "judge_pref" not in r.text and "policy-v7" not in r.text and "cooking" not in r.text


def test_a_stream_allow_list_shows_only_its_fields(make_review_env: MakeEnv) -> None:
    env = make_review_env(
        "review.metadata_fields=[topic]",
        "review.streams.open.metadata_fields=[topic,lang]",
        "review.streams.open.show_model=true",
    )
    env.user("alice")
    meta = {"judge_pref": 0.93, "topic": "cooking", "lang": "de"}
    seed(env.store, [episode_row("a", stream="open", model="policy-v7", metadata=meta)])
    seed(env.store, [episode_row("b", stream="other", model="policy-v7", metadata=meta)], created_at=2000.0)
    c = env.client("alice")
    first = c.post(f"{API}/queue/claim").json()
    assert (first["model"], first["metadata"]) == ("policy-v7", {"topic": "cooking", "lang": "de"})
    assert c.post(f"{API}/items/label", json=label_body(first)).status_code == 200
    second = c.post(f"{API}/queue/claim").json()
    assert (second["episode_id"], second["model"], second["metadata"]) == ("b", None, {"topic": "cooking"})


def test_the_review_page_is_blind_too(make_review_env: MakeEnv) -> None:
    env = make_review_env()
    env.user("alice")
    seed(env.store, [episode_row("ep", model="policy-v7", metadata={"judge_pref": 0.93})])
    page = env.session_client("alice").get("/").text
    assert "judge_pref" not in page and "policy-v7" not in page and "<details" not in page


# -- invisible characters ------------------------------------------------------------------------

TRICK = "Send the money to \u202eNAVI\u202c now\u200b.\u2066x\u2069 \U000e0041"


def test_invisible_characters_are_shown_as_markers_and_counted(make_review_env: MakeEnv) -> None:
    env = make_review_env("review.metadata_fields=[note]")
    env.user("alice")
    seed(env.store, [episode_row("bidi", prompt="plain", response=TRICK, metadata={"note": "a\ufeffb"})])
    c = env.session_client("alice")
    item = c.post(f"{API}/queue/claim").json()
    assert item["response"] == TRICK  # the API gives the text as emitted ...
    assert item["invisible_characters"] == {"response": 6, "metadata": 1}  # ... and says what it hides
    page = c.get("/").text
    for ch in "\u202e\u202c\u200b\u2066\u2069\U000e0041\ufeff":
        assert ch not in page, f"U+{ord(ch):04X} rendered raw"
    for code in ("202E", "202C", "200B", "2066", "2069", "E0041", "FEFF"):
        assert f'<span class="invisible-char" title="U+{code} ' in page and f"⟨U+{code}⟩</span>" in page
    assert "7 invisible or direction-changing characters" in page
    # Stored text is never changed.
    with env.store.engine.connect() as conn:
        stored = conn.execute(sa.select(t.episodes.c.response).where(t.episodes.c.episode_id == "bidi")).scalar_one()
    assert stored == TRICK


def test_every_format_character_is_made_visible() -> None:
    missing = [
        f"U+{cp:04X}"
        for cp in range(0x110000)
        if unicodedata.category(chr(cp)) == "Cf" and not INVISIBLE.fullmatch(chr(cp))
    ]
    assert missing == []
    for visible in "aZ09 \n\t\u00e9\u05d0\u0627\u4e2d\ufe0f\U0001f600":  # letters of any script, emoji
        assert INVISIBLE.search(visible) is None, f"U+{ord(visible):04X}"


# -- headers, metrics ---------------------------------------------------------------------------


def test_a_500_carries_the_security_headers(sqlite_url: str) -> None:
    env = make_env(sqlite_url)
    try:
        env.user("alice")
        with env.store.engine.begin() as conn:
            conn.execute(sa.text("DROP TABLE review_tasks"))  # a real failure inside a route
        c = TestClient(env.app, raise_server_exceptions=False)
        r = c.get(f"{API}/queue", headers={"Authorization": f"Bearer {env.tokens['alice']}"})
        assert r.status_code == 500 and r.json() == {"detail": "internal server error"}
        assert "Traceback" not in r.text and "review_tasks" not in r.text
        assert "script-src 'self'" in r.headers["Content-Security-Policy"]
        assert r.headers["X-Frame-Options"] == "DENY" and r.headers["Cache-Control"] == "no-store"
        c.close()
    finally:
        env.close()


def test_hsts_outside_dev_mode_only(sqlite_url: str) -> None:
    keys = ("sampling.key=9f2c7e1ab4d8305f6c9e2b7a1d4f8c3e", "review.secret_key=b7e4c1a9f03d6e8b2c5a7f1e9d4b0c6a")
    store = Store(sqlite_url)
    try:
        for dev, expected in ((False, HSTS), (True, None)):
            app = create_app(make_settings(sqlite_url, *keys, dev=dev), store)
            with TestClient(app, base_url="https://testserver") as c:
                for path in ("/login", "/healthz", f"{API}/me"):
                    assert c.get(path).headers.get("Strict-Transport-Security") == expected, (dev, path)
    finally:
        store.close()


def test_metrics_listen_on_their_own_port(sqlite_url: str) -> None:
    env = make_env(sqlite_url)
    srv = BackgroundServer(env.app, "127.0.0.1", 0, metrics=("127.0.0.1", 0)).start()
    try:
        assert srv.metrics is not None
        public = httpx.get(f"{srv.url}metrics")
        assert public.status_code == 404
        scraped = httpx.get(f"{srv.metrics.url}/metrics")
        assert scraped.status_code == 200
        for name in ("oversight_review_queue_waiting", 'oversight_review_logins_total{result="busy"} 0.0'):
            assert name in scraped.text
        assert httpx.get(f"{srv.metrics.url}/readyz").json()["ready"] is True
        # What /readyz says, as the gauge OversightNotReady reads (the review pods had none).
        assert "\noversight_ready 1.0\n" in scraped.text
        assert 'oversight_ready_check{check="database"} 1.0' in scraped.text
    finally:
        srv.stop()
        env.close()


def test_set_aside_needs_the_live_lease(make_review_env: MakeEnv) -> None:
    env = make_review_env()
    alice, bob = env.user("alice"), env.user("bob")
    seed(env.store, [episode_row("ep")])
    item = queue.claim(env.store, alice, 600, b"k" * 16)
    assert item is not None
    assert not queue.set_aside(env.store, bob, item.claim)  # not bob's lease
    assert _task(env, "ep") == ("claimed", alice.id)
    assert queue.set_aside(env.store, alice, item.claim)
    assert _task(env, "ep") == ("error", None)
