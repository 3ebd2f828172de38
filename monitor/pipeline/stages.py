"""The contract between the pipeline and the stages that watch its episodes (drift detection,
reward-model scoring, the reviewer/reward-model disagreement feed).

A stage is built by the composition root (``monitor.service``) and handed to the pipeline, which
never imports one: stages later in the flow meet the pipeline only through this protocol.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any, Protocol

from monitor.episodes import Episode
from monitor.store import BatchWrite
from sampling import Decision


class EpisodeObserver(Protocol):
    """A later stage that sees every valid episode with its sampling decision.

    Per batch, in this order: ``prepare`` with the batch's valid episodes, then ``observe`` for
    each of them (inline, so that an effect such as a drift boost applies from the very next
    episode), then ``checkpoint`` and ``add_rows`` (their results commit in the batch's
    transaction). ``forget`` drops in-memory state (it
    reloads from the last checkpoint); ``between_batches`` does idle work in the service loop, and
    ``outstanding`` says whether work off the pipeline's thread remains.
    """

    def prepare(self, episodes: Sequence[tuple[Episode, int]]) -> None:
        """The batch's episodes (with their input index) that ``observe`` will see, in that order,
        before they are sampled: the work that does not depend on a sampling decision, done for
        the batch at once. What must take effect at an episode (a boost) waits for its
        ``observe``; an episode ``observe`` does not reach (its record failed first) is still one
        this stage saw. A stage with nothing to do at once does nothing."""
        ...

    def observe(self, episode: Episode, decision: Decision, index: int) -> None: ...

    def checkpoint(self) -> Mapping[tuple[str, str], dict[str, Any]]:
        """State changed since the last call, keyed by (stream, component). It may read the
        database (through the pipeline's retry policy) and must change nothing when it fails, so
        that calling it again after an outage is safe."""
        ...

    def add_rows(self, batch: BatchWrite) -> None:
        """Rows found since the last call (drift events, scores) that commit with the batch."""
        ...

    def forget(self) -> None: ...

    def between_batches(self) -> bool:
        """Idle work; True when the stage has state to commit now although no record came."""
        ...

    def outstanding(self) -> bool:
        """Work of committed episodes still to do off the pipeline's thread (an inference worker's
        backlog), or done and not yet committed: at the end of a finite input the loop waits for it."""
        ...
