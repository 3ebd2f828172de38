"""The values a signal keeps while its detectors are built: packed once, exact across a restart."""

from __future__ import annotations

import math
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import sqlalchemy as sa

from monitor.config import load_settings
from monitor.drift import DriftMonitor
from monitor.drift.reference import SCALAR_CHUNK, pack_reference, ref_component, unpack_reference
from monitor.drift.waiting import CHUNK, EARLIER_CHUNK, VECTOR_CHUNK, WaitingValues, chunk_component
from monitor.metrics import Metrics
from monitor.store import BatchWrite, Store
from monitor.store import tables as t

KEY = b"w" * 32
T0 = 1_767_225_600.0


def test_scalars_round_trip_exactly_and_pack_only_what_is_new() -> None:
    rng = np.random.default_rng(5)
    xs = [float(v) for v in rng.standard_normal(CHUNK - 60)] + [0.0, -0.0, 1e-308, 1e308, math.inf, -math.inf, 1, True]
    w = WaitingValues()
    for i, x in enumerate(xs[:150]):
        w.append(x, (f"ep-{i}", T0 + i / 3, i))
    first = w.to_state()
    for i, x in enumerate(xs[150:], 150):
        w.append(x, (f"ep-{i}", T0 + i / 3, i))
    back = list(WaitingValues.from_state(w.to_state()))
    assert len(back) == len(xs)
    for (x, at), want, i in zip(back, xs, range(len(xs)), strict=True):
        assert x == float(want) and math.copysign(1, x) == math.copysign(1, float(want))
        assert at == (f"ep-{i}", T0 + i / 3, i)
    # The earlier state still reads as the first 150: each state is whole, not a delta.
    assert [at[2] for _, at in WaitingValues.from_state(first)] == list(range(150))


def test_nan_survives_and_vectors_keep_float16_precision() -> None:
    w = WaitingValues()
    w.append(math.nan, ("a", 1.0, 0))
    assert math.isnan(next(iter(WaitingValues.from_state(w.to_state())))[0])
    rng = np.random.default_rng(1)
    vecs = [rng.standard_normal(384).astype(np.float32) for _ in range(5)]
    v = WaitingValues()
    for i, x in enumerate(vecs[:2]):
        v.append(x, (f"e{i}", float(i), i))
    v.to_state()
    for i, x in enumerate(vecs[2:], 2):
        v.append(x, (f"e{i}", float(i), i))
    back = list(WaitingValues.from_state(v.to_state()))
    assert [at for _, at in back] == [(f"e{i}", float(i), i) for i in range(5)]
    for (x, _), want in zip(back, vecs, strict=True):
        assert x.shape == (384,) and np.allclose(x, want, atol=2e-3, rtol=1e-3)


def test_checkpoints_of_the_earlier_form_still_load() -> None:
    old = {"values": [0.25, 1.5], "at": [["e0", 10.0, 3], ["e1", 11.0, 4]]}
    assert list(WaitingValues.from_state(old)) == [(0.25, ("e0", 10.0, 3)), (1.5, ("e1", 11.0, 4))]
    with pytest.raises(ValueError):
        WaitingValues.from_state({"ids": ["a"], "ts": "", "idx": "", "f64": ""})
    one = WaitingValues()
    one.append(1.0, ("e", 1.0, 0))
    with pytest.raises(ValueError):  # values without their arrivals
        WaitingValues.from_state(one.to_state(arrivals=False))


@pytest.fixture
def held_builds(monkeypatch: pytest.MonkeyPatch) -> Iterator[threading.Event]:
    """Background builds wait for the event: values keep waiting for as long as the test needs."""
    from detectors.calibration import CalibrationProcess

    release = threading.Event()
    real = CalibrationProcess.param

    def param(self: CalibrationProcess, *args: Any, **kw: Any) -> float:
        release.wait(60)
        return real(self, *args, **kw)

    monkeypatch.setattr(CalibrationProcess, "param", param)
    yield release
    release.set()


def _monitor(store: Store) -> DriftMonitor:
    s = load_settings(
        None,
        [
            "dev=true",
            "drift.signals={rm_score: [cusum], rm_disagreement: [cusum]}",
            "drift.fed_reference_size=40",
            "drift.ert=20000",
        ],
    )
    return DriftMonitor(s.drift, store, KEY, Metrics(), boost=lambda *a: None)


