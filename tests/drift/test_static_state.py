"""A built signal's static part (transform, detector references) is written once per build, apart
from the checkpoint written at every batch (monitor/drift/static.py), on SQLite and the real
PostgreSQL: restarts give the same alarms, a missing or foreign static part warms only its signal
up again, and checkpoints of the earlier form (whole snapshots every batch) still load."""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
from pathlib import Path
from typing import Any

import numpy as np
import sqlalchemy as sa

import detectors
from monitor.config import load_settings
from monitor.drift import COMPONENT, DriftMonitor
from monitor.drift.static import static_component, unpack_static
from monitor.metrics import Metrics
from monitor.store import BatchWrite, Store
from monitor.store import tables as t

T0 = 1_767_225_600.0
KEY = b"k" * 32
STREAM = "chat"
SIGNALS = ("rm_score", "rm_disagreement")


def _monitor(store: Store) -> DriftMonitor:
    s = load_settings(
        None,
        [
            "dev=true",
            "drift.signals={rm_score: [cusum], rm_disagreement: [cusum]}",
            "drift.fed_reference_size=400",
            "drift.ert=3000",
        ],
    )
    return DriftMonitor(s.drift, store, KEY, Metrics(), boost=lambda *a: None)


def _values(n: int = 4000, change: int = 2500) -> list[tuple[float, float]]:
    """Both signals stationary, then rm_score moves by 1 SD at ``change``."""
    rng = np.random.default_rng(11)
    return [(float(rng.standard_normal() + (i >= change)), float(rng.standard_normal())) for i in range(n)]


def _feed(
    store: Store, values: list[tuple[float, float]], batches: list[range], restart_at: int | None = None
) -> tuple[list[int], list[dict[tuple[str, str], Any]]]:
    """Alarm indices, and what every batch's checkpoint wrote."""
    mon = _monitor(store)
    found: list[int] = []
    written: list[dict[tuple[str, str], Any]] = []
    for b, rng in enumerate(batches):
        if restart_at is not None and b == restart_at:
            mon = _monitor(store)  # a new process: state only from the database
        for i in rng:
            for signal, x in zip(SIGNALS, values[i], strict=True):
                mon.observe_value(STREAM, signal, x, f"e{i}", T0 + i, i)
        batch = BatchWrite()
        states = dict(mon.checkpoint())
        written.append(states)
        batch.states.update(states)
        mon.add_rows(batch)
        found += [int(e["input_index"]) for e in batch.drift_events]
        store.commit_batch(batch)
    return found, written


def _batches(n: int, step: int = 250) -> list[range]:
    return [range(i, min(i + step, n)) for i in range(0, n, step)]


def test_static_part_is_written_once_per_build_and_the_checkpoint_stays_small(db_url: str) -> None:
    values = _values()
    alarms, written = _feed(Store(db_url), values, _batches(len(values)))
    assert alarms and min(alarms) >= 2500  # the change is found, nothing before it
    for signal in SIGNALS:
        writes = [
            w[(STREAM, static_component(COMPONENT, signal))]
            for w in written
            if (STREAM, static_component(COMPONENT, signal)) in w
        ]
        # rm_score re-references after each alarm and builds again from the next 400 values: one
        # write per build, never one per batch.
        rebuilt = [a for a in alarms if a + 400 < len(values) - 1]
        builds = 1 + (len(rebuilt) if signal == "rm_score" else 0)
        assert len(writes) == builds, (signal, len(writes))
        static_size = len(json.dumps(writes[-1]))
        assert static_size > 10_000  # a 400-value reference and its sorted transform
    # A batch's stream state, while both signals are built, holds their online part only: a few KB,
    # not the references (a signal warming up again holds the reference it is filling, as before).
    states = [w[(STREAM, COMPONENT)] for w in written]
    built = [s for s in states if all(sig["detectors"] for sig in s["signals"].values())]
    assert len(built) > len(states) / 2
    assert max(len(json.dumps(s)) for s in built) < 3_000


def test_restart_gives_the_alarms_of_a_monitor_that_never_stopped(db_url: str, tmp_path: Path) -> None:
    values = _values()
    batches = _batches(len(values), 333)
    whole, _ = _feed(Store(f"sqlite:///{tmp_path / 'whole.db'}"), values, batches)
    restarted, _ = _feed(Store(db_url), values, batches, restart_at=5)  # built, before the change
    assert whole and restarted == whole


