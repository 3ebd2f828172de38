"""Model work off the pipeline's thread: a worker that computes results for episodes waiting in
the store, whose results commit with a later batch.

The backlog is the database itself: a committed sample whose result has not committed yet (an
rm- or human-sampled episode without a score, a drift-sampled one not yet embedded) is waiting.
The worker thread fetches the oldest waiting items, computes their results and holds them; the
stage that owns the worker takes them at its next checkpoint and commits them, with whatever
they changed (detector state, drift events, score rows) and the marker that they are done, in
that batch's transaction. So the effects are exactly once across crashes and restarts: a result
that did not commit is computed again (the item still waits); one that committed is never
fetched again.

Ingest never waits for any of this. The worker holds at most ``max_pending`` results not yet
committed and waits when it has that many; an item whose computation failed waits
``retry_after_s`` before it is fetched again. With ``give_up_after``, an item that failed that
many times, each time after the model had produced other results since its previous failure, is
the item's fault (a judge that refuses one prompt with a 400, an answer it cannot parse), not the
model's: ``give_up`` takes it off the backlog for good. Without that, such items piled up, oldest
first in every fetch, and their retries took a growing share of the worker until the items
behind them starved. A model that fails every item (an endpoint down, a broken prompt template)
gives up on none: its items wait until it recovers. Handed-out items are *claimed* so that the next
fetch skips them until their commit (or release, when the pipeline dropped its batch).

Nor does ingest share the CPU with it as an equal. The worker's thread runs ``nice`` steps below
the process (Linux keeps a nice value per thread), so when the cores are all busy, as when a
service catches up a backlog on a small host, the scheduler gives them to the ingest threads and
the broker first: the model work takes what is left, its backlog grows, and the model channels'
rates adapt down to what it serves (never below their floors). A thread keeps the GIL only
between the model's calls, which release it, so the lower priority cannot hold ingest up.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections.abc import Callable, Sequence
from operator import attrgetter
from typing import Any, Generic, TypeVar

from monitor.config import InferenceConfig
from monitor.daemon import DaemonThread
from monitor.retry import first_line

log = logging.getLogger(__name__)

W = TypeVar("W")  # an item waiting in the store
R = TypeVar("R")  # its result


class Later:
    """A result of ``compute`` for an item it could not compute through no fault of the item's (an
    endpoint's timeout, 429 or 5xx, an open circuit): the item waits for its retry as after a
    failure (``None``), but the failure never counts toward ``give_up_after``."""

    __slots__ = ()

    def __repr__(self) -> str:
        return "LATER"


LATER = Later()

#: ``fetch(limit, skip)``: up to ``limit`` waiting items, oldest first, none whose key is in ``skip``.
Fetch = Callable[[int, frozenset[str]], Sequence[W]]
#: ``compute(items)``: one result per item, ``None`` where it failed (the item waits for a retry),
#: ``LATER`` where it failed through no fault of its own (it waits, and is never given up for it).
Compute = Callable[[Sequence[W]], Sequence["R | Later | None"]]
#: After each round, with (results, failures): metrics.
Counted = Callable[[int, int], None]
#: ``give_up(items)``: take items off the backlog for good (durably: they are not fetched again).
GiveUp = Callable[[Sequence[W]], None]

CLAIM_S = 3600.0  # a result handed over is committed (or released) long before this


class BackgroundWork(DaemonThread, Generic[W, R]):
    """One daemon thread: fetch -> compute -> hold; :meth:`take` hands the results over.

    >>> work = BackgroundWork("double", lambda n, skip: [i for i in ("a", "bb") if i not in skip][:n],
    ...                       lambda items: [len(i) * 2 for i in items], key=str)
    >>> work.run_once(), work.take()
    (2, [('a', 2), ('bb', 4)])
    >>> work.run_once()  # both are claimed until the next take: nothing is fetched twice
    0
    """

    def __init__(
        self,
        name: str,
        fetch: Fetch[W],
        compute: Compute[W, R],
        key: Callable[[W], str],
        *,
        batch: int = 32,
        poll_s: float = 1.0,
        max_pending: int = 1000,
        retry_after_s: float = 30.0,
        counted: Counted | None = None,
        waiting: Callable[[frozenset[str]], bool] | None = None,
        nice: int = 0,
        give_up_after: int = 0,
        give_up: GiveUp[W] | None = None,
    ):
        self.name = name
        self.fetch = fetch
        self.compute = compute
        self.key = key
        self.batch = batch
        self.poll_s = poll_s
        self.max_pending = max_pending
        self.retry_after_s = retry_after_s
        self.counted = counted
        # Whether an item not in the given keys waits for its result, where ``fetch`` alone cannot
        # tell: results computed by another process are fetched once stored, and one not stored
        # yet is still work left.
        self.waiting = waiting
        self.nice = nice
        self.give_up_after = give_up_after if give_up is not None else 0
        self.give_up = give_up
        self.given_up = 0  # items taken off the backlog as hopeless, over the worker's life
        # Per failing item: failures that counted, and ``computed`` at its last failure (a failure
        # counts only when other results came since: the model works, this item does not).
        self._failures: dict[str, tuple[int, int]] = {}
        self.failed = 0  # items whose computation failed (they stay waiting), over the worker's life
        self.attempted = 0
        self.computed = 0
        self.busy_s = 0.0  # seconds spent computing: with ``computed``, the worker's capacity
        self.idle = threading.Event()  # set when the last fetch found nothing waiting
        self._lock = threading.Lock()
        self._done: list[tuple[W, R]] = []
        self._claimed: dict[str, float] = {}  # handed out or failed recently: not fetched again before the time
        self._taken: list[str] = []  # handed over at the last take: committed (or released) by the next
        self._wake = threading.Event()
        self._stop = threading.Event()

    def nudge(self) -> None:
        """New items may be waiting (a batch committed some): fetch now rather than at the next poll."""
        self.idle.clear()
        self._wake.set()

    def stop(self, timeout: float = 5.0) -> None:
        self._stop.set()
        self._wake.set()
        self.join(timeout)

    def pending(self) -> int:
        """Results computed and not yet taken."""
        with self._lock:
            return len(self._done)

    def take(self) -> list[tuple[W, R]]:
        """The results ready to commit, oldest first. The owner calls this once per batch, so those
        of the previous call are committed by now (or were released): they need no claim any more."""
        with self._lock:
            for k in self._taken:
                self._claimed.pop(k, None)
            out, self._done = self._done, []
            self._taken = [self.key(w) for w, _ in out]
        return out

    def release(self, keys: Sequence[str]) -> None:
        """Results that were dropped before their commit (the pipeline forgot its batch): fetch again."""
        with self._lock:
            for k in keys:
                self._claimed.pop(k, None)

    def run_once(self) -> int:
        """One round: fetch, compute, hold. Returns how many items got a result."""
        now = time.monotonic()
        with self._lock:
            self._claimed = {k: v for k, v in self._claimed.items() if v > now}
            room = self.max_pending - len(self._done)
            skip = frozenset(self._claimed)
        if room <= 0:
            return 0
        items = list(self.fetch(min(self.batch, room), skip))
        if not items:
            self.idle.set()
            return 0
        t0 = time.perf_counter()
        try:
            results = self.compute(items)
        except Exception as e:  # the model: these items wait for their retry, the thread goes on
            log.warning("background %s failed on %d items (retrying): %s", self.name, len(items), first_line(e))
            results = self._one_by_one(items) if len(items) > 1 else [None]
        self.busy_s += time.perf_counter() - t0
        return self._hold(items, results)

    def _one_by_one(self, items: Sequence[W]) -> list[R | Later | None]:
        """The items of a round that failed as a whole, computed an item at a time: a failure is
        then the item's own. Charged to every item of the round, one bad item made its neighbours
        fail too, and at ``give_up_after`` they were given up with it (marked unscorable)."""
        out: list[R | Later | None] = []
        for w in items:
            try:
                out.append(self.compute([w])[0])
            except Exception:
                out.append(None)
        return out

    def _hold(self, items: Sequence[W], results: Sequence[R | Later | None]) -> int:
        now = time.monotonic()
        good = [(w, r) for w, r in zip(items, results, strict=True) if r is not None and not isinstance(r, Later)]
        done = {self.key(w) for w, _ in good}
        with self._lock:
            self._done.extend(good)
            for w in items:
                # A result waits for its commit; a failed item for its retry.
                self._claimed[self.key(w)] = now + (CLAIM_S if self.key(w) in done else self.retry_after_s)
        failed = len(items) - len(good)
        self.failed += failed
        self.attempted += len(items)
        self.computed += len(good)
        if self.give_up_after:
            self._count_failures(items, results, len(good))
        if self.counted is not None:
            self.counted(len(good), failed)
        return len(good)

    def _count_failures(self, items: Sequence[W], results: Sequence[R | Later | None], good: int) -> None:
        """Count each failed item's failures that the model's other results show to be the item's,
        and give up on those that reached ``give_up_after``. A failure that is not the item's
        (``LATER``) leaves its count as it was."""
        hopeless: list[W] = []
        for w, r in zip(items, results, strict=True):
            k = self.key(w)
            if isinstance(r, Later):
                continue
            if r is not None:
                self._failures.pop(k, None)
                continue
            # Results since the item's last failure; at its first, this round's.
            count, seen = self._failures.get(k, (0, self.computed - good))
            count += self.computed > seen
            self._failures[k] = (count, self.computed)
            if count >= self.give_up_after:
                hopeless.append(w)
        if not hopeless or self.give_up is None:
            return
        try:
            self.give_up(hopeless)
        except Exception as e:  # the database: they stay waiting, and are given up at their next failure
            log.warning("background %s could not give up on %d items: %s", self.name, len(hopeless), first_line(e))
            return
        for w in hopeless:
            self._failures.pop(self.key(w), None)
        self.given_up += len(hopeless)
        log.warning(
            "background %s gave up on %d items that failed %d times each while others succeeded (first: %s)",
            self.name,
            len(hopeless),
            self.give_up_after,
            self.key(hopeless[0])[:80],
        )

    def outstanding(self) -> bool:
        """Work left: results held for the owner, or an item waiting that is not claimed (one being
        computed now counts; one whose computation failed waits for its retry, and does not)."""
        with self._lock:
            if self._done:
                return True
            skip = frozenset(self._claimed)
        return self.waiting(skip) if self.waiting is not None else bool(self.fetch(1, skip))

    def capacity(self) -> float | None:
        """Items per second of computing time so far (None before the first result)."""
        return self.computed / self.busy_s if self.computed and self.busy_s > 0 else None

    def thread_main(self) -> None:
        lower_thread_priority(self.nice, self.name)
        while not self._stop.is_set():
            try:
                n = self.run_once()
            except Exception as e:  # the database: keep the thread, try again later
                log.warning("background %s failed (retrying): %s", self.name, first_line(e))
                n = 0
            if n == 0:
                self._wake.wait(self.poll_s)
                self._wake.clear()

    def __enter__(self) -> BackgroundWork[W, R]:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.stop()


def lower_thread_priority(steps: int, name: str) -> int | None:
    """Run the calling thread ``steps`` nice values below the process (its main thread; capped at
    19, the lowest); the threads it starts from then on inherit it. Relative to the process, not
    to the thread, so a worker started from another worker is not lowered twice, and never raised
    (that needs a privilege). Returns the thread's nice value, or None when nothing changed:
    ``steps`` 0, or a platform without per-thread priorities (the work then runs at the process's,
    as before; a lower priority is an optimisation, never a requirement).

    >>> import threading
    >>> out = []
    >>> th = threading.Thread(target=lambda: out.append(lower_thread_priority(0, "doc")))
    >>> th.start(); th.join(); out
    [None]
    """
    if steps <= 0:
        return None
    try:
        tid = threading.get_native_id()
        now = os.getpriority(os.PRIO_PROCESS, tid)
        nice = max(now, min(19, os.getpriority(os.PRIO_PROCESS, os.getpid()) + steps))
        if nice != now:
            os.setpriority(os.PRIO_PROCESS, tid, nice)
    except (AttributeError, OSError) as e:  # not Linux, or a sandbox that forbids it
        log.debug("background %s keeps the process's CPU priority: %s", name, e)
        return None
    return nice


def episode_work(
    name: str,
    fetch: Fetch[W],
    compute: Compute[W, R],
    icfg: InferenceConfig,
    *,
    batch: int | None = None,
    counted: Counted | None = None,
    waiting: Callable[[frozenset[str]], bool] | None = None,
    give_up_after: int = 0,
    give_up: GiveUp[W] | None = None,
) -> BackgroundWork[W, R]:
    """A worker over items keyed by their ``episode_id``, paced by ``inference`` (``batch``: items
    per fetch, default ``inference.batch_size``; its thread ``inference.nice`` below ingest's
    priority). Not started."""
    return BackgroundWork(
        name,
        fetch,
        compute,
        key=attrgetter("episode_id"),
        batch=icfg.batch_size if batch is None else batch,
        poll_s=icfg.poll_s,
        max_pending=icfg.max_pending,
        retry_after_s=icfg.retry_after_s,
        counted=counted,
        waiting=waiting,
        nice=icfg.nice,
        give_up_after=give_up_after,
        give_up=give_up,
    )
