"""Bearer tokens of the ingest API: scoped to ingest (never a reviewer's account), optionally to
some streams, stored as SHA-256 hashes only.

A token is 256 random bits, so its SHA-256 is a safe stored form (no password hashing needed:
nothing to guess). The server keeps the active hashes in memory for ``ingest.token_refresh_s``
and compares a presented token's hash with every one of them in constant time.
"""

from __future__ import annotations

import hashlib
import hmac
import re
import secrets
import threading
import time
from collections.abc import Iterable
from dataclasses import dataclass

from monitor.episodes.validate import stream_name_error
from monitor.store import Store
from monitor.store.ingest import IngestTokens, TokenRow

PREFIX = "oit_"  # "oversight ingest token": recognisable in a leaked-secret scan
NAME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")
MAX_TOKEN_CHARS = 256


@dataclass(frozen=True, slots=True)
class Principal:
    """Who sent a request: the token's name and the streams it may write (None: all)."""

    name: str
    streams: frozenset[str] | None

    def allows(self, stream: str) -> bool:
        return self.streams is None or stream in self.streams


def generate_token() -> str:
    return PREFIX + secrets.token_urlsafe(32)


def hash_token(token: str) -> str:
    return hashlib.sha256(token.encode("utf-8", "surrogatepass")).hexdigest()


def add_token(store: Store, name: str, streams: Iterable[str] | None) -> str:
    """Create a token; returns it (the only time it is known). ValueError for a bad or taken name."""
    if not NAME_RE.fullmatch(name):
        raise ValueError(f"token name {name!r}: use 1-64 letters, digits, '.', '_' or '-'")
    chosen = None if streams is None else list(streams)
    if chosen is not None and not chosen:
        raise ValueError("--stream needs a non-empty stream name")
    for stream in chosen or ():
        # A name no record can carry would make a token that can write nothing.
        if (why := stream_name_error(stream)) is not None:
            raise ValueError(f"--stream {stream!r}: {why}")
    token = generate_token()
    if not IngestTokens(store).add(name, hash_token(token), chosen):
        raise ValueError(f"an ingest token named {name!r} exists (revoked names stay taken)")
    return token


def list_tokens(store: Store) -> list[TokenRow]:
    return IngestTokens(store).all()


def revoke_token(store: Store, name: str) -> bool:
    return IngestTokens(store).revoke(name)


class TokenCache:
    """The active tokens, re-read from the database every ``refresh_s`` seconds. Through an
    outage the last list read stays in use (a revocation then waits for the database)."""

    def __init__(self, store: Store, refresh_s: float):
        self._tokens = IngestTokens(store)
        self._refresh_s = refresh_s
        self._lock = threading.Lock()
        self._active: list[tuple[bytes, Principal]] | None = None
        self._read_at = float("-inf")

    def _current(self) -> list[tuple[bytes, Principal]]:
        with self._lock:
            now = time.monotonic()
            if self._active is None or now - self._read_at >= self._refresh_s:
                try:
                    rows = self._tokens.all()
                except Exception:
                    if self._active is None:
                        raise
                else:
                    self._active = [
                        (
                            bytes.fromhex(r.token_hash),
                            Principal(r.name, None if r.streams is None else frozenset(r.streams)),
                        )
                        for r in rows
                        if r.revoked_at is None
                    ]
                    self._read_at = now
            return self._active

    def loaded(self) -> bool:
        try:
            self._current()
        except Exception:
            return False
        return True

    def authenticate(self, token: str) -> Principal | None:
        """The principal of a presented token, or None. Raises when no token list could ever be
        read (the database is down since the start): the caller answers 503, not 401."""
        active = self._current()
        if not token or len(token) > MAX_TOKEN_CHARS:
            return None
        digest = bytes.fromhex(hash_token(token))
        found: Principal | None = None
        for stored, principal in active:
            # Every hash is compared (no early exit), each in constant time.
            if hmac.compare_digest(stored, digest):
                found = principal
        return found