def _state(store: Store) -> dict[str, Any]:
    state = store.load_state(STREAM, COMPONENT)
    assert state is not None
    return state


def _restored(store: Store) -> dict[str, Any]:
    """What a new monitor holds per signal after loading: detectors, or a reference being filled."""
    mon = _monitor(store)
    mon.observe_value(STREAM, "rm_score", 0.0, "probe", T0 + 10_000, 10_000)
    mon.observe_value(STREAM, "rm_disagreement", 0.0, "probe", T0 + 10_000, 10_000)
    signals: dict[str, Any] = dict(mon.checkpoint())[(STREAM, COMPONENT)]["signals"]
    return signals


def test_a_missing_or_foreign_static_part_warms_only_its_signal_up_again(db_url: str, tmp_path: Path) -> None:
    values = _values(2000)
    store = Store(db_url)
    _feed(store, values, _batches(len(values)))
    # Another stream's build of the same signal: valid content, another hash.
    other = Store(f"sqlite:///{tmp_path / 'other.db'}")
    _feed(other, _values(2000)[::-1], _batches(2000))
    foreign = other.load_state(STREAM, static_component(COMPONENT, "rm_score"))
    assert foreign is not None and foreign != store.load_state(STREAM, static_component(COMPONENT, "rm_score"))
    batch = BatchWrite()
    batch.states[(STREAM, static_component(COMPONENT, "rm_score"))] = foreign
    store.commit_batch(batch)
    signals = _restored(store)
    assert signals["rm_score"]["detectors"] == {} and signals["rm_score"]["ref"] == [0.0]  # warming up
    assert set(signals["rm_disagreement"]["detectors"]) == {"cusum"}  # restored whole
    # The component gone altogether: the same.
    _feed(store, values, _batches(len(values)))
    with store.engine.begin() as conn:
        conn.execute(
            sa.delete(t.stream_state).where(
                t.stream_state.c.stream == STREAM,
                t.stream_state.c.component == static_component(COMPONENT, "rm_disagreement"),
            )
        )
    signals = _restored(store)
    assert signals["rm_disagreement"]["detectors"] == {} and signals["rm_disagreement"]["ref"] == [0.0]
    assert set(signals["rm_score"]["detectors"]) == {"cusum"}


def _sign(data: bytes) -> str:
    return base64.b64encode(hmac.new(KEY, data, hashlib.sha256).digest() + data).decode("ascii")


def _unsign(text: str) -> bytes:
    raw = base64.b64decode(text)
    assert hmac.compare_digest(raw[:32], hmac.new(KEY, raw[32:], hashlib.sha256).digest())
    return raw[32:]


def test_checkpoints_of_the_earlier_form_still_load(db_url: str, tmp_path: Path) -> None:
    values = _values()
    batches = _batches(len(values), 333)
    whole, _ = _feed(Store(f"sqlite:///{tmp_path / 'whole.db'}"), values, batches)
    # Stop after 5 batches (built, before the change), and rewrite the stored state in the earlier
    # form: whole detector snapshots and the transform in the stream's state, no static part.
    store = Store(db_url)
    first, _ = _feed(store, values, batches[:5])
    state = _state(store)
    for signal, s in state["signals"].items():
        sha = _unsign(s.pop("static")).decode()
        transform, static = unpack_static(store.load_state(STREAM, static_component(COMPONENT, signal)), sha)
        s["transform"] = transform
        s["detectors"] = {
            name: _sign(detectors.restore_parts(_unsign(blob), static[name]).snapshot())
            for name, blob in s["detectors"].items()
        }
    batch = BatchWrite()
    batch.states[(STREAM, COMPONENT)] = state
    store.commit_batch(batch)
    rest, _ = _feed(store, values, batches[5:])
    assert first + rest == whole and whole


def _episodes(n: int, change: int) -> list[Any]:
    """Real episodes from the bundled traffic; from ``change`` on every response is a refusal."""
    import gzip

    from monitor.episodes.validate import parse_episode
    from monitor.simulate.demo import bundled_traffic

    out: list[Any] = []
    with gzip.open(bundled_traffic(), "rb") as fh:
        for line in fh:
            try:
                obj = json.loads(line)
                if not isinstance(obj, dict) or not isinstance(obj.get("prompt"), str):
                    continue
                i = len(out)
                obj.update(episode_id=f"e{i}", stream=STREAM, timestamp=T0 + i)
                if i >= change:
                    obj["response"] = f"I'm sorry, but I can't help with that request ({i % 7})."
                out.append(parse_episode(json.dumps(obj).encode(), 1 << 20, T0))
            except ValueError:
                continue
            if len(out) == n:
                return out
    raise AssertionError("not enough bundled episodes")