def _feed(mon: DriftMonitor, store: Store, xs: list[float], lo: int, hi: int) -> list[tuple[str, str, float, int]]:
    for i in range(lo, hi):
        mon.observe_value("chat", "rm_score", xs[i], f"ep-{i}", T0 + i, i)
        mon.observe_value("chat", "rm_disagreement", float(xs[i] > 1.0), f"ep-{i}", T0 + i, i)
    batch = BatchWrite()
    batch.states.update(mon.checkpoint())
    mon.add_rows(batch)
    store.commit_batch(batch)
    return [
        (str(e["signal"]), str(e["episode_id"]), float(e["event_ts"]), int(e["input_index"]))
        for e in batch.drift_events
    ]


def test_a_restart_while_the_detectors_are_built_feeds_every_waiting_value_once(
    db_url: str, tmp_path: Path, held_builds: threading.Event
) -> None:
    """A replica checkpoints while its detectors are built in the background, with values waiting,
    and stops. The next one reads the waiting values from the checkpoint and finds the same alarms,
    at the same episodes, as a monitor that never stopped (on SQLite and PostgreSQL, whose JSONB
    does not keep the order of keys)."""
    rng = np.random.default_rng(11)
    xs = [float(v) + (1.5 if i >= 140 else 0.0) for i, v in enumerate(rng.standard_normal(600))]

    whole_store = Store(f"sqlite:///{tmp_path / 'whole.db'}")
    whole = _monitor(whole_store)
    want = _feed(whole, whole_store, xs, 0, 300) + _feed(whole, whole_store, xs, 300, 600)
    # Both signals alarm after the change, from values that waited in the restarted run (40-299).
    assert {e[0] for e in want if 140 <= e[3] < 300} == {"rm_score", "rm_disagreement"}

    store = Store(db_url)
    first = _monitor(store)
    first.arm_in_background()  # its builds wait for held_builds
    try:
        got = _feed(first, store, xs, 0, 300)
    finally:
        first.close()
    state = store.load_state("chat", "drift")
    assert state is not None
    # Both signals wait on the same episodes: their arrivals are written once.
    score, disagreement = state["signals"]["rm_score"]["waiting"], state["signals"]["rm_disagreement"]["waiting"]
    assert len(WaitingValues.from_state(score)) == 300 - 40 and "ids" not in disagreement
    assert disagreement["arrivals_of"] == "rm_score"
    second = _monitor(store)
    got += _feed(second, store, xs, 300, 600)
    # The same alarms; their order within a batch may differ (the restarted monitor feeds one
    # signal's waiting values, then the next's).
    assert sorted(got, key=lambda e: (e[3], e[0])) == sorted(want, key=lambda e: (e[3], e[0]))


def test_a_build_cut_short_is_started_again_without_a_next_value(
    db_url: str, tmp_path: Path, held_builds: threading.Event
) -> None:
    """A replica is killed while its detectors are built, after its input was consumed (or its
    stream went quiet). The restarted service starts the build again at once and finds the alarms
    in the values that waited: before, only the stream's next value started it, so a finished
    input exited with them unexamined, run after run."""
    rng = np.random.default_rng(11)
    xs = [float(v) + (1.5 if i >= 140 else 0.0) for i, v in enumerate(rng.standard_normal(300))]
    store = Store(db_url)
    first = _monitor(store)
    first.arm_in_background()  # its builds wait for held_builds: the kill comes first
    try:
        assert _feed(first, store, xs, 0, 300) == []
    finally:
        first.close()
    second = _monitor(store)
    second.arm_in_background()
    try:
        assert second.resume_builds() == 2
        assert second.resume_builds() == 0  # nothing twice
        assert second.outstanding(), "a finite run must wait for the builds before it exits"
        held_builds.set()
        events = []
        deadline = time.monotonic() + 60
        while second.outstanding() and time.monotonic() < deadline:  # what the service's idle work does
            if second.between_batches():
                batch = BatchWrite()
                batch.states.update(second.checkpoint())  # installs the builds, feeds the waiting values
                second.add_rows(batch)
                store.commit_batch(batch)
                events += batch.drift_events
            time.sleep(0.05)
    finally:
        second.close()
    assert {str(e["signal"]) for e in events} == {"rm_score", "rm_disagreement"}
    assert all(140 <= int(e["input_index"]) < 300 for e in events)
    assert not second.outstanding()
    assert _monitor(store).resume_builds() == 0  # installed and checkpointed: nothing left to build


