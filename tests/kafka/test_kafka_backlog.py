"""The model channels' throttle in Kafka mode reads the backlog of the streams the replica holds."""

from __future__ import annotations

import threading
import time
import uuid
from typing import Any

import pytest
import sqlalchemy as sa

pytestmark = pytest.mark.kafka


def test_a_quiet_streams_backlog_does_not_throttle_the_streams_that_speak(kenv: Any, sqlite_url: str) -> None:
    """After a restart a replica feeds only the streams it has seen an episode of since its
    assignment. A stream quiet since then keeps its waiting drift samples, which no replica feeds:
    read over the whole database, their age halved every stream's drift rate down to its floor,
    for good. The throttle reads the backlog of the replica's own streams."""
    from prometheus_client import CollectorRegistry

    from monitor.service import build_service
    from monitor.store import tables as t

    topic, group = kenv.topic(partitions=1), f"g-{uuid.uuid4().hex[:8]}"
    settings = kenv.settings(
        topic,
        group,
        sqlite_url,
        "sampling.drift.rate=1.0",
        "reward.enabled=false",
        "drift.enabled=true",
        "drift.embedding.enabled=true",
        "inference.external=true",
        "inference.max_lag_s=60",
        "inference.adapt_every_s=0.5",
    )
    kenv.produce_episodes(topic, [kenv.episode(i, "quiet") for i in range(20)])
    # As the service runs (the models off the ingest path): the samples wait for `oversight infer`.
    kenv.run_until(
        settings,
        lambda store: len(store.sampled("quiet", "drift")) == 20,
        prepare=lambda svc: svc.prepare_for_service(),
    )
    svc = build_service(settings, serve=False, registry=CollectorRegistry())
    # Waiting for ten minutes, as when `oversight infer` could not reach them: no replica holds "quiet".
    with svc.store.engine.begin() as conn:
        waiting = conn.execute(
            sa.update(t.samples).where(t.samples.c.channel == "drift", t.samples.c.status == "pending"),
            {"created_at": time.time() - 600},
        ).rowcount
    assert waiting == 20
    kenv.produce_episodes(topic, [kenv.episode(i, "busy") for i in range(20)])
    svc.prepare_for_service()
    stop = threading.Event()
    th = threading.Thread(target=svc.pipeline.run, args=(stop,), daemon=True)
    th.start()
    try:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and svc.store.traffic_count("busy") < 20:
            time.sleep(0.1)
        time.sleep(3)  # several adapt periods
        assert svc.pipeline.sampler.throttle_factor("drift") == 1.0
        assert len(svc.store.sampled("busy", "drift")) == 20  # at its rate of 1, not at the floor
    finally:
        stop.set()
        th.join(30)
        svc.close()
