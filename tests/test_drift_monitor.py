"""Drift detection inside the pipeline, on real traffic: a policy swap fires one event per signal,
boosts review sampling at once, survives a restart, and can be re-referenced."""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from prometheus_client import CollectorRegistry
from realdata import alpaca_rows

from monitor.config import Settings, load_settings
from monitor.drift import COMPONENT, request_rereference
from monitor.episodes.deadletter import JsonlDeadLetterSink
from monitor.service import Service, build_service
from monitor.sources.memory import MemorySource
from monitor.store import Store

T0 = 1_767_225_600


def swap_stream(n_before: int = 600, n_after: int = 400) -> list[bytes]:
    """gpt-3.5-turbo-1106 answers, then alpaca-7b answers (a real policy swap; same prompts)."""
    out = []

    import random

    # Shuffled: the files are ordered by prompt source, itself a real shift we do not want here.
    gpt, alpaca = alpaca_rows("gpt-3.5-turbo-1106"), alpaca_rows("alpaca-7b")
    order = list(range(805))
    random.Random(7).shuffle(order)
    for i in range(n_before + n_after):
        j = order[i % 805]
        src = gpt[j] if i < n_before else alpaca[j]
        out.append(
            json.dumps(
                {
                    "episode_id": f"e{i}",
                    "stream": "chat",
                    "model": "policy",
                    "timestamp": T0 + i,
                    "prompt": src["instruction"],
                    "response": src["output"],
                }
            ).encode()
        )
    return out


def settings(db: str, tmp: Path, *extra: str) -> Settings:
    return load_settings(
        None,
        [
            "dev=true",
            f"database.url={db}",
            f"dead_letter.path={tmp / 'd.jsonl'}",
            "pipeline.batch_size=100",
            "drift.reference_size=300",
            "drift.ert=3000",
            "drift.signals={response_log_chars: [adwin], distinct_token_ratio: [adwin], refusal: [cusum]}",
            "drift.embedding.enabled=false",
            "drift.cooldown=200",
            "drift.boost_factor=4",
            "drift.boost_duration_s=100000",
            "sampling.human.rate=0.05",
            *extra,
        ],
    )


def pipeline(s: Settings, values: list[bytes], store: Store | None = None) -> Service:
    sink = JsonlDeadLetterSink(s.dead_letter.path, 1000)
    return build_service(
        s, source=MemorySource(values), serve=False, store=store, dead_letters=sink, registry=CollectorRegistry()
    )


@pytest.fixture
def values() -> list[bytes]:
    return swap_stream()


def test_policy_swap_fires_once_per_signal_and_boosts(values: list[bytes], sqlite_url: str, tmp_path: Path) -> None:
    p = pipeline(settings(sqlite_url, tmp_path), values)
    stats = p.run()
    events = stats.drift_events
    assert events, "the policy swap was not detected"
    first = min(e["index"] for e in events)
    assert 600 <= first < 800, events  # after the change, within 200 episodes
    signals = [e["signal"] for e in events]
    assert len(signals) == len(set(signals)), f"a burst of events for one signal: {events}"
    assert not [e for e in events if e["index"] < 600], "false alarm before the change"
    # Boosted at once: episodes right after the event are sampled at 4x the human rate.
    rows = p.store.sampled("chat", "human")
    probs = {int(r["episode_id"][1:]): r["inclusion_probability"] for r in rows}
    assert all(pr == pytest.approx(0.05) for i, pr in probs.items() if i <= first)
    assert any(pr == pytest.approx(0.2) for i, pr in probs.items() if i > first)
    # Persisted, with the metrics.
    import sqlalchemy as sa

    with p.store.engine.connect() as c:
        n = c.execute(sa.text("SELECT COUNT(*) FROM drift_events")).scalar_one()
    assert n == len(events)
    got = p.metrics.registry.get_sample_value(
        "oversight_drift_events_total",
        {"stream": "chat", "signal": events[0]["signal"], "detector": events[0]["detector"]},
    )
    assert got and got >= 1


def test_restart_mid_stream_fires_at_the_same_index(values: list[bytes], sqlite_url: str, tmp_path: Path) -> None:
    whole = pipeline(settings(f"sqlite:///{tmp_path / 'a.db'}", tmp_path), values).run().drift_events
    s = settings(f"sqlite:///{tmp_path / 'b.db'}", tmp_path)
    store = Store(s.database.url)
    first = pipeline(s, values, store).pipeline
    first.open()
    for _ in range(5):  # 500 episodes: past the warm-up, before the change
        first.process_batch(first.source.poll(100, 0.0))
    # A new process resumes from the checkpoint (offsets + sampling + detector state).
    rest = pipeline(s, values, store).run().drift_events
    assert [(e["index"], e["signal"], e["detector"]) for e in rest] == [
        (e["index"], e["signal"], e["detector"]) for e in whole
    ]