@pytest.mark.parametrize("ids", [["a"], [""], ["x\ny", "z"], ["a", "b", "c"], []])
def test_ids_of_any_shape_come_back(ids: list[str]) -> None:
    w = WaitingValues()
    for i, e in enumerate(ids):
        w.append(float(i), (e, float(i), i))
    assert [at[0] for _, at in WaitingValues.from_state(w.to_state())] == ids


def test_full_chunks_are_handed_out_once_leave_memory_and_are_read_back_before_the_tail() -> None:
    w = WaitingValues()
    n = 2 * CHUNK + 37
    want = [(float(i) / 7, (f"e{i}", T0 + i, i)) for i in range(n)]
    written: dict[int, dict[str, Any]] = {}
    for i, (x, at) in enumerate(want):
        w.append(x, at)
        if i % 700 == 0 or i == n - 1:  # checkpoints at uneven places
            state = w.to_state()
            for j, chunk in w.new_chunks():
                assert j not in written
                written[j] = chunk
    assert sorted(written) == [0, 1] and state["sealed"] == 2 and state["n"] == 37
    assert list(w.items(written.get)) == want
    with pytest.raises(RuntimeError):  # the chunks are no longer in memory
        list(w)
    back = WaitingValues.from_state(state)  # a restarted replica: the tail, and two chunks stored
    assert len(back) == n and back.new_chunks() == []  # those chunks are stored already
    assert list(back.items(written.get)) == want
    with pytest.raises(ValueError):  # a chunk the store lost
        list(back.items({0: written[0]}.get))


def test_a_long_build_writes_chunks_once_and_a_restart_reads_them(
    db_url: str, tmp_path: Path, held_builds: threading.Event
) -> None:
    """Values wait across two batches, long enough to fill chunks: the restarted monitor reads the
    chunks and the tail and finds the alarms of a monitor that never stopped. A chunk that went
    missing makes that signal warm up again (logged), without stopping the monitor."""
    rng = np.random.default_rng(12)
    xs = [float(v) + (1.5 if i >= 900 else 0.0) for i, v in enumerate(rng.standard_normal(3200))]
    cuts = [(0, 1500), (1500, 2700), (2700, 3200)]
    whole_store = Store(f"sqlite:///{tmp_path / 'whole.db'}")
    whole = _monitor(whole_store)
    want = [e for lo, hi in cuts for e in _feed(whole, whole_store, xs, lo, hi)]

    store = Store(db_url)
    first = _monitor(store)
    first.arm_in_background()
    try:
        got = _feed(first, store, xs, *cuts[0]) + _feed(first, store, xs, *cuts[1])
    finally:
        first.close()
    state = store.load_state("chat", "drift")
    assert state is not None and state["signals"]["rm_score"]["waiting"]["sealed"] == (2700 - 40) // CHUNK
    # A chunk filled in the same batch on both signals: the tail's arrivals are still written once.
    assert state["signals"]["rm_disagreement"]["waiting"].get("arrivals_of") == "rm_score"
    assert store.load_state("chat", chunk_component("drift", "rm_score", 1)) is not None
    second = _monitor(store)
    got += _feed(second, store, xs, *cuts[2])
    assert sorted(got, key=lambda e: (e[3], e[0])) == sorted(want, key=lambda e: (e[3], e[0]))
    assert any(e[3] >= 900 for e in got)

    # The same checkpoint with a chunk gone: the signal warms up again, the other keeps its values.
    lost = Store(f"sqlite:///{tmp_path / 'lost.db'}")
    first = _monitor(lost)
    first.arm_in_background()
    try:
        _feed(first, lost, xs, *cuts[0])
    finally:
        first.close()
    with lost.engine.begin() as conn:
        conn.execute(
            sa.delete(t.stream_state).where(t.stream_state.c.component == chunk_component("drift", "rm_score", 0))
        )
    third = _monitor(lost)
    found = _feed(third, lost, xs, 1500, 1501)
    after = lost.load_state("chat", "drift")
    assert after is not None
    assert "waiting" not in after["signals"]["rm_score"] and len(after["signals"]["rm_score"]["ref"]) == 1
    # rm_disagreement's tail arrivals are in rm_score's state, its values in its own: restored whole,
    # they were fed to its detectors, and the change among them alarmed.
    assert found and {e[0] for e in found} == {"rm_disagreement"} and all(900 <= e[3] < 1500 for e in found)


