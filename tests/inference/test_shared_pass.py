"""One encoder pass per episode (``monitor/inference/shared.py``).

The reward model's pass computes the drift embedding (same function, tested on real episodes);
a pass that differs in any way that matters does not claim to; a drift sample whose score is
coming waits for that pass, and not past ``share_wait_s``; and an inference worker with the real
encoder and a real built-in reward-model version stores, for an episode sampled for both, the
vector its scoring pass computed, encoding only the drift-only episodes itself.
"""

from __future__ import annotations

import gzip
import json
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import sqlalchemy as sa
from prometheus_client import CollectorRegistry

from inference.test_external import add_samples
from inference.test_workers import drift_samples_per_stream, fed, service
from inference.test_workers import settings as worker_settings
from monitor.config import Settings, load_settings
from monitor.inference.shared import DriftPass
from monitor.reward.kinds.base import BuiltinBackend, Item, share_drift_pass
from monitor.reward.model import ModelConfig, RewardModel
from monitor.reward.registry import Registry
from monitor.service.infer import InferenceWorker
from monitor.signals.embeddings import Embedder
from monitor.store import Store
from monitor.store import tables as t
from monitor.store.inference import (
    SCORE_STAGE,
    claim_for_embedding,
    claim_for_score,
    store_results,
    waiting_for_embedding,
)

DATA = Path(__file__).resolve().parent.parent / "data"  # the AlpacaEval files bundled with the tests


