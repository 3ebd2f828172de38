"""Users, password hashing (argon2), login throttling, sessions, API tokens, CSRF.

Session and API tokens are random 256-bit values; only their SHA-256 is stored.

Password hashing is the one thing here that costs memory: an argon2 computation holds its
memory cost for its whole duration. :class:`HashGate` runs at most ``slots`` of them at once,
on that many dedicated threads, and refuses the excess at once (503): a burst of logins can
neither exhaust memory nor queue without bound.

Login throttling (see :func:`login`) is by (name, client address), with exponential
backoff, and by client address across names. There is deliberately no limit per name
alone: that would let anyone lock anyone out by guessing from elsewhere.
"""

from __future__ import annotations

import hashlib
import hmac
import math
import secrets
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from functools import cache
from typing import TYPE_CHECKING, Any, TypeVar

import sqlalchemy as sa

from monitor.store import Store
from monitor.store import tables as t

if TYPE_CHECKING:
    from argon2 import PasswordHasher

    from monitor.config import ReviewConfig

ROLES = ("reviewer", "admin")
NAME_RE = r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}"
MAX_PASSWORD = 1024  # characters a sign-in takes (and `users add` reads)

# argon2id with OWASP's first recommended setting (19 MiB, 2 passes, 1 lane): about 55 ms
# on one core. Hashes made with other parameters (the library's 64 MiB default before)
# still verify, since a hash string carries its parameters, and are re-hashed with these
# at the next successful login.
ARGON2_MEMORY_KIB = 19456
ARGON2_TIME_COST = 2
ARGON2_PARALLELISM = 1

T = TypeVar("T")


class AuthError(Exception):
    """Login refused; ``status`` is the HTTP status to answer with, ``retry_after`` (seconds)
    goes into a Retry-After header when set."""

    def __init__(self, message: str, status: int = 401, retry_after: float | None = None):
        super().__init__(message)
        self.status = status
        self.retry_after = retry_after

    @property
    def headers(self) -> dict[str, str]:
        if self.retry_after is None:
            return {}
        return {"Retry-After": str(max(1, math.ceil(self.retry_after)))}


class HashGate:
    """Runs password hashing with bounded concurrency and memory.

    At most ``slots`` computations run at once, each on one of ``slots`` long-lived threads:
    the memory a hash frees stays with the thread's malloc arena, so hashing on the request
    threads (up to 40) could keep 40 x the memory cost resident after a burst even with a
    semaphore. A caller waits at most ``wait_s`` for a slot, then gets :class:`AuthError`
    503 with Retry-After: the number of waiting requests is bounded by the server's worker
    threads and the wait by ``wait_s``.
    """

    def __init__(self, slots: int, wait_s: float):
        self.slots = slots
        self.wait_s = wait_s
        self._free = threading.BoundedSemaphore(slots)
        self._pool = ThreadPoolExecutor(max_workers=slots, thread_name_prefix="argon2")

    @classmethod
    def of(cls, cfg: ReviewConfig) -> HashGate:
        """The process's gate for these settings: the memory bound is per process (per pod),
        however many apps the process builds (tests build hundreds)."""
        return _shared_gate(cfg.password_hash_slots, cfg.password_hash_wait_s)

    def run(self, fn: Callable[..., T], *args: Any) -> T:
        if not self._free.acquire(timeout=self.wait_s):
            raise AuthError("the server is busy; try again in a moment", status=503, retry_after=1)
        try:
            return self._pool.submit(fn, *args).result()
        finally:
            self._free.release()


@cache
def _shared_gate(slots: int, wait_s: float) -> HashGate:
    return HashGate(slots, wait_s)


@dataclass(frozen=True)
class LoginLimits:
    """Throttling of failed logins (documented in README, "Human review")."""

    max_failures: int = 5  # per (name, address) before backoff starts
    backoff_s: float = 1.0  # first delay, doubling with every further failure
    backoff_max_s: float = 900.0
    max_failures_per_address: int = 50  # per address, all names together
    window_s: float = 900.0  # failures older than this are forgotten

    @classmethod
    def of(cls, cfg: ReviewConfig) -> LoginLimits:
        return cls(
            max_failures=cfg.login_max_failures,
            backoff_s=cfg.login_backoff_s,
            backoff_max_s=cfg.login_backoff_max_s,
            max_failures_per_address=cfg.login_max_failures_per_address,
            window_s=cfg.login_window_s,
        )


@dataclass(frozen=True)
class User:
    id: int
    name: str
    role: str

    @property
    def is_admin(self) -> bool:
        return self.role == "admin"


@dataclass(frozen=True)
class Session:
    token: str
    user: User
    csrf: str
    expires_at: float