def test_vector_chunks_round_trip() -> None:
    """The embedding signal waits with vectors: chunks of VECTOR_CHUNK rows (a 1 KB row each), cut at
    the same rows as the arrivals, so a batch rewrites at most that many; the size is in the state."""
    rng = np.random.default_rng(2)
    vecs = rng.standard_normal((2 * VECTOR_CHUNK + 5, 16)).astype(np.float32)
    w = WaitingValues()
    for i, v in enumerate(vecs):
        w.append(v, (f"e{i}", float(i), i))
    state = w.to_state()
    chunks = [c for _, c in w.new_chunks()]
    assert state["sealed"] == 2 and state["chunk"] == VECTOR_CHUNK and state["shape"] == [5, 16]
    assert [c["shape"] for c in chunks] == [[VECTOR_CHUNK, 16]] * 2
    back = WaitingValues.from_state(state)
    assert back.chunk == VECTOR_CHUNK and back.new_chunks() == []  # those chunks are stored already
    got = list(back.items(dict(enumerate(chunks)).get))
    assert [at for _, at in got] == [(f"e{i}", float(i), i) for i in range(len(vecs))]
    assert np.allclose(np.stack([x for x, _ in got]), vecs, atol=2e-3, rtol=1e-3)


def test_a_checkpoint_without_its_chunk_size_was_cut_at_the_earlier_size() -> None:
    """Checkpoints written before the size was recorded cut vectors and scalars at 1,024: read so."""
    rng = np.random.default_rng(3)
    vecs = rng.standard_normal((EARLIER_CHUNK + 3, 4)).astype(np.float32)
    w = WaitingValues(EARLIER_CHUNK)  # as the earlier version cut them
    for i, v in enumerate(vecs):
        w.append(v, (f"e{i}", float(i), i))
    state = w.to_state()
    chunks = dict(w.new_chunks())
    del state["chunk"]
    back = WaitingValues.from_state(state)
    assert back.chunk == EARLIER_CHUNK and len(back) == EARLIER_CHUNK + 3
    assert np.allclose(np.stack([x for x, _ in back.items(chunks.get)]), vecs, atol=2e-3, rtol=1e-3)
    back.append(vecs[0], ("later", 0.0, 0))
    assert back.to_state()["chunk"] == EARLIER_CHUNK  # the values after it keep the stored cut


def _monitor_ref(store: Store, ref_size: int) -> DriftMonitor:
    s = load_settings(
        None,
        ["dev=true", "drift.signals={rm_score: [cusum]}", f"drift.fed_reference_size={ref_size}", "drift.ert=20000"],
    )
    return DriftMonitor(s.drift, store, KEY, Metrics(), boost=lambda *a: None)


def _feed_ref(
    mon: DriftMonitor, store: Store, xs: list[float], lo: int, hi: int, written: list[str]
) -> list[tuple[str, int]]:
    """Values ``lo`` to ``hi`` of rm_score and one checkpoint; the components it wrote go to ``written``."""
    for i in range(lo, hi):
        mon.observe_value("chat", "rm_score", xs[i], f"ep-{i}", T0 + i, i)
    batch = BatchWrite()
    batch.states.update(mon.checkpoint())
    written.extend(component for _, component in batch.states)
    mon.add_rows(batch)
    store.commit_batch(batch)
    return [(str(e["signal"]), int(e["input_index"])) for e in batch.drift_events]