def real_episodes(n: int = 40) -> tuple[list[str], list[str]]:
    """Real instructions and answers of two models, plus an empty prompt and an empty answer."""
    prompts: list[str] = []
    responses: list[str] = []
    for name in ("gpt-3.5-turbo-1106_verbose", "NullModel"):
        with gzip.open(DATA / "alpaca_eval" / f"{name}.jsonl.gz", "rt", encoding="utf-8") as fh:
            rows = [json.loads(line) for line, _ in zip(fh, range(n // 2), strict=False)]
        prompts += [r["instruction"] for r in rows]
        responses += [r["output"] for r in rows]
    return [*prompts, "", "What is 2+2?"], [*responses, "ok", ""]


@pytest.fixture(scope="module")
def model() -> RewardModel:
    return RewardModel.create(seed=0, device="cpu")


def test_the_reward_models_pass_computes_the_drift_embedding(model: RewardModel) -> None:
    prompts, responses = real_episodes()
    embedder = Embedder(backend="torch")  # the default encoding: the pair
    spec = embedder.drift_pass()
    assert spec is not None
    slot = model.drift_slot(spec)
    assert slot == 0  # pool_layers [-1, -3, -5]: the last layer first
    scores, vectors = model.score_and_embed(prompts, responses, 8, slot)
    assert scores == model.score(prompts, responses, 8)  # the same scores, with or without the vectors
    own = embedder.embed_episodes(prompts, responses)
    np.testing.assert_allclose(vectors, own, atol=2e-6)
    assert np.allclose(np.linalg.norm(vectors, axis=1), 1.0, atol=1e-5)
    # The single-sequence encoding is another function: nothing to share.
    text = Embedder(backend="torch", encoding="text")
    assert text.drift_pass() is None
    assert float((text.embed_episodes(prompts[:4], responses[:4]) * own[:4]).sum(1).min()) < 0.99


def test_a_pass_that_differs_does_not_share(model: RewardModel) -> None:
    spec = Embedder(backend="torch").drift_pass()
    assert spec is not None
    backend = BuiltinBackend(model)
    assert share_drift_pass(backend, spec) and backend.drift_slot == 0
    [score] = backend.score([Item("q", "an answer")])
    assert score.embedding is not None and score.embedding.shape == (384,)
    assert not share_drift_pass(backend, None) and backend.score([Item("q", "a")])[0].embedding is None
    # Other token limits, other weights, a last layer not pooled or trained: another function.
    assert model.drift_slot(DriftPass(spec.weights_sha256, 64, 32)) is None
    assert model.drift_slot(DriftPass(spec.weights_sha256, 128, 16)) is None
    assert model.drift_slot(DriftPass("0" * 64, 128, 32)) is None
    middle = RewardModel.create(ModelConfig(pool_layers=[-3]), device="cpu")
    assert middle.drift_slot(spec) is None
    tuned = RewardModel.create(ModelConfig(finetune_layers=1), device="cpu")
    tuned.trained_layers = [5]  # as training leaves it (train.py): the top layer's weights move
    assert tuned.drift_slot(spec) is None


def pending_drift(store: Store, share_wait_s: float = 0.0) -> list[str]:
    return [w.episode_id for w in waiting_for_embedding(store, 100, share_wait_s=share_wait_s)]


def test_a_drift_sample_waits_for_its_scores_pass_and_not_longer(db_url: str) -> None:
    store = Store(db_url)
    add_samples(store, 2, ("drift",))  # e0 e1: drift only
    add_samples(store, 3, ("drift", "rm"), start=2)  # e2 e3 e4: sampled for both
    assert pending_drift(store) == ["e0", "e1", "e2", "e3", "e4"]
    assert pending_drift(store, share_wait_s=30.0) == ["e0", "e1"]
    # An inference worker of its own stored e2's score: its pass has been (the vector is held).
    claim_for_score(store, 10, "w", 30.0)
    store_results(store, SCORE_STAGE, "w", [{"episode_id": "e2", "version": "v1", "score": 0.5}])
    # The pipeline's own scorer committed e3's score.
    row = {"version": "v1", "stream": "chat", "score": 0.5, "ts": 0.0, "created_at": time.time()}
    store.record_scores([{**row, "episode_id": "e3"}])  # type: ignore[typeddict-item]
    assert pending_drift(store, share_wait_s=30.0) == ["e0", "e1", "e2", "e3"]
    # e4's score is late (the scorer is behind or failing): past the wait it is encoded anyway.
    with store.engine.begin() as conn:
        s = t.samples
        conn.execute(s.update().where(s.c.episode_id == "e4", s.c.channel == "rm").values(created_at=time.time() - 31))
    assert pending_drift(store, share_wait_s=30.0) == ["e0", "e1", "e2", "e3", "e4"]
    claimed = [w.episode_id for w in claim_for_embedding(store, 10, "w", 30.0, share_wait_s=30.0)]
    assert claimed == ["e0", "e1", "e2", "e3", "e4"]
    store.close()


def active(s: Settings, model: RewardModel) -> Store:
    """The store of ``s``, with ``model`` registered and promoted."""
    store = Store(s.database.url)
    registry = Registry.for_settings(store, s)
    registry.promote(registry.register(model, data_window={}, metrics={}))
    return store


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_the_worker_encodes_an_episode_sampled_for_both_once(
    tmp_path: Path, model: RewardModel, monkeypatch: pytest.MonkeyPatch, precision: str
) -> None:
    s = load_settings(
        None,
        [
            "dev=true",
            f"database.url=sqlite:///{tmp_path / 'db.sqlite'}",
            f"reward.models_dir={tmp_path / 'models'}",
            "reward.backend=torch",
            "drift.embedding.backend=torch",
            f"reward.precision={precision}",
            f"drift.embedding.precision={precision}",
            "inference.external=true",
            # Past share_wait_s (30 s by default) a drift sample is encoded on its own, by design;
            # a slow host loading the models could get there before the first round.
            "inference.share_wait_s=600",
        ],
    )
    store = active(s, model)
    add_samples(store, 4, ("drift",))  # e0-e3: drift only
    add_samples(store, 4, ("drift", "rm"), start=4)  # e4-e7: both
    prom = CollectorRegistry()
    worker = InferenceWorker(s, store, registry=prom, worker_id="w1")
    embedding, scoring = worker.stages
    worker.warm()  # loads the encoder and the active version, as `oversight infer` does first
    calls: list[int] = []
    encoder = worker.embedder
    assert encoder is not None
    real = encoder.embed_episodes

    def counted(prompts: list[str], responses: list[str]) -> Any:  # the real encoder; its passes counted
        calls.append(len(prompts))
        return real(prompts, responses)

    monkeypatch.setattr(encoder, "embed_episodes", counted)

    # Before the scorer's pass, the drift worker takes only the drift-only samples.
    assert worker.round(embedding) == 4 and calls == [4]
    assert worker.shared is not None and worker.shared.active
    assert worker.round(scoring) == 4
    assert worker.round(embedding) == 4 and calls == [4]  # no second pass: the vectors were held
    value = prom.get_sample_value
    assert value("oversight_inference_items_total", {"stage": "embedding", "outcome": "shared"}) == 4
    assert value("oversight_inference_items_total", {"stage": "embedding", "outcome": "ok"}) == 8

    r = t.inference_results
    with store.engine.connect() as conn:
        rows = conn.execute(sa.select(r.c.episode_id, r.c.vector).where(r.c.stage == "embedding")).all()
    stored = {i: np.frombuffer(v, dtype="<f4") for i, v in rows}
    ids = [f"e{i}" for i in range(8)]
    own = Embedder(backend="torch").embed_episodes(
        [f"question {i}" for i in range(8)], [f"answer {i}" for i in range(8)]
    )
    got = np.stack([stored[i] for i in ids])
    if precision == "fp32":
        np.testing.assert_allclose(got, own, atol=2e-6)  # the same function either way
    else:  # both passes in bf16 (monitor/inference/bf16.py): the fp32 direction, to bf16's precision
        assert (got * own).sum(1).min() >= 0.999
        assert np.abs(got - own).max() > 1e-6  # bf16 did run: it is not the fp32 result
    worker.close()
    store.close()


def both_sampled(store: Store) -> int:
    """Episodes sampled for drift and for rm or human review."""
    s = t.samples
    review = sa.select(s.c.episode_id).where(s.c.channel.in_(("rm", "human")))
    q = sa.select(sa.func.count()).where(s.c.channel == "drift", s.c.episode_id.in_(review))
    with store.engine.connect() as conn:
        return int(conn.execute(q).scalar_one())


def test_oversight_run_encodes_an_episode_sampled_for_both_once(tmp_path: Path, model: RewardModel) -> None:
    s = worker_settings(
        tmp_path,
        "reward.enabled=true",
        f"reward.models_dir={tmp_path / 'models'}",
        "reward.backend=torch",
        "reward.swap_poll_s=0.2",
        "drift.embedding.backend=torch",
        "sampling.rm.rate=0.5",
        "inference.settle_timeout_s=240",
        # A drift sample waits for its score's pass at most share_wait_s (30 s by default), then is
        # encoded on its own: by design, but on a slow or busy host (a CI run) the niced scorer can
        # fall that far behind, and this test would count the design's fallback as a miss. Waiting
        # longer than the run may settle leaves a missing vector (a bug) as the only way to fail.
        "inference.share_wait_s=600",
    )
    store = active(s, model)
    prom = CollectorRegistry()
    svc = service(s, store, 300, prom)
    try:
        stats = svc.run()
    finally:
        svc.close()
    assert stats.records == 300
    per_stream = drift_samples_per_stream(store)
    assert fed(store) == per_stream  # each drift sample fed exactly once, shared or not
    both = both_sampled(store)
    assert both > 20
    value = prom.get_sample_value
    shared = value("oversight_inference_items_total", {"stage": "embedding", "outcome": "shared"})
    assert shared == both  # every episode sampled for both was encoded once, by the reward model
    assert value("oversight_inference_items_total", {"stage": "embedding", "outcome": "ok"}) == sum(per_stream.values())
    store.close()