def test_restart_keeps_the_embedding_detectors_reference(db_url: str, tmp_path: Path) -> None:
    """The kernel MMD reads its reference at every update: restored without its static part it
    would fail (and be disabled) instead of finding the change."""
    from sampling import Decision

    s = load_settings(
        None,
        [
            "dev=true",
            "drift.signals={refusal: [cusum]}",
            "drift.embedding.reference_size=60",
            "drift.detector_params={kmmd: {window_size: 10}, cusum: {k: 0.3}}",
            "drift.ert=5000",
        ],
    )
    eps = _episodes(300, 200)
    drift = Decision({"drift": 1.0}, {"human": 0.0, "rm": 0.0, "drift": 1.0}, 0.5, 0.0)

    def run(store: Store, restart_at: int | None) -> list[tuple[str, int]]:
        mon = DriftMonitor(s.drift, store, KEY, Metrics(), boost=lambda *a: None)
        found: list[tuple[str, int]] = []
        for b, start in enumerate(range(0, len(eps), 50)):
            if b == restart_at:
                mon = DriftMonitor(s.drift, store, KEY, Metrics(), boost=lambda *a: None)
            for i in range(start, start + 50):
                mon.observe(eps[i], drift, i)
            batch = BatchWrite()
            batch.states.update(mon.checkpoint())
            mon.add_rows(batch)
            found += [(str(e["signal"]), int(e["input_index"])) for e in batch.drift_events]
            store.commit_batch(batch)
        return found

    whole = run(Store(f"sqlite:///{tmp_path / 'whole.db'}"), None)
    assert any(sig == "embedding" and i >= 200 for sig, i in whole), whole
    store = Store(db_url)
    assert run(store, 3) == whole  # restarted after the build (60 + the window), before the change
    assert store.load_state(STREAM, static_component(COMPONENT, "embedding")) is not None


def test_a_checkpoint_built_on_other_embeddings_warms_the_embedding_signal_up_again(db_url: str) -> None:
    """An upgrade to the pair encoding, another encoder or another token limit changes every
    embedding: compared with the old reference they would all look like drift. The embedding signal
    warms up again; the text signals keep their detectors."""
    from sampling import Decision

    def settings(prompt_tokens: int) -> Any:
        return load_settings(
            None,
            [
                "dev=true",
                "drift.signals={refusal: [cusum]}",
                "drift.embedding.reference_size=60",
                f"drift.embedding.max_prompt_tokens={prompt_tokens}",
                "drift.detector_params={kmmd: {window_size: 10}, cusum: {k: 0.3}}",
                "drift.ert=5000",
            ],
        )

    eps = _episodes(300, 200)
    drift = Decision({"drift": 1.0}, {"human": 0.0, "rm": 0.0, "drift": 1.0}, 0.5, 0.0)
    store = Store(db_url)

    def batches(mon: DriftMonitor, first: int, last: int) -> dict[str, Any]:
        for start in range(first, last, 50):
            for i in range(start, start + 50):
                mon.observe(eps[i], drift, i)
            batch = BatchWrite()
            batch.states.update(mon.checkpoint())
            mon.add_rows(batch)
            store.commit_batch(batch)
        state = store.load_state(STREAM, COMPONENT)
        assert state is not None
        return dict(state["signals"])

    before = batches(DriftMonitor(settings(32).drift, store, KEY, Metrics(), boost=lambda *a: None), 0, 150)
    assert before["embedding"]["detectors"] and before["refusal"]["n"] == 150  # built; the text signal warming up
    assert str(before["embedding"]["embedding"]).startswith("pair ")
    same = batches(DriftMonitor(settings(32).drift, store, KEY, Metrics(), boost=lambda *a: None), 150, 200)
    assert same["embedding"]["detectors"] and same["embedding"]["n"] > before["embedding"]["n"]  # kept
    other = DriftMonitor(settings(16).drift, store, KEY, Metrics(), boost=lambda *a: None)
    after = batches(other, 200, 250)
    assert not after["embedding"]["detectors"] and after["embedding"]["n"] == 50  # warming up on the new ones
    assert after["embedding"]["embedding"] != before["embedding"]["embedding"]
    assert after["refusal"]["n"] == 250  # the text signal kept its 200 values
    store.close()