def test_tampered_checkpoint_is_not_unpickled(values: list[bytes], sqlite_url: str, tmp_path: Path) -> None:
    s = settings(sqlite_url, tmp_path)
    store = Store(s.database.url)
    p = pipeline(s, values[:500], store)
    p.run()
    snap = store.load_state("chat", COMPONENT)
    assert snap is not None
    blob = next(b for st in snap["signals"].values() for b in st["detectors"].values() if b)
    import base64

    raw = bytearray(base64.b64decode(blob))
    raw[40] ^= 0xFF  # flip a byte of the pickle, keep the old signature
    for st in snap["signals"].values():
        for name in st["detectors"]:
            st["detectors"][name] = base64.b64encode(bytes(raw)).decode()
    from monitor.store import BatchWrite

    store.commit_batch(BatchWrite(states={("chat", COMPONENT): snap}))
    again = pipeline(s, values, store)
    again.pipeline.open()
    again.pipeline.process_batch(again.pipeline.source.poll(10, 0.0))
    assert again.drift is not None
    st = again.drift._streams["chat"].signals["response_log_chars"]
    assert st.ref is not None and st.detectors == {}  # warming up again, nothing unpickled


def test_rereference_is_applied_and_audited(values: list[bytes], sqlite_url: str, tmp_path: Path) -> None:
    s = settings(sqlite_url, tmp_path)
    store = Store(s.database.url)
    p = pipeline(s, values[:500], store)
    p.run()
    rid = request_rereference(store, "chat", None, "new policy version acknowledged", "alice")
    p2 = pipeline(s, values[:600], store)
    p2.run()
    import sqlalchemy as sa

    with store.engine.connect() as c:
        row = c.execute(sa.text("SELECT applied_at, reason, actor FROM drift_audit WHERE id = :i"), {"i": rid}).one()
    assert row[0] is not None and row[1] == "new policy version acknowledged" and row[2] == "alice"
    snap = store.load_state("chat", COMPONENT)
    assert snap is not None
    # 100 episodes since the re-reference: every signal is warming up again with them.
    assert all(st["ref"] is not None and len(st["ref"]) == 100 for st in snap["signals"].values())


def test_a_rereference_poll_is_one_query_whatever_the_streams_held(sqlite_url: str, tmp_path: Path) -> None:
    """The service polls for re-reference requests every few seconds. It asked the database once
    per stream it held, so at 20,000 streams a poll took longer than its period and the pipeline
    did little else. One query now: requests of held streams are applied, others stay pending."""
    import sqlalchemy as sa

    s = settings(sqlite_url, tmp_path, "drift.rereference_poll_s=0.001")
    store = Store(s.database.url)
    rows = [
        json.dumps({"episode_id": f"e{i}", "stream": f"s{i}", "prompt": "p", "response": "r", "timestamp": T0 + i})
        for i in range(300)
    ]
    svc = pipeline(s, [r.encode() for r in rows], store)
    svc.run()
    drift = svc.drift
    assert drift is not None
    held = request_rereference(store, "s7", None, "acknowledged", "alice")
    other = request_rereference(store, "elsewhere", None, "another replica's stream", "bob")
    statements: list[str] = []

    def count(conn: object, cursor: object, statement: str, *args: object) -> None:
        statements.append(statement)

    # The poll is paced: run() polled at its end, and the two requests above can be written in
    # under the 1 ms period on a fast disk, when this poll would be skipped. Wait out the period.
    time.sleep(2 * s.drift.rereference_poll_s)
    sa.event.listen(store.engine, "before_cursor_execute", count)
    try:
        drift.poll_rereference()
    finally:
        sa.event.remove(store.engine, "before_cursor_execute", count)
    assert sum("drift_audit" in x for x in statements) == 1, statements
    assert drift.take_applied() == [held]
    assert other != held


def _refused(p: Service, reason: str) -> float:
    got = p.metrics.registry.get_sample_value("oversight_drift_state_refused_total", {"reason": reason})
    assert got is not None  # pre-zeroed
    return got


def _edit_blob(snap: dict[str, Any]) -> None:
    snap["signals"]["response_log_chars"]["detectors"]["adwin"] = "not base64!"


def _edit_count(snap: dict[str, Any]) -> None:
    snap["signals"]["response_log_chars"]["n"] = "lots"


def _edit_cooldown(snap: dict[str, Any]) -> None:
    snap["signals"]["response_log_chars"]["cooldown"] = None


def _edit_static(snap: dict[str, Any]) -> None:
    snap["signals"]["response_log_chars"]["static"] = 5


