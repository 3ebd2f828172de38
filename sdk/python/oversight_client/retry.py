"""Exponential backoff with jitter, and the server's ``Retry-After``."""

from __future__ import annotations

import random
from dataclasses import dataclass
from datetime import datetime, timezone
from email.utils import parsedate_to_datetime

# A Retry-After beyond this is read as this: a misconfigured proxy must not park the sender for hours.
MAX_RETRY_AFTER_S = 60.0


@dataclass(frozen=True)
class Backoff:
    """Delay before retry ``attempt`` (0-based): uniformly between half and all of
    ``min(max_s, initial_s * multiplier**attempt)`` ("equal jitter": senders that failed together
    spread out, and the delay still grows), and never less than the server's ``Retry-After``."""

    initial_s: float = 0.1
    max_s: float = 10.0
    multiplier: float = 2.0

    def __post_init__(self) -> None:
        if not (0 < self.initial_s <= self.max_s) or self.multiplier < 1:
            raise ValueError("backoff needs 0 < initial_s <= max_s and multiplier >= 1")

    def delay(self, attempt: int, retry_after_s: float | None = None, rng: random.Random | None = None) -> float:
        cap = min(self.max_s, self.initial_s * self.multiplier ** min(attempt, 64))
        d = (rng or random).uniform(cap / 2, cap)
        if retry_after_s is not None:
            d = max(d, min(retry_after_s, MAX_RETRY_AFTER_S))
        return d


def parse_retry_after(value: str | None, now: datetime | None = None) -> float | None:
    """Seconds from a ``Retry-After`` header (delta-seconds or an HTTP date); None if absent or unreadable."""
    if value is None:
        return None
    value = value.strip()
    try:
        return max(0.0, float(value)) if value.replace(".", "", 1).isdigit() else _from_date(value, now)
    except (TypeError, ValueError, OverflowError):
        return None


def _from_date(value: str, now: datetime | None) -> float:
    when = parsedate_to_datetime(value)
    if when.tzinfo is None:
        # datetime.UTC is 3.11+; the client supports 3.10.
        when = when.replace(tzinfo=timezone.utc)  # noqa: UP017
    return max(0.0, (when - (now or datetime.now(timezone.utc))).total_seconds())  # noqa: UP017