def _hash(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


@cache
def _hasher() -> PasswordHasher:
    from argon2 import PasswordHasher

    return PasswordHasher(time_cost=ARGON2_TIME_COST, memory_cost=ARGON2_MEMORY_KIB, parallelism=ARGON2_PARALLELISM)


def hash_password(password: str) -> str:
    """An argon2id hash of ``password`` with this module's parameters."""
    return str(_hasher().hash(password))


@cache
def _dummy_hash() -> str:
    # Unknown names are checked against this, with the same parameters and through the same
    # gate as real hashes: the answer's timing says nothing about which names exist.
    return hash_password(secrets.token_urlsafe(24))


def check_password(stored_hash: str | None, password: str) -> bool:
    """Whether ``password`` matches ``stored_hash``; with None (unknown name), the same work for False."""
    from argon2.exceptions import InvalidHashError, VerificationError, VerifyMismatchError

    try:
        return bool(_hasher().verify(stored_hash or _dummy_hash(), password)) and stored_hash is not None
    except (VerifyMismatchError, VerificationError, InvalidHashError):
        return False


def generate_password() -> str:
    return secrets.token_urlsafe(18)


def create_user(store: Store, name: str, role: str, password: str, gate: HashGate | None = None) -> User:
    import re

    if not re.fullmatch(NAME_RE, name):
        raise ValueError("user names are 1-64 letters, digits, '.', '_' or '-'")
    if role not in ROLES:
        raise ValueError(f"role must be one of {', '.join(ROLES)}")
    if len(password) < 10:
        raise ValueError("passwords must be at least 10 characters")
    hashed = gate.run(hash_password, password) if gate is not None else hash_password(password)
    with store.engine.begin() as conn:
        exists = conn.execute(sa.select(t.users.c.id).where(t.users.c.name == name)).first()
        if exists is not None:
            raise ValueError(f"user {name!r} already exists")
        uid = conn.execute(
            t.users.insert()
            .values(name=name, role=role, password_hash=hashed, created_at=time.time())
            .returning(t.users.c.id)
        ).scalar_one()
    return User(int(uid), name, role)


def get_user(store: Store, user_id: int) -> User | None:
    with store.engine.connect() as conn:
        row = conn.execute(
            sa.select(t.users.c.id, t.users.c.name, t.users.c.role).where(
                t.users.c.id == user_id, t.users.c.disabled == sa.false()
            )
        ).first()
    return None if row is None else User(int(row.id), row.name, row.role)


def list_users(store: Store) -> list[User]:
    with store.engine.connect() as conn:
        rows = conn.execute(sa.select(t.users.c.id, t.users.c.name, t.users.c.role).order_by(t.users.c.name)).all()
    return [User(int(r.id), r.name, r.role) for r in rows]


def login(
    store: Store,
    name: str,
    password: str,
    address: str,
    *,
    limits: LoginLimits,
    gate: HashGate,
    hours: float,
    now: float | None = None,
) -> Session:
    """Check a password and open a new session (a new token every login: no fixation).

    Raises :class:`AuthError`: 401 wrong name or password (the same for unknown names),
    429 throttled (with Retry-After), 503 no hashing slot free (with Retry-After). ``now``
    (default: the time) dates the attempt, the backoff and the session.
    """
    now = time.time() if now is None else now
    name = name[:64]
    address = address[:64]
    attempt = _record_attempt(store, name, address, now, limits.window_s)
    wait = _throttle_wait(store, name, address, attempt, now, limits)
    if wait is not None:
        # A refused attempt checked no password: it is not a failure and extends nothing,
        # so the rightful user's backoff ends when it says it does.
        _forget_attempt(store, attempt)
        raise AuthError("too many failed logins; try again later", status=429, retry_after=wait)
    row = _login_row(store, name)
    try:
        ok = gate.run(check_password, row.password_hash if row is not None else None, password)
    except AuthError:
        _forget_attempt(store, attempt)  # refused for load, not a failure
        raise
    if not ok or row is None:
        raise AuthError("wrong name or password")  # the attempt's row stays: it is the failure
    _clear_failures(store, name, address)
    _rehash_if_needed(store, int(row.id), str(row.password_hash), password, gate)
    return open_session(store, User(int(row.id), row.name, row.role), hours, now=now)


PRUNE_PER_ATTEMPT = 100  # expired failures of any name and address each attempt deletes


def _record_attempt(store: Store, name: str, address: str, now: float, window_s: float) -> int:
    """Record the attempt *before* the throttle counts, committed. Of N parallel guesses, the
    last to count sees all N, so at most the allowed number see a count within the limit:
    guessing in parallel gains nothing.

    Rows past the window are pruned here: this name's and this address's, and the oldest
    ``PRUNE_PER_ATTEMPT`` of any other. A guesser who never repeats a name or an address (IPv6
    gives one a /64 of them) would otherwise leave a row per guess for good. Ids grow with
    time, so the oldest rows are found at the start of the primary key's index."""
    lf = t.login_failures
    since = now - window_s
    with store.engine.begin() as conn:
        conn.execute(lf.delete().where(lf.c.name == name, lf.c.at < since))
        conn.execute(lf.delete().where(lf.c.address == address, lf.c.at < since))
        oldest = sa.select(lf.c.id).where(lf.c.at < since).order_by(lf.c.id).limit(PRUNE_PER_ATTEMPT)
        expired = [r[0] for r in conn.execute(oldest)]
        if expired:
            conn.execute(lf.delete().where(lf.c.id.in_(expired)))
        return int(conn.execute(lf.insert().values(name=name, address=address, at=now).returning(lf.c.id)).scalar_one())


def _throttle_wait(
    store: Store, name: str, address: str, attempt: int, now: float, limits: LoginLimits
) -> float | None:
    """Seconds until this attempt would be allowed, or None if it is allowed now.

    * (name, address): ``max_failures`` free attempts, then each further one only after a
      delay since the latest one, ``backoff_s`` doubling per failure up to ``backoff_max_s``.
      Attempts in flight count as failures until they succeed (the conservative choice).
    * address: at most ``max_failures_per_address`` failures in the window, all names together.
    """
    lf = t.login_failures
    since = now - limits.window_s
    with store.engine.connect() as conn:
        pair = (lf.c.name == name, lf.c.address == address, lf.c.at >= since)
        n_pair = int(conn.execute(sa.select(sa.func.count()).where(*pair)).scalar_one())
        if n_pair > limits.max_failures:
            last = conn.execute(sa.select(sa.func.max(lf.c.at)).where(*pair, lf.c.id != attempt)).scalar_one()
            excess = n_pair - 1 - limits.max_failures
            delay = min(limits.backoff_s * 2.0 ** min(excess, 62), limits.backoff_max_s)
            if last is not None and now < float(last) + delay:
                return float(last) + delay - now
        by_addr = (lf.c.address == address, lf.c.at >= since)
        n_addr = int(conn.execute(sa.select(sa.func.count()).where(*by_addr)).scalar_one())
        if n_addr > limits.max_failures_per_address:
            # Allowed again once enough of the oldest failures have left the window.
            oldest = conn.execute(
                sa.select(lf.c.at)
                .where(*by_addr)
                .order_by(lf.c.at, lf.c.id)
                .offset(n_addr - limits.max_failures_per_address - 1)
                .limit(1)
            ).scalar_one_or_none()
            return max(1.0, (float(oldest) if oldest is not None else now) + limits.window_s - now)
    return None


def _forget_attempt(store: Store, attempt: int) -> None:
    with store.engine.begin() as conn:
        conn.execute(t.login_failures.delete().where(t.login_failures.c.id == attempt))


def _clear_failures(store: Store, name: str, address: str) -> None:
    """A successful login ends the backoff of its (name, address), and only that one."""
    lf = t.login_failures
    with store.engine.begin() as conn:
        conn.execute(lf.delete().where(lf.c.name == name, lf.c.address == address))


def _login_row(store: Store, name: str) -> Any:
    u = t.users
    with store.engine.connect() as conn:
        return conn.execute(
            sa.select(u.c.id, u.c.name, u.c.role, u.c.password_hash).where(u.c.name == name, u.c.disabled == sa.false())
        ).first()


def _rehash_if_needed(store: Store, user_id: int, stored_hash: str, password: str, gate: HashGate) -> None:
    """Move a hash made with other parameters (the old 64 MiB default) to this module's."""
    from argon2.exceptions import InvalidHashError

    try:
        if not _hasher().check_needs_rehash(stored_hash):
            return
        new_hash = gate.run(hash_password, password)
    except (AuthError, InvalidHashError):
        return  # busy now: the next login does it
    with store.engine.begin() as conn:
        conn.execute(t.users.update().where(t.users.c.id == user_id).values(password_hash=new_hash))


def open_session(store: Store, user: User, hours: float, now: float | None = None) -> Session:
    token = secrets.token_urlsafe(32)
    csrf = secrets.token_urlsafe(32)
    now = time.time() if now is None else now
    expires = now + hours * 3600
    with store.engine.begin() as conn:
        conn.execute(
            t.auth_sessions.insert().values(
                token_hash=_hash(token), user_id=user.id, csrf=csrf, created_at=now, expires_at=expires
            )
        )
    return Session(token, user, csrf, expires)


def session_from_token(store: Store, token: str | None, now: float | None = None) -> Session | None:
    """The live session (not revoked, not expired at ``now``, its user enabled) ``token`` names."""
    if not token or len(token) > 128:
        return None
    now = time.time() if now is None else now
    s, u = t.auth_sessions, t.users
    with store.engine.connect() as conn:
        row = conn.execute(
            sa.select(s.c.csrf, s.c.expires_at, u.c.id, u.c.name, u.c.role)
            .join(u, u.c.id == s.c.user_id)
            .where(
                s.c.token_hash == _hash(token),
                s.c.revoked_at.is_(None),
                s.c.expires_at > now,
                u.c.disabled == sa.false(),
            )
        ).first()
    if row is None:
        return None
    return Session(token, User(int(row.id), row.name, row.role), row.csrf, float(row.expires_at))


def revoke_session(store: Store, token: str, now: float | None = None) -> None:
    with store.engine.begin() as conn:
        conn.execute(
            t.auth_sessions.update()
            .where(t.auth_sessions.c.token_hash == _hash(token), t.auth_sessions.c.revoked_at.is_(None))
            .values(revoked_at=time.time() if now is None else now)
        )


def create_api_token(store: Store, user: User, name: str = "api", now: float | None = None) -> str:
    token = "ovt_" + secrets.token_urlsafe(32)
    with store.engine.begin() as conn:
        conn.execute(
            t.api_tokens.insert().values(
                token_hash=_hash(token), user_id=user.id, name=name[:64], created_at=time.time() if now is None else now
            )
        )
    return token


def revoke_api_token(store: Store, token: str, now: float | None = None) -> bool:
    """Revoke one API token (logout with ``Authorization: Bearer``); whether it was live."""
    a = t.api_tokens
    at = time.time() if now is None else now
    with store.engine.begin() as conn:
        res = conn.execute(
            a.update().where(a.c.token_hash == _hash(token), a.c.revoked_at.is_(None)).values(revoked_at=at)
        )
    return bool(res.rowcount)


def revoke_api_tokens(store: Store, user_name: str, label: str | None = None) -> int:
    """Revoke a user's live API tokens, all of them or those created with ``label``; how many."""
    a, u = t.api_tokens, t.users
    user_ids = sa.select(u.c.id).where(u.c.name == user_name).scalar_subquery()
    where = [a.c.user_id == user_ids, a.c.revoked_at.is_(None)]
    if label is not None:
        where.append(a.c.name == label[:64])
    with store.engine.begin() as conn:
        res = conn.execute(a.update().where(*where).values(revoked_at=time.time()))
    return int(res.rowcount)


def user_from_api_token(store: Store, token: str | None) -> User | None:
    if not token or len(token) > 128:
        return None
    a, u = t.api_tokens, t.users
    with store.engine.connect() as conn:
        row = conn.execute(
            sa.select(u.c.id, u.c.name, u.c.role)
            .join(u, u.c.id == a.c.user_id)
            .where(a.c.token_hash == _hash(token), a.c.revoked_at.is_(None), u.c.disabled == sa.false())
        ).first()
    return None if row is None else User(int(row.id), row.name, row.role)


def find_user(store: Store, name: str) -> User | None:
    with store.engine.connect() as conn:
        row = conn.execute(
            sa.select(t.users.c.id, t.users.c.name, t.users.c.role).where(t.users.c.name == name)
        ).first()
    return None if row is None else User(int(row.id), row.name, row.role)


# -- CSRF for anonymous forms (the login page): a signed nonce in a cookie and the form --


def sign(secret: bytes, value: str) -> str:
    return hmac.new(secret, value.encode(), hashlib.sha256).hexdigest()


def new_login_csrf(secret: bytes) -> tuple[str, str]:
    """(nonce for the cookie, token for the form)."""
    nonce = secrets.token_urlsafe(24)
    return nonce, sign(secret, "login:" + nonce)


def check_login_csrf(secret: bytes, nonce: str | None, token: str | None) -> bool:
    if not nonce or not token:
        return False
    return same_secret(sign(secret, "login:" + nonce), token)


def same_secret(expected: str, sent: str) -> bool:
    """A constant-time comparison of a token with what a client sent, as bytes: on text,
    ``hmac.compare_digest`` raises TypeError for any non-ASCII character (a 500 for a token of
    "é"), where a wrong token is simply not the same."""
    return hmac.compare_digest(expected.encode("utf-8", "replace"), sent.encode("utf-8", "replace"))
