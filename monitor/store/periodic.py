"""A job that runs every few seconds on a daemon thread of its own, until stopped: the service's
maintenance of its store (the retention purge, the SQLite checkpoints).

A round that fails is the job's to count and log in :meth:`PeriodicJob.run_once`; the thread goes
on to the next round whatever it returns, so no round can stop the job.
"""

from __future__ import annotations

import logging
import threading
import time
from abc import abstractmethod

from monitor.daemon import DaemonThread

log = logging.getLogger("monitor.store")


class PeriodicJob(DaemonThread):
    """:meth:`run_once` every ``every_s`` seconds on a daemon thread named ``name``; the first round
    at once (``first_now``) or after one interval. :meth:`finish` runs on the thread after the last."""

    name = "periodic"
    first_now = True
    stop_timeout_s = 10.0

    def __init__(self, every_s: float):
        self.every_s = every_s
        self._stop = threading.Event()

    @abstractmethod
    def run_once(self) -> object:
        """One round; it counts and logs its own failure and never raises."""

    def finish(self) -> None:
        """After the last round, on the job's thread (close what the rounds opened)."""

    def thread_main(self) -> None:
        if self.first_now:
            self.run_once()
        while not self._stop.wait(self.every_s):
            self.run_once()
        self.finish()

    def stop(self, timeout: float | None = None) -> None:
        """Stop after the round in progress; say so when it outlasts ``timeout`` (by default
        ``stop_timeout_s``)."""
        self._stop.set()
        started = time.monotonic()
        self.join(self.stop_timeout_s if timeout is None else timeout)
        if self.running:
            log.warning("%s: still running after %.0f s", self.name, time.monotonic() - started)
