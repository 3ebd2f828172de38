"""A pace for periodic work whose cost grows with what it reads: it runs at most ``duty`` of the
time, measured by its own runs. The oversight gauges (the action worker) and the review queue's
depth (the review service's scrapes) both read more the longer the service runs."""

from __future__ import annotations

__all__ = ["Pace"]


class Pace:
    """After a run that started at ``start`` and took ``took`` seconds, the next is due at
    ``start + took / duty`` (a run that failed counts the same). Times are the caller's clock,
    a monotonic one.

    >>> pace = Pace(0.25)
    >>> pace.due(0.0)
    True
    >>> pace.ran(0.0, 1.0)
    >>> pace.due(3.9), pace.due(4.0)
    (False, True)
    """

    def __init__(self, duty: float) -> None:
        if not 0.0 < duty <= 1.0:
            raise ValueError("duty must be in (0, 1]")
        self.duty = duty
        self._next = 0.0

    def due(self, now: float) -> bool:
        return now >= self._next

    def ran(self, start: float, took: float) -> None:
        self._next = start + took / self.duty
