"""Committing a batch: dead letters first (flushed), then one database transaction, and what to
do when the store refuses an episode or another consumer moved the offsets.

Kept apart from the hot loop (``monitor.pipeline.core``): this is the part that talks to the
store and the dead-letter sink, through the pipeline's retry policy.
"""

from __future__ import annotations

import json
import logging
import threading
import time
import traceback
from collections.abc import Callable, Mapping
from typing import Any

from monitor.episodes import Episode
from monitor.episodes.deadletter import DeadLetter, DeadLetterSink
from monitor.metrics import Metrics
from monitor.pipeline.stats import RunStats
from monitor.retry import NoProgress, RetryPolicy, first_line, transient
from monitor.sources.base import Record, Source
from monitor.store import BatchWrite, EpisodeIdConflict, StaleOffsets, Store
from monitor.store.store import BUCKET_S

log = logging.getLogger("monitor.pipeline")

STALE_LIMIT = 10  # batches rolled back in a row (offsets moved under us) before giving up
# Dead letters made at the commit, of records the batch's loop had counted as valid episodes.
LATE_REASONS = ("store_rejected", "episode_id_conflict")


def describe(e: BaseException, limit: int = 300) -> str:
    """``Class: first line of the message``, for a dead letter or a log line about an unexpected
    exception (the class says more than many messages do: ``KeyError: 'x'``)."""
    name = type(e).__name__
    text = first_line(e, limit)
    return name if text == name else f"{name}: {text}"


