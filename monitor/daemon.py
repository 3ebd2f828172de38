"""An object whose work runs on a daemon thread of its own: how the thread is started and watched,
shared by the store's periodic jobs (``monitor.store.periodic``) and the pipeline's background
workers (``monitor.pipeline.background``). Each stops its thread its own way: a daemon thread never
holds up the interpreter's exit, so stopping is about finishing a round, not about the process.

>>> class Hello(DaemonThread):
...     name = "hello"
...     def thread_main(self) -> None:
...         self.said = "hello"
>>> h = Hello().start()
>>> h.join(5.0)
>>> h.said, h.running
('hello', False)
"""

from __future__ import annotations

import threading
from abc import ABC, abstractmethod
from typing import Self


class DaemonThread(ABC):
    """:meth:`thread_main` on a daemon thread named ``name``, from :meth:`start`."""

    name: str
    _thread: threading.Thread | None = None

    @abstractmethod
    def thread_main(self) -> None:
        """The thread's whole life: it returns when the owner asked it to stop."""

    def start(self) -> Self:
        self._thread = threading.Thread(target=self.thread_main, name=self.name, daemon=True)
        self._thread.start()
        return self

    @property
    def running(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def join(self, timeout: float) -> None:
        """Wait up to ``timeout`` seconds for the thread to end (at once when never started)."""
        if self._thread is not None:
            self._thread.join(timeout)