def test_a_filling_reference_writes_each_chunk_once_and_a_restart_reads_it_whole(
    db_url: str, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """The reference fills over four checkpoints and the replica stops before it is full: each
    full chunk was written by one checkpoint only, the stream's state holds the tail, and the
    next replica reads the reference whole: it arms at the same value and finds the same alarms
    as a monitor that never stopped. A chunk that went missing makes the signal warm up again
    (logged), without stopping the monitor."""
    size = 3 * SCALAR_CHUNK + 50
    rng = np.random.default_rng(5)
    xs = [float(v) + (2.0 if i >= size + 300 else 0.0) for i, v in enumerate(rng.standard_normal(size + 600))]
    cuts = [(0, 100), (100, 250), (250, 300), (300, size - 10), (size - 10, size + 600)]
    whole_store = Store(f"sqlite:///{tmp_path / 'whole.db'}")
    whole = _monitor_ref(whole_store, size)
    want = [e for lo, hi in cuts for e in _feed_ref(whole, whole_store, xs, lo, hi, [])]
    assert want and all(i >= size + 300 for _, i in want)  # the change alarms, nothing before it

    store = Store(db_url)
    first = _monitor_ref(store, size)
    written: list[str] = []
    got = [e for lo, hi in cuts[:4] for e in _feed_ref(first, store, xs, lo, hi, written)]
    chunks = [c for c in written if c.startswith("drift:ref:")]
    assert sorted(chunks) == [ref_component("drift", "rm_score", j) for j in range(3)]  # each once
    state = store.load_state("chat", "drift")
    assert state is not None
    entry = state["signals"]["rm_score"]
    assert entry["ref_sealed"] == 3 and len(entry["ref"]) == size - 10 - 3 * SCALAR_CHUNK
    second = _monitor_ref(store, size)
    got += _feed_ref(second, store, xs, *cuts[4], [])
    assert got == want

    # The same stop with chunk 1 gone: the signal warms up again from the next value, logged.
    with store.engine.begin() as conn:
        conn.execute(
            sa.delete(t.stream_state).where(t.stream_state.c.component == ref_component("drift", "rm_score", 1))
        )
        conn.execute(sa.delete(t.drift_events))
    third = _monitor_ref(Store(db_url), size)
    _feed_ref(third, store, xs, size - 10, size - 5, [])
    after = store.load_state("chat", "drift")
    assert after is not None and after["signals"]["rm_score"]["ref"] == xs[size - 10 : size - 5]
    assert after["signals"]["rm_score"]["ref_sealed"] == 0
    assert "drift state of 'chat'/rm_score not used (unreadable: its reference" in caplog.text


def test_a_vector_reference_is_written_in_chunks_of_vector_chunk_rows() -> None:
    """The embedding reference (float16 rows of 1 KB): chunks of VECTOR_CHUNK rows, the tail the
    rest; read back whole, in order, at float16 precision; a chunk of another size is refused."""
    rng = np.random.default_rng(4)
    ref = list(rng.standard_normal((2 * VECTOR_CHUNK + 7, 8)).astype(np.float32))
    state, chunks = pack_reference(ref, sealed_before=0)
    assert [j for j, _ in chunks] == [0, 1] and state["ref_sealed"] == 2 and state["ref_chunk"] == VECTOR_CHUNK
    assert state["ref"]["shape"] == [7, 8] and [c["shape"] for _, c in chunks] == [[VECTOR_CHUNK, 8]] * 2
    back = unpack_reference(state, dict(chunks).get)
    assert back is not None and np.allclose(np.stack(back), np.stack(ref), atol=2e-3, rtol=1e-3)
    assert pack_reference(ref, sealed_before=2)[1] == []
    with pytest.raises(ValueError, match="holds 7 values"):
        unpack_reference(state, {0: chunks[0][1], 1: state["ref"]}.get)


def test_a_long_backlog_is_replayed_in_runs_with_the_alarms_of_a_monitor_that_never_waited(
    tmp_path: Path, held_builds: threading.Event
) -> None:
    """Values that waited for a build go into its detectors in runs through the batch path
    (``DriftMonitor._replay``): across runs, with alarms among them and builds of the new
    reference started in the middle of the replay, the alarms are those of a monitor whose
    detectors were built at once, at the same episodes."""
    from monitor.drift.monitor import REPLAY_RUN

    n = 2 * REPLAY_RUN + 2000
    rng = np.random.default_rng(23)
    shift = [1.5 if n // 4 <= i < n // 2 else (-1.0 if i >= 3 * n // 4 else 0.0) for i in range(n)]
    xs = [float(v) + s for v, s in zip(rng.standard_normal(n), shift, strict=True)]
    whole_store = Store(f"sqlite:///{tmp_path / 'whole.db'}")
    whole = _monitor(whole_store)
    want = _feed(whole, whole_store, xs, 0, n)
    assert len({e[3] for e in want if e[0] == "rm_score"}) >= 3  # alarms in several runs of the replay

    store = Store(f"sqlite:///{tmp_path / 'waited.db'}")
    mon = _monitor(store)
    mon.arm_in_background()
    try:
        got = _feed(mon, store, xs, 0, n)  # every value after the reference waits for the held build
        assert got == []
        held_builds.set()
        deadline = time.monotonic() + 120
        while mon.outstanding() and time.monotonic() < deadline:
            time.sleep(0.05)
            got += _feed(mon, store, xs, n, n)  # a checkpoint installs what was built meanwhile
        assert not mon.outstanding()
    finally:
        mon.close()
    assert sorted(got, key=lambda e: (e[3], e[0])) == sorted(want, key=lambda e: (e[3], e[0]))