class Committer:
    """Writes a batch's dead letters and commits its rows, retrying through outages."""

    def __init__(
        self,
        store: Store,
        source: Source,
        dead_letters: DeadLetterSink,
        retry: RetryPolicy,
        metrics: Metrics,
        stats: RunStats,
        forget_state: Callable[[], None],
        *,
        statement_timeout_s: float | None = None,
    ):
        self.store = store
        # A batch's statement that waits longer (a lock held elsewhere) is cancelled by the
        # database and the batch retried as in an outage, instead of hanging the pipeline.
        self.statement_timeout_s = statement_timeout_s
        self.dead_letters = dead_letters
        self.retry = retry
        self.metrics = metrics
        self.stats = stats
        self.source = source  # rewound to the stored offsets after a rollback
        self._forget_state = forget_state
        self._stale_in_a_row = 0
        self._internal_seen: set[str] = set()  # exception classes already logged with a traceback
        self.last_ok = 0.0  # monotonic time of the last successful commit

    # -- dead letters ------------------------------------------------------------
    @staticmethod
    def letter(
        rec: Record, source: str, reason: str, detail: str, episode_id: str | None, stream: str | None
    ) -> DeadLetter:
        return DeadLetter(
            reason=reason,
            detail=detail,
            raw=rec.value,
            source=source,
            partition=rec.partition,
            offset=rec.offset,
            received_at=rec.received_at,
            size=rec.full_size if rec.full_size is not None else len(rec.value),
            key=rec.key,
            episode_id=episode_id,
            stream=stream,
        )

    def internal_error(self, rec: Record, source: str, e: Exception, ep: Episode | None) -> DeadLetter:
        """The dead letter of a record whose processing raised unexpectedly, logged: the
        traceback once per exception class (a poison stream must not flood the log), one line
        after that. The message is logged escaped: it may quote the record."""
        name = type(e).__name__
        where = f"{source}:{rec.partition}:{rec.offset}"
        detail = describe(e)
        if name in self._internal_seen:
            log.error("record %s dead-lettered as internal_error: %r", where, detail)
        else:
            self._internal_seen.add(name)
            frames = "".join(traceback.format_tb(e.__traceback__))
            log.error("record %s dead-lettered as internal_error: %r\n%s", where, detail, frames)
        eid, stream = (None, None) if ep is None else (ep.episode_id, ep.stream)
        return self.letter(rec, source, "internal_error", detail, eid, stream)

    # -- the commit --------------------------------------------------------------
    def commit(self, batch: BatchWrite, letters: list[DeadLetter], stop: threading.Event | None) -> bool:
        """Dead letters (flushed), then the batch in one transaction. False: another consumer moved
        the offsets; the batch was rolled back and the source rewound."""
        self.retry.call(lambda: self._send_letters(letters), "dead_letter", stop)
        try:
            self.retry.call(lambda: self._commit_store(batch, letters, stop), "store", stop)
        except StaleOffsets as e:
            if not self._own_commit(batch, e, stop):
                lost = self.retry.call(lambda: self.store.regressed(batch), "store", stop)
                if lost:
                    self._reread(lost)
                else:
                    self._rolled_back(e, stop)
                return False
        self._stale_in_a_row = 0
        self.last_ok = time.monotonic()
        return True

    def _own_commit(self, batch: BatchWrite, e: StaleOffsets, stop: threading.Event | None) -> bool:
        """Whether the refused compare-and-set found this batch's own commit: an earlier attempt
        committed, and the connection died before its reply (a database crash between COMMIT
        and the answer). Then the batch is stored, whole, and is counted as committed, not as
        a batch another consumer took: no rollback, no stale batch, nothing lost from the run's
        counts. Asked through the retry policy: the outage may not be over."""
        if not self.retry.call(lambda: self.store.committed(batch), "store", stop):
            return False
        log.warning("the database had committed the batch before the connection was lost (%s); it is stored", e)
        return True

    def _reread(self, lost: Mapping[tuple[str, int], tuple[int, int | None]]) -> None:
        """The stored offsets went back behind what this consumer had committed: the database
        lost acknowledged batches (a failover to a standby that was behind, a restore from a
        backup). Not another consumer (those only move offsets forward), so no backoff and no
        stale batch: the per-stream state is reloaded from the checkpoint the database has, and
        the source rewinds to the stored offsets, so that the records the database lost are
        read and stored again, exactly once, from a source that still holds them (Kafka within
        its retention, a file). A pipe cannot be read again: what it delivered in between is
        not in the database, and the log says how much."""
        self.metrics.offset_regressions.inc(len(lost))
        self.stats.offset_regressions += len(lost)
        self._forget_state()
        for (source, partition), (had, stored) in sorted(lost.items()):
            log.error(
                "the stored offset of %s[%d] went back from %d to %s: the database lost batches it had"
                " committed (a failover to a standby that was behind, a restore from a backup); rewinding"
                " to it (Kafka and files are read again from there; a pipe cannot be, and what it"
                " delivered since is not in the database)",
                source,
                partition,
                had,
                "the start" if stored is None else stored,
            )
        self.source.rewind()

    def _rolled_back(self, e: StaleOffsets, stop: threading.Event | None) -> None:
        """Another consumer moved the offsets: forget the batch's state, wait, and rewind to the
        stored offsets. A rewind that keeps failing is not progress (a consumer that can never
        win the compare-and-set): counted, backed off, and given up after ``STALE_LIMIT``."""
        self._stale_in_a_row += 1
        n = self._stale_in_a_row
        self.metrics.stale_batches.inc()
        self.stats.stale_batches += 1
        self._forget_state()
        if n > STALE_LIMIT:
            raise NoProgress(
                f"gave up after {STALE_LIMIT} batches in a row were rolled back: {e}. Another consumer keeps"
                f" moving the offsets of {self.source.name}, or this input was already stored by another run"
            )
        log.warning("batch rolled back (%d in a row): %s; rewinding to the stored offsets", n, e)
        # Backoff before the rewind, so that a competing writer can finish and the rewind sees it.
        self.retry.wait(
            min(self.retry.first_delay_s * 2 ** (n - 1), self.retry.max_delay_s),
            stop,
            "stopped while rewinding a rolled-back batch; it will be redelivered",
        )
        self.source.rewind()

    def _send_letters(self, letters: list[DeadLetter]) -> None:
        if not letters:
            return
        for letter in letters:
            self.dead_letters.send(letter)
        self.dead_letters.flush()

    def _commit_store(self, batch: BatchWrite, letters: list[DeadLetter], stop: threading.Event | None) -> None:
        # Each conflict takes its rows out of the batch, so this ends.
        while True:
            try:
                self._commit_or_reject(batch, letters, stop)
                return
            except EpisodeIdConflict as c:
                log.warning("%s; dead-lettered as episode_id_conflict", c)
                self._reject_rows(batch, "episode_id_conflict", c.rows, letters, stop)

    def _commit_or_reject(self, batch: BatchWrite, letters: list[DeadLetter], stop: threading.Event | None) -> None:
        try:
            self.store.commit_batch(batch, timeout_s=self.statement_timeout_s)
        except Exception as e:
            if transient(e) or isinstance(e, StaleOffsets):
                raise
            # Not transient: some episode is unacceptable to this database (or to the driver's
            # encoder) although it passed validation. Find it, dead-letter it, commit the rest.
            rejected = self.store.find_rejected(batch)
            if not rejected:
                raise
            log.warning("store rejected %d episode(s): %r", len(rejected), describe(e, 200))
            rows = {
                (eid, row["stream"]): detail
                for row in batch.episodes
                if (detail := rejected.get(eid := row["episode_id"]))
            }
            self._reject_rows(batch, "store_rejected", rows, letters, stop)
            self.store.commit_batch(batch, timeout_s=self.statement_timeout_s)

    def _reject_rows(
        self,
        batch: BatchWrite,
        reason: str,
        rejected: Mapping[tuple[str, str], str],
        letters: list[DeadLetter],
        stop: threading.Event | None,
    ) -> None:
        """Dead-letter the rejected episodes, (episode id, stream) -> detail (flushed before the
        commit, as all dead letters), and take them out of the batch: rows, and their traffic
        count, so each record is counted once."""
        extra = []
        for row in batch.episodes:
            detail = rejected.get((row["episode_id"], row["stream"]))
            if detail is not None:
                raw = reencode(row)
                partition, offset = row["position"].split(":")
                extra.append(
                    DeadLetter(
                        reason=reason,
                        detail=detail[:500],
                        raw=raw,
                        source=row["source"],
                        partition=int(partition),
                        offset=int(offset),
                        received_at=row["ingested_at"],
                        size=len(raw),
                        episode_id=row["episode_id"],
                        stream=row["stream"],
                    )
                )
                key = (row["stream"], int(row["ts"] // BUCKET_S) * BUCKET_S)
                left = batch.traffic.get(key, 0) - 1
                if left > 0:
                    batch.traffic[key] = left
                else:
                    batch.traffic.pop(key, None)
        self.retry.call(lambda: self._send_letters(extra), "dead_letter", stop)
        letters.extend(extra)
        batch.episodes = [r for r in batch.episodes if (r["episode_id"], r["stream"]) not in rejected]
        batch.samples = [r for r in batch.samples if (r["episode_id"], r["stream"]) not in rejected]
        batch.tasks = [r for r in batch.tasks if (r["episode_id"], r["stream"]) not in rejected]
        batch.rm_scores = [r for r in batch.rm_scores if (r["episode_id"], r["stream"]) not in rejected]

    # -- accounting (after the commit) ------------------------------------------------
    def account_letters(self, letters: list[DeadLetter]) -> None:
        stats, m = self.stats, self.metrics
        for letter in letters:
            stats.count_invalid(letter.stream)
            stats.dead_letters[letter.reason] += 1
            m.dead_letters.labels(letter.reason).inc()
            m.episodes.labels(m.stream_label(letter.stream), "invalid").inc()

    def account_events(self, batch: BatchWrite) -> list[dict[str, Any]]:
        """The batch's drift events as the run's report lists them, counted in the metrics."""
        m = self.metrics
        out = []
        for ev in batch.drift_events:
            out.append(
                {
                    "index": ev["input_index"],
                    "episode_id": ev["episode_id"],
                    "stream": ev["stream"],
                    "signal": ev["signal"],
                    "detector": ev["detector"],
                    "statistic": ev["statistic"],
                    "threshold": ev["threshold"],
                }
            )
            m.drift_events.labels(m.stream_label(ev["stream"]), ev["signal"], ev["detector"]).inc()
        return out


def reencode(row: Mapping[str, Any]) -> bytes:
    """A stored-episode row as the JSON record a dead letter carries (ASCII: attacker-controlled)."""
    obj = {k: row[k] for k in ("episode_id", "stream", "model", "prompt", "response", "metadata")}
    obj["timestamp"] = row["ts"]
    try:
        return json.dumps(obj, ensure_ascii=True, default=str).encode("ascii")
    except (ValueError, TypeError, RecursionError) as e:
        # The metadata may be what the store refused to encode; the dead letter must still be written.
        obj["metadata"] = {"unencodable": describe(e, 200)}
        return json.dumps(obj, ensure_ascii=True, default=str).encode("ascii")