def _edit_fed(snap: dict[str, Any]) -> None:
    snap["fed"] = ["not", "a", "mapping"]


@pytest.mark.parametrize(
    ("edit", "signals_lost"),
    [(_edit_blob, 1), (_edit_count, 1), (_edit_cooldown, 1), (_edit_static, 1), (_edit_fed, 3)],  # fed: the whole row
    ids=["blob", "count", "cooldown", "static", "fed"],
)
def test_a_malformed_checkpoint_warms_up_again_and_loses_no_episode(
    edit: Callable[[dict[str, Any]], None], signals_lost: int, values: list[bytes], sqlite_url: str, tmp_path: Path
) -> None:
    """A checkpoint row edited by hand or written by another release: the parts that cannot be
    used are refused (counted) and warm up again. It used to raise on every episode of the stream,
    which went to dead letters, on every run: nothing rewrote the row."""
    s = settings(sqlite_url, tmp_path)
    store = Store(s.database.url)
    pipeline(s, values[:500], store).run()
    snap = store.load_state("chat", COMPONENT)
    assert snap is not None
    edit(snap)
    from monitor.store import BatchWrite

    store.commit_batch(BatchWrite(states={("chat", COMPONENT): snap}))
    again = pipeline(s, values[:600], store)
    stats = again.run()
    assert stats.invalid == 0 and not stats.dead_letters
    assert store.traffic_count("chat") == 600
    assert _refused(again, "unreadable") == 1
    after = store.load_state("chat", COMPONENT)
    assert after is not None
    warming = [name for name, st in after["signals"].items() if st["ref"] is not None]
    assert len(warming) == signals_lost  # the rest kept their detectors


def test_a_checkpoint_of_another_format_is_refused_and_counted(
    values: list[bytes], sqlite_url: str, tmp_path: Path
) -> None:
    s = settings(sqlite_url, tmp_path)
    store = Store(s.database.url)
    pipeline(s, values[:500], store).run()
    snap = store.load_state("chat", COMPONENT)
    assert snap is not None
    snap["version"] = 99
    from monitor.store import BatchWrite

    store.commit_batch(BatchWrite(states={("chat", COMPONENT): snap}))
    again = pipeline(s, values[:600], store)
    assert not again.run().dead_letters
    assert _refused(again, "version") == 1 and _refused(again, "unreadable") == 0


def test_detectors_configured_differently_since_are_built_again(
    values: list[bytes], sqlite_url: str, tmp_path: Path
) -> None:
    """A signal switched to another detector (the README's advice for streams at volume, say) kept
    the checkpoint's detector, and the configured one never watched: it warms up again now. The
    signals whose settings did not change keep their detectors, and so does a checkpoint written
    before the settings were saved with it, when its detector names are the configured ones."""
    s = settings(sqlite_url, tmp_path)
    store = Store(s.database.url)
    pipeline(s, values[:500], store).run()
    snap = store.load_state("chat", COMPONENT)
    assert snap is not None and all(st["settings"] for st in snap["signals"].values())

    same = pipeline(s, values[:510], store)
    same.run()
    assert _refused(same, "settings") == 0
    kept = store.load_state("chat", COMPONENT)
    assert kept is not None and all(st["ref"] is None for st in kept["signals"].values())

    for st in kept["signals"].values():  # as a release before the settings were saved wrote it
        del st["settings"]
    from monitor.store import BatchWrite

    store.commit_batch(BatchWrite(states={("chat", COMPONENT): kept}))
    old = pipeline(s, values[:520], store)
    old.run()
    assert _refused(old, "settings") == 0

    changed = settings(
        sqlite_url,
        tmp_path,
        "drift.signals={response_log_chars: [cusum], distinct_token_ratio: [adwin], refusal: [cusum]}",
    )
    switched = pipeline(changed, values[:530], store)
    switched.run()
    assert _refused(switched, "settings") == 1
    after = store.load_state("chat", COMPONENT)
    assert after is not None
    assert after["signals"]["response_log_chars"]["ref"] is not None  # warming up, for cusum
    assert after["signals"]["distinct_token_ratio"]["ref"] is None


def test_an_unreadable_label_cursor_costs_no_episode(values: list[bytes], sqlite_url: str, tmp_path: Path) -> None:
    s = settings(
        sqlite_url,
        tmp_path,
        "drift.signals={response_log_chars: [adwin], rm_disagreement: [cusum]}",
    )
    store = Store(s.database.url)
    from monitor.store import BatchWrite

    store.commit_batch(BatchWrite(states={("chat", "rm_disagreement"): {"last_label_id": None}}))
    stats = pipeline(s, values[:200], store).run()
    assert stats.invalid == 0 and not stats.dead_letters and store.traffic_count("chat") == 200
