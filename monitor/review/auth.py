"""Users, password hashing (argon2), login rate limiting, sessions, API tokens, CSRF.

Session and API tokens are random 256-bit values; only their SHA-256 is stored.
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
import time
from dataclasses import dataclass
from typing import Any

import sqlalchemy as sa

from monitor.store import Store
from monitor.store import tables as t

ROLES = ("reviewer", "admin")
NAME_RE = r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}"


class AuthError(Exception):
    """Login refused; ``status`` is the HTTP status to answer with."""

    def __init__(self, message: str, status: int = 401):
        super().__init__(message)
        self.status = status


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


def _hasher() -> Any:
    from argon2 import PasswordHasher

    return PasswordHasher()


def generate_password() -> str:
    return secrets.token_urlsafe(18)


def create_user(store: Store, name: str, role: str, password: str) -> User:
    import re

    if not re.fullmatch(NAME_RE, name):
        raise ValueError("user names are 1-64 letters, digits, '.', '_' or '-'")
    if role not in ROLES:
        raise ValueError(f"role must be one of {', '.join(ROLES)}")
    if len(password) < 10:
        raise ValueError("passwords must be at least 10 characters")
    with store.engine.begin() as conn:
        exists = conn.execute(sa.select(t.users.c.id).where(t.users.c.name == name)).first()
        if exists is not None:
            raise ValueError(f"user {name!r} already exists")
        uid = conn.execute(
            t.users.insert()
            .values(name=name, role=role, password_hash=_hasher().hash(password), created_at=time.time())
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
    max_failures: int,
    window_s: int,
    hours: float,
    max_failures_per_address: int | None = None,
) -> Session:
    """Check a password and open a new session (a new token every login: no fixation)."""
    now = time.time()
    name = name[:64]
    address = address[:64]
    # Record the attempt *before* checking the password, committed, then count: of N
    # parallel guesses at most ``max_failures`` see a count within the limit, so
    # guessing in parallel gains nothing. A successful login deletes its record.
    with store.engine.begin() as conn:
        attempt = conn.execute(
            t.login_failures.insert().values(name=name, address=address, at=now).returning(t.login_failures.c.id)
        ).scalar_one()
    with store.engine.connect() as conn:
        since = now - window_s
        by_name = conn.execute(
            sa.select(sa.func.count()).where(t.login_failures.c.name == name, t.login_failures.c.at >= since)
        ).scalar_one()
        by_addr = conn.execute(
            sa.select(sa.func.count()).where(t.login_failures.c.address == address, t.login_failures.c.at >= since)
        ).scalar_one()
        per_address = max_failures * 4 if max_failures_per_address is None else max_failures_per_address
        if by_name > max_failures or by_addr > per_address:
            raise AuthError("too many failed logins; try again later", status=429)
        row = conn.execute(
            sa.select(t.users.c.id, t.users.c.name, t.users.c.role, t.users.c.password_hash).where(
                t.users.c.name == name, t.users.c.disabled == sa.false()
            )
        ).first()
    hasher = _hasher()
    ok = False
    if row is not None:
        from argon2.exceptions import InvalidHashError, VerifyMismatchError

        try:
            ok = bool(hasher.verify(row.password_hash, password))
        except (VerifyMismatchError, InvalidHashError):
            ok = False
    else:
        # Same work for unknown names: no user enumeration by timing.
        hasher.hash(password)
    if not ok:
        raise AuthError("wrong name or password")
    assert row is not None
    with store.engine.begin() as conn:
        conn.execute(t.login_failures.delete().where(t.login_failures.c.id == attempt))
    if hasher.check_needs_rehash(row.password_hash):
        with store.engine.begin() as conn:
            conn.execute(t.users.update().where(t.users.c.id == row.id).values(password_hash=hasher.hash(password)))
    return open_session(store, User(int(row.id), row.name, row.role), hours)


def open_session(store: Store, user: User, hours: float) -> Session:
    token = secrets.token_urlsafe(32)
    csrf = secrets.token_urlsafe(32)
    now = time.time()
    expires = now + hours * 3600
    with store.engine.begin() as conn:
        conn.execute(
            t.auth_sessions.insert().values(
                token_hash=_hash(token), user_id=user.id, csrf=csrf, created_at=now, expires_at=expires
            )
        )
    return Session(token, user, csrf, expires)


def session_from_token(store: Store, token: str | None) -> Session | None:
    if not token or len(token) > 128:
        return None
    now = time.time()
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


def revoke_session(store: Store, token: str) -> None:
    with store.engine.begin() as conn:
        conn.execute(
            t.auth_sessions.update()
            .where(t.auth_sessions.c.token_hash == _hash(token), t.auth_sessions.c.revoked_at.is_(None))
            .values(revoked_at=time.time())
        )


def create_api_token(store: Store, user: User, name: str = "api") -> str:
    token = "ovt_" + secrets.token_urlsafe(32)
    with store.engine.begin() as conn:
        conn.execute(
            t.api_tokens.insert().values(
                token_hash=_hash(token), user_id=user.id, name=name[:64], created_at=time.time()
            )
        )
    return token


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
    return hmac.compare_digest(sign(secret, "login:" + nonce), token)
