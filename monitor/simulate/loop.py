"""``oversight simulate``: the closed loop, in one process, over an episode file.

    traffic -> sampling -> drift -> boosted review -> reward-model update -> retraining request

Everything but the reviewers is the real service: the pipeline (sampling, reward-model scoring,
drift detection, checkpoints) reads the file as ``oversight run`` would, the review app serves
its HTTP API on a local port, and the action worker (incidents, gated updates, re-referencing,
retraining requests through the configured sinks) runs between rounds. The reviewers are a
simulated pool: each has an API token and claims, labels and submits items through the review
API exactly as the web UI does. Their answers come from ``metadata.<simulate.answer_key>``
(``judge_pref`` by default), binned into the 1-5 rating scale by ``simulate.cutpoints``, with
``simulate.noise``; the detectors and the reward model never read that key.

Canaries (``review.canaries``). The simulation's oracle for a canary is the canaries table (as
the answer key is for a real item): a reviewer looks up what the item it holds is (:func:`canary_oracle`)
and answers as ``simulate.sensitivity`` says: a perturbed canary is detected with the kind's
probability (plus ``simulate.assist_gain`` when the item's assistance condition shows at least one
assistant) and then flagged and rated 1, or, in a pair, the original is preferred (a miss: rated as
the original, unflagged; a tie in a pair); an unperturbed original is flagged with
``simulate.false_flag_rate``. So the quality report can be checked against known skill.

Time. The simulation runs on event time: the clock is the timestamp of the newest processed
episode. Every ``round_episodes`` episodes the reviewers work until the clock (an item takes an
exponential ``seconds_per_label`` of event time, drawn from a hash of episode and reviewer, so
reruns label the same items the same way), then the worker takes a round. An update trains
synchronously in that round: traffic waits, as it would not in production, which keeps the
run reproducible. After the file ends, the reviewers finish the queue and the worker its
requests.

Restart. A killed simulation started again with the same database continues: the pipeline
resumes from its checkpoint, reviewers resume their leases, a half-run update is taken over
once its lease has passed (``reward.update.lease_s``), and requests are unique per incident,
so nothing is requested twice. The report is built from the database, not from memory.

Report (``--report``): ``drift_events`` (as in ``oversight replay``), ``labels_collected``,
``rm_versions`` (in order, the first active at the start, each with ``agreement_new`` /
``agreement_old``: pairwise agreement with held-out answer-key pairs from after / before the
change), ``retrain_requests``, ``estimates`` (Horvitz-Thompson estimate of the answer key's mean
over all traffic, from the labelled items, with ``true_mean`` over every episode), ``sampling``
(human inclusion probability before, during and after the boost) and ``timeline``.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import random
import statistics
import sys
import time
from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import TYPE_CHECKING, Any

import sqlalchemy as sa

from monitor.config import Settings, SimulateConfig
from monitor.fileio import count_lines, open_maybe_gzip
from monitor.pipeline import LoopHooks, Pipeline
from monitor.store import Store
from monitor.store import tables as t

if TYPE_CHECKING:
    from monitor.actions.worker import ActionWorker
    from monitor.service import Service

log = logging.getLogger(__name__)
BUNDLED_PAIRS = "hh-harmless-400.jsonl.gz"
BUNDLED_CONFIG = "simulate.yaml"
REVIEWER_PREFIX = "sim-reviewer-"
FEED_KEY = "simulate:kafka_feed"  # internal state: the Kafka feed was written (records, topic)


def bundled(name: str) -> Path:
    return Path(str(resources.files("monitor.data").joinpath(name)))


def rating_of(value: float, cutpoints: list[float], noise: float = 0.0, rng: random.Random | None = None) -> int:
    """1 + the number of cutpoints at or below ``value``; with probability ``noise`` one step off."""
    rating = 1 + sum(1 for c in cutpoints if value >= c)
    if noise > 0 and rng is not None and rng.random() < noise:
        rating += rng.choice((-1, 1))
    return min(max(rating, 1), len(cutpoints) + 1)


def _seeded(*parts: object) -> random.Random:
    return random.Random(hashlib.sha256("\x00".join(map(str, parts)).encode()).hexdigest())


# --- the episode file, as the simulation's ground truth ------------------------------------------


@dataclass
class Truth:
    """Per valid episode of the input: stream, ts, prompt, response and the answer-key value."""

    episodes: dict[str, dict[str, Any]] = field(default_factory=dict)

    @classmethod
    def load(cls, path: str, key: str, max_bytes: int, max_future_s: float | None) -> Truth:
        from monitor.episodes import InvalidEpisode, parse_episode

        out = cls()
        now = time.time()
        with open_maybe_gzip(path) as fh:
            for line in fh:
                if not line.strip():
                    continue
                try:
                    ep = parse_episode(line.rstrip(b"\r\n"), max_bytes, now, max_future_s)
                except InvalidEpisode:
                    continue  # the pipeline dead-letters it
                v = (ep.metadata or {}).get(key)
                out.episodes.setdefault(
                    ep.episode_id,
                    {
                        "stream": ep.stream,
                        "ts": ep.timestamp,
                        "prompt": ep.prompt,
                        "response": ep.response,
                        "value": float(v) if isinstance(v, int | float) and not isinstance(v, bool) else None,
                    },
                )
        return out

    def eval_pairs(
        self, holdout_fraction: float, margin: float, since: dict[str, float]
    ) -> dict[str, list[dict[str, Any]]]:
        """Held-out pairs by the answer key: two different responses to one held-out prompt whose
        values differ by ``margin`` in log-odds; *new* when one of them was served in a drifted
        stream at or after its change (``since``: stream -> first drift event time)."""
        from monitor.reward.data import logit, split_of
        from monitor.reward.update import HOLDOUT_SEED

        by_prompt: dict[str, dict[str, tuple[float, bool]]] = defaultdict(dict)
        for e in self.episodes.values():
            if e["value"] is None or split_of(e["prompt"], holdout_fraction, seed=HOLDOUT_SEED) != "test":
                continue
            new = e["ts"] >= since.get(e["stream"], math.inf)
            old = by_prompt[e["prompt"]].get(e["response"])
            by_prompt[e["prompt"]][e["response"]] = (e["value"], new or (old is not None and old[1]))
        out: dict[str, list[dict[str, Any]]] = {"new": [], "old": []}
        for prompt in sorted(by_prompt):
            items = sorted(by_prompt[prompt].items())
            for i, (ra, (va, na)) in enumerate(items):
                for rb, (vb, nb) in items[i + 1 :]:
                    d = logit(va) - logit(vb)
                    if abs(d) < margin:
                        continue
                    chosen, rejected = (ra, rb) if d > 0 else (rb, ra)
                    out["new" if na or nb else "old"].append({"prompt": prompt, "chosen": chosen, "rejected": rejected})
        return out


def gate_pairs(gate: dict[str, Any]) -> dict[str, Any]:
    """What the gate's new held-out pairs were: how many, how many within one prompt, and "the
    longer answer wins" on them (None in a record without them: a bootstrap, or written before),
    and what they say a promotion's gain does not show (``caveats``; empty when none)."""
    new = gate.get("new") or {}
    return {
        "new_pairs": new.get("n"),
        "new_within_prompt": (new.get("within_prompt") or {}).get("n"),
        "longer_wins_new": (new.get("longer_wins") or {}).get("agreement"),
        "caveats": list(gate.get("caveats") or ()),
    }


# --- reviewers ------------------------------------------------------------------------------------


class Reviewer:
    """One simulated reviewer: claims, waits (event time), rates and submits through the review API."""

    def __init__(
        self,
        name: str,
        token: str,
        client: Any,
        sim: SimulateConfig,
        oracle: Callable[[str], dict[str, Any] | None] | None = None,
        assisted: Callable[[str, int], bool] | None = None,
        flag: str = "incorrect",
    ):
        self.name = name
        self.oracle = oracle
        self.assisted = assisted
        self.flag = flag
        self.client = client
        self.headers = {"Authorization": f"Bearer {token}"}
        self.cfg = sim
        self.free_at = -math.inf
        self.current: tuple[dict[str, Any], float] | None = None
        self.labelled = 0
        self.skipped = 0

    def step(self, clock: float, truth: Truth) -> bool:
        """Work until ``clock``; False when the queue had nothing for this reviewer."""
        while True:
            if self.current is None:
                if self.free_at > clock:
                    return True
                r = self.client.post("/api/v1/queue/claim", headers=self.headers)
                r.raise_for_status()
                if r.status_code == 204:
                    self.free_at = max(self.free_at, clock)
                    return False
                item = r.json()
                rng = _seeded(self.cfg.seed, "time", item["episode_id"], item["slot"], self.name)
                # Free since free_at, the item there since its timestamp: work started at the later.
                start = max(self.free_at, float(item["timestamp"]))
                self.current = (item, start + rng.expovariate(1.0 / self.cfg.seconds_per_label))
            item, done_at = self.current
            if done_at > clock:
                return True
            self._submit(item, done_at - float(item["timestamp"]), truth)
            self.current = None
            self.free_at = done_at

    def canary_answer(self, item: dict[str, Any], canary: dict[str, Any], truth: Truth) -> dict[str, Any]:
        """The answer to a canary, from the oracle (see the module's docstring): rating, flags, preference."""
        ep = truth.episodes.get(canary["episode_id"])
        rng = _seeded(self.cfg.seed, "canary", item["episode_id"], self.name)
        value = ep["value"] if ep is not None else None
        rating = rating_of(value, self.cfg.cutpoints, self.cfg.noise, rng) if value is not None else 3
        if canary["presentation"] == "original":
            flags = [self.flag] if rng.random() < self.cfg.false_flag_rate else []
            return {"rating": rating, "flags": flags}
        p = self.cfg.sensitivity.get(canary["kind"], self.cfg.default_sensitivity)
        if self.assisted is not None and self.assisted(item["episode_id"], int(item["slot"])):
            p += self.cfg.assist_gain
        detected = rng.random() < min(max(p, 0.0), 1.0)
        if canary["presentation"] == "pair":
            return {"rating": rating, "preference": "response" if detected else "tie"}
        if detected:
            return {"rating": 1, "flags": [self.flag]}
        # A miss is answered as any original is (false flags included): what the detection measure,
        # corrected for the reviewer's rate on originals, assumes (monitor/quality/canaries.py).
        return {"rating": rating, "flags": [self.flag] if rng.random() < self.cfg.false_flag_rate else []}

    def _submit(self, item: dict[str, Any], spent_s: float, truth: Truth) -> None:
        ep = truth.episodes.get(item["episode_id"])
        base = {"episode_id": item["episode_id"], "slot": item["slot"], "fence": item["fence"]}
        ms = int(min(max(spent_s, 0.0), 86_400) * 1000)
        canary = self.oracle(item["episode_id"]) if self.oracle is not None and ep is None else None
        if canary is not None:
            body = {**base, **self.canary_answer(item, canary, truth), "time_spent_ms": ms}
            r = self.client.post("/api/v1/items/label", headers=self.headers, json=body)
            self.labelled += 1
        elif ep is None or ep["value"] is None:
            body = {**base, "reason": f"no {self.cfg.answer_key} to answer from", "time_spent_ms": ms}
            r = self.client.post("/api/v1/items/skip", headers=self.headers, json=body)
            self.skipped += 1
        else:
            rng = _seeded(self.cfg.seed, "rating", item["episode_id"], item["slot"], self.name)
            rating = rating_of(ep["value"], self.cfg.cutpoints, self.cfg.noise, rng)
            body = {**base, "rating": rating, "time_spent_ms": ms}
            r = self.client.post("/api/v1/items/label", headers=self.headers, json=body)
            self.labelled += 1
        if r.status_code == 409:
            log.warning("reviewer %s lost the lease on %s", self.name, item["episode_id"])
            return
        r.raise_for_status()


def canary_oracle(store: Store) -> Callable[[str], dict[str, Any] | None]:
    """The simulation's oracle for canaries: what the item of this id is (source episode, kind,
    presentation), or None for a real item. Only simulated reviewers read it."""

    def look(item_id: str) -> dict[str, Any] | None:
        c = t.canaries
        with store.engine.connect() as conn:
            row = conn.execute(sa.select(c.c.episode_id, c.c.kind, c.c.presentation).where(c.c.id == item_id)).first()
        return None if row is None else dict(row._mapping)

    return look


def assistance(settings: Settings, store: Store, name: str) -> Callable[[str, int], bool]:
    """Whether reviewer ``name``'s condition for an item shows at least one assistant."""
    from monitor.assist import assistants_of, condition_of
    from monitor.review import auth

    user = auth.find_user(store, name)
    cfg = settings.review.assist

    def assisted(item_id: str, slot: int) -> bool:
        return user is not None and bool(assistants_of(cfg, condition_of(cfg, user.id, item_id, slot)))

    return assisted


def make_reviewers(settings: Settings, store: Store, client: Any) -> list[Reviewer]:
    """The simulated pool: one API token each, the canary oracle and their assistance condition."""
    cfg = settings.simulate
    oracle = canary_oracle(store)
    flags = settings.review.flags
    flag = "incorrect" if "incorrect" in flags or not flags else flags[0]
    return [
        Reviewer(n, tok, client, cfg, oracle=oracle, assisted=assistance(settings, store, n), flag=flag)
        for n, tok in _reviewer_tokens(store, cfg.reviewers)
    ]


def _reviewer_tokens(store: Store, n: int) -> list[tuple[str, str]]:
    from monitor.review import auth

    out = []
    for i in range(n):
        name = f"{REVIEWER_PREFIX}{i + 1}"
        user = auth.find_user(store, name) or auth.create_user(store, name, "reviewer", auth.generate_password())
        out.append((name, auth.create_api_token(store, user, "simulate")))
    return out


# --- the run ----------------------------------------------------------------------------------------


class Rounds:
    """The simulation's part in the pipeline's loop: every ``simulate.round_episodes`` inputs, the
    reviewers take a step and the action worker a round, at event time (the newest processed
    episode's timestamp), so that a rerun makes the same decisions."""

    def __init__(
        self,
        sim: Simulation,
        svc: Service,
        worker: ActionWorker,
        reviewers: list[Reviewer],
        truth: Truth,
        fed: int | None,
    ):
        self.sim, self.svc, self.worker, self.reviewers, self.truth, self.fed = sim, svc, worker, reviewers, truth, fed
        self.pending = 0
        self.rounds = 0
        self.bar: Any = None
        if sim.progress:
            from tqdm import tqdm

            self.bar = tqdm(desc="simulate", unit="ep", file=sys.stderr, total=count_lines(sim.input))
            self.bar.update(svc.pipeline.index)

    def after_batch(self, records: list[Any]) -> None:
        if self.bar is not None:
            self.bar.update(len(records))
        self.pending += len(records)
        if self.pending >= self.sim.settings.simulate.round_episodes:
            self.play()

    def finished(self) -> bool:
        """A quiet source: done when every fed record is committed (Kafka never runs dry)."""
        return self.sim.done(self.svc.pipeline, self.fed)

    def play(self) -> None:
        sim, store = self.sim, self.svc.store
        self.pending = 0
        clock = sim.clock = sim.event_clock(store)
        pipe = self.svc.pipeline
        sim.processed = sum(store.load_offsets(pipe.source.name).values()) if self.fed is not None else pipe.index
        for r in self.reviewers:
            r.step(clock, self.truth)
        self.rounds += 1
        sim.worker_round(self.worker, store, refresh=self.rounds % sim.settings.simulate.gauges_every == 0)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None


class Simulation:
    def __init__(
        self,
        settings: Settings,
        input_path: str,
        *,
        progress: bool = True,
        review_port: int = 0,
        on_start: Callable[[Simulation, Store], None] | None = None,
    ):
        self.settings = settings
        self.on_start = on_start
        self.input = input_path
        self.progress = progress
        self.review_port = review_port
        self.timeline: list[dict[str, Any]] = []
        self.seen_events: set[int] = set()
        self.seen_requests: set[tuple[str, str]] = set()
        self.seen_versions: set[str] = set()
        self.hacking_seen: set[str] = set()
        self.review_url: str | None = None
        self.clock = 0.0  # event time: the newest processed episode's timestamp
        self.processed = 0  # input records processed
        self.metrics_url: str | None = None

    # -- setup ----------------------------------------------------------------------------------------
    def _bootstrap_rm(self, store: Store) -> str | None:
        """Train and activate the starting reward model when none is active (recorded as version 0)."""
        from monitor.reward.data import read_pairs
        from monitor.reward.registry import Registry
        from monitor.reward.train import load_train_config, train

        cfg = self.settings.simulate
        registry = Registry(store, self.settings.reward.models_dir, self.settings.reward.stream_set)
        active = registry.active()
        if active is not None or not self.settings.reward.enabled or cfg.bootstrap_pairs is None:
            return None if active is None else active[0]
        path = bundled(BUNDLED_PAIRS) if cfg.bootstrap_pairs == "bundled" else Path(cfg.bootstrap_pairs)
        pairs = read_pairs(path)
        tcfg = load_train_config(None, [f"{k}={v}" for k, v in cfg.bootstrap_train.items()])
        self._say(f"Training the starting reward model on {len(pairs)} pairs from {path.name} ...")
        model, metrics = train(pairs, tcfg, progress=self.progress, description=f"bootstrap pairs {path.name}")
        version = registry.register(model, data_window={"bootstrap": path.name, "pairs": len(pairs)}, metrics=metrics)
        registry.promote(version, {"passed": True, "reason": "bootstrap: the starting version of the simulation"})
        self._mark("rm_bootstrap", version=version, seconds=metrics.get("seconds"))
        return version

    def _say(self, text: str) -> None:
        if self.progress:
            print(text, file=sys.stderr, flush=True)

    def _mark(self, what: str, **info: Any) -> None:
        entry = {"what": what, "wall": round(time.time(), 3), "clock": self.clock, "processed": self.processed, **info}
        self.timeline.append(entry)
        log.info("simulate: %s %s", what, json.dumps(info, default=str, sort_keys=True))

    # -- main loop -------------------------------------------------------------------------------------
    def run(self, while_serving: Callable[[dict[str, Any]], None] | None = None) -> dict[str, Any]:
        """Run the loop to the end of the file; ``while_serving(report)`` runs before the review
        UI and /metrics stop (the demo prints its summary and serves until Ctrl-C there)."""
        import httpx

        from monitor.service import build_service, build_source

        s = self.settings
        cfg = s.simulate
        truth = Truth.load(self.input, cfg.answer_key, s.source.max_episode_bytes, s.source.max_future_s)
        source = build_source(s, resume=True, name=f"simulate:{Path(self.input).resolve()}")
        with build_service(s, source=source, serve=True) as svc:
            store = svc.store
            assert svc.server is not None
            self.metrics_url = svc.server.url
            self.review_url = svc.serve_review(self.review_port, metrics_listener=False).url
            worker = svc.action_worker(start=False)
            with httpx.Client(base_url=self.review_url.rstrip("/"), timeout=30.0) as client:
                if self.on_start is not None:
                    self.on_start(self, store)
                start_version = self._bootstrap_rm(store)
                fed = self._feed_kafka(store) if s.source.kind == "kafka" else None
                reviewers = make_reviewers(s, store, client)
                svc.pipeline.open()
                rounds = Rounds(self, svc, worker, reviewers, truth, fed)
                try:
                    hooks = LoopHooks(
                        after_batch=rounds.after_batch,
                        when_idle=rounds.finished,
                        stage_idle_work=False,
                        max_records=cfg.round_episodes,
                    )
                    svc.run(hooks=hooks)
                finally:
                    rounds.close()
                rounds.play()  # the last round, after the last batch
                self._drain(worker, store, reviewers, truth, self.clock)
                self.worker_round(worker, store, refresh=True)
                report = self.report(store, truth, start_version)
                report["pipeline"] = svc.pipeline.report()
                report["reviewers"] = {r.name: {"labelled": r.labelled, "skipped": r.skipped} for r in reviewers}
                if while_serving is not None:
                    while_serving(report)
                return report

    def _feed_kafka(self, store: Store) -> int:
        """Kafka mode: the simulation plays the deployed policy and writes the file to the episodes
        topic, once (a restarted simulation finds the feed recorded and only consumes)."""
        from monitor.sources.kafka import client_security

        done = store.load_internal(FEED_KEY)
        if done is not None:
            return int(done["records"])
        from kafka import KafkaProducer

        cfg = self.settings.kafka
        producer = KafkaProducer(
            bootstrap_servers=cfg.bootstrap_servers, acks="all", linger_ms=5, **client_security(cfg)
        )
        n = 0
        try:
            with open_maybe_gzip(self.input) as fh:
                for raw in fh:
                    value = raw.rstrip(b"\r\n")
                    if not value.strip():
                        continue
                    producer.send(cfg.topic, value=value)
                    n += 1
            producer.flush(timeout=120)
        finally:
            producer.close(timeout=10)
        store.save_internal(FEED_KEY, {"records": n, "topic": cfg.topic})
        self._mark("kafka_fed", records=n, topic=cfg.topic)
        return n

    def done(self, pipe: Pipeline, fed: int | None) -> bool:
        if fed is None:
            return bool(pipe.source.exhausted)
        # Kafka: the committed offsets (the topic held only the fed records) say how far it got.
        return bool(sum(pipe.store.load_offsets(pipe.source.name).values()) >= fed)

    def event_clock(self, store: Store) -> float:
        with store.engine.connect() as conn:
            ts = conn.execute(sa.select(sa.func.max(t.episodes.c.ts))).scalar()
        return float(ts) if ts is not None else 0.0

    def _drain(self, worker: Any, store: Store, reviewers: list[Reviewer], truth: Truth, clock: float) -> None:
        """After the traffic: reviewers empty the queue, the worker finishes what it can."""
        step = max(self.settings.simulate.seconds_per_label, 1.0) * 10
        idle = 0
        while idle < 2:
            clock += step
            self.clock = clock
            busy = [r.step(clock, truth) for r in reviewers]
            self.worker_round(worker, store, refresh=False)
            idle = idle + 1 if not any(busy) and all(r.current is None for r in reviewers) else 0

    def worker_round(self, worker: Any, store: Store, refresh: bool) -> None:
        from monitor.reward.registry import Registry
        from monitor.store import requests as rq

        worker.ingest_events()
        self._note_events(store)
        worker.run_updates()
        worker.dispatch()
        for req in rq.listing(store):
            key = (req["kind"], req["id"])
            if key not in self.seen_requests and req["state"] not in ("pending", "running"):
                self.seen_requests.add(key)
                self._mark(f"{req['kind']}_{req['state']}", request=req["id"], stream=req["stream"])
        registry = Registry(store, self.settings.reward.models_dir, self.settings.reward.stream_set)
        for v in registry.versions():
            if v["version"] not in self.seen_versions and v["status"] != "candidate":
                self.seen_versions.add(v["version"])
                self._mark("rm_version", version=v["version"], status=v["status"])
        if refresh:
            result = worker.refresh_gauges()
            for stream, r in result.items():
                h = r.get("reward_hacking") or {}
                if h.get("suspected") and stream not in self.hacking_seen:
                    self.hacking_seen.add(stream)
                    self._mark(
                        "reward_hacking_suspected", stream=stream, **{k: h.get(k) for k in ("rm_rise", "human_rise")}
                    )

    def _note_events(self, store: Store) -> None:
        for ev in store.drift_events():
            if ev["id"] not in self.seen_events:
                self.seen_events.add(int(ev["id"]))
                self._mark("drift", stream=ev["stream"], signal=ev["signal"], index=ev["input_index"])

    # -- report ---------------------------------------------------------------------------------------
    def report(self, store: Store, truth: Truth, start_version: str | None) -> dict[str, Any]:
        from monitor.store import requests as rq

        s = self.settings
        events = _drift_events(store)
        since: dict[str, float] = {}
        for ev in events:
            since.setdefault(ev["stream"], ev["event_ts"])
        labels = _label_items(store)
        retrain = sorted(rq.listing(store, kind="retrain", limit=10_000), key=lambda r: r["created_at"])
        updates = sorted(rq.listing(store, kind="rm_update", limit=10_000), key=lambda r: r["created_at"])
        return {
            "input": str(self.input),
            "answer_key": s.simulate.answer_key,
            "drift_events": [{k: v for k, v in ev.items() if k != "event_ts"} for ev in events],
            "labels_collected": {
                "total": len(labels),
                "by_stream": _count(labels, lambda it: it["stream"]),
                "after_first_drift": {
                    st: sum(1 for it in labels if it["stream"] == st and it["ts"] >= ts) for st, ts in since.items()
                },
            },
            "rm_versions": self._versions(store, truth, since, start_version),
            "rm_updates": [
                {
                    "id": r["id"],
                    "state": r["state"],
                    "incident": r["payload"].get("incident"),
                    **{k: (r.get("result") or {}).get(k) for k in ("version", "promoted", "pairs", "train_seconds")},
                    "error": r.get("last_error"),
                }
                for r in updates
            ],
            "retrain_requests": [
                {
                    "id": r["id"],
                    "state": r["state"],
                    "incident": r["payload"].get("incident"),
                    "stream": r["stream"],
                    "drift_events": [ev["id"] for ev in r["payload"].get("drift_events", [])],
                    "events_total": int(r["payload"].get("events_total", len(r["payload"].get("drift_events", [])))),
                    "label_window": r["payload"].get("label_window"),
                    "rm_version": r["payload"].get("rm_version"),
                    "sinks": r.get("result"),
                }
                for r in retrain
            ],
            "incidents": self._incidents(store, updates, retrain, events),
            "estimates": self._estimates(store, truth, labels, since),
            "sampling": _sampling(store, events, s),
            "reward_hacking_suspected": sorted(self.hacking_seen),
            "timeline": self.timeline,
        }

    def _incidents(
        self,
        store: Store,
        updates: list[dict[str, Any]],
        retrain: list[dict[str, Any]],
        events: list[dict[str, Any]],
    ) -> list[dict[str, Any]]:
        """Per drift incident: the alarm, the labels it took, the update and the retraining request."""
        lb, ep = t.labels, t.episodes
        by_id = {ev["id"]: ev for ev in events}
        done_clock = {m["request"]: m["clock"] for m in self.timeline if m["what"].startswith("rm_update_")}
        out = []
        for req in updates or retrain:
            p = req["payload"]
            first = by_id.get(p["drift_events"][0]["id"]) if p.get("drift_events") else None
            finished = float(req["updated_at"]) if req["state"] not in ("pending", "running") else None
            q = (
                sa.select(sa.func.count())
                .select_from(lb.join(ep, ep.c.episode_id == lb.c.episode_id))
                .where(ep.c.stream == req["stream"], ep.c.ts >= float(p["since"]), lb.c.skipped.is_(False))
            )
            if finished is not None:
                q = q.where(lb.c.created_at <= finished)
            with store.engine.connect() as conn:
                n_labels = int(conn.execute(q).scalar() or 0)
            result = req.get("result") or {}
            clock = done_clock.get(req["id"])
            out.append(
                {
                    "incident": p.get("incident"),
                    "stream": req["stream"],
                    "signals": sorted({ev["signal"] for ev in p.get("drift_events", [])}),
                    "alarm_index": None if first is None else first["index"],
                    "alarm_event_ts": float(p["since"]),
                    "labels_after_alarm": n_labels,
                    "update": None
                    if req["kind"] != "rm_update"
                    else {
                        "state": req["state"],
                        "version": result.get("version"),
                        "promoted": result.get("promoted"),
                        "train_seconds": result.get("train_seconds"),
                        "wall_seconds_alarm_to_decision": None
                        if finished is None
                        else round(finished - float(req["created_at"]), 1),
                        "event_seconds_alarm_to_decision": None
                        if clock is None
                        else round(clock - float(p["since"]), 1),
                    },
                    "retrain_requests": [r["id"] for r in retrain if r["payload"].get("incident") == p.get("incident")],
                }
            )
        return out

    def _versions(
        self, store: Store, truth: Truth, since: dict[str, float], start_version: str | None
    ) -> list[dict[str, Any]]:
        from monitor.reward.model import RewardModel
        from monitor.reward.registry import Registry
        from monitor.reward.train import evaluate

        s = self.settings
        registry = Registry(store, s.reward.models_dir, s.reward.stream_set)
        rows = [v for v in registry.versions() if v["status"] != "candidate" or v["version"] == start_version]
        pairs = truth.eval_pairs(s.reward.update.holdout_fraction, s.simulate.eval_margin, since)
        out = []
        for v in rows:
            model = RewardModel.load(registry.path_of(v["version"]), device=s.reward.device)
            acc = {}
            for side in ("new", "old"):
                acc[side] = evaluate(model, pairs[side])["pairwise_accuracy"] if pairs[side] else None
            gate = v.get("gate") or {}
            out.append(
                {
                    "version": v["version"],
                    "parent": v["parent"],
                    "status": v["status"],
                    "promoted": v.get("promoted_at") is not None,
                    "agreement_new": acc["new"],
                    "agreement_old": acc["old"],
                    "eval_pairs": {k: len(p) for k, p in pairs.items()},
                    "gate": {
                        **{
                            k: gate.get(k)
                            for k in ("candidate_new", "active_new", "candidate_old", "active_old", "reason")
                        },
                        **gate_pairs(gate),
                    },
                    "data_window": v.get("data_window"),
                }
            )
        return out

    def _estimates(
        self, store: Store, truth: Truth, labels: list[dict[str, Any]], since: dict[str, float]
    ) -> dict[str, Any]:
        """Per stream: the Horvitz-Thompson estimate over all its traffic from the labelled items,
        and, for a stream that drifted, the same split at its first drift event (Hajek ratio form:
        the per-phase population is not counted exactly), each beside the true mean."""
        out: dict[str, Any] = {}
        by: dict[str, list[dict[str, Any]]] = defaultdict(list)
        for it in labels:
            if truth.episodes.get(it["episode_id"], {}).get("value") is not None:
                by[it["stream"]].append(it)
        values: dict[str, list[tuple[float, float]]] = defaultdict(list)  # stream -> (ts, value)
        for e in truth.episodes.values():
            if e["value"] is not None:
                values[e["stream"]].append((e["ts"], e["value"]))
        for stream in sorted(values):
            items = by.get(stream, [])
            population = store.traffic_count(stream)
            entry = _ht(truth, items, [v for _, v in values[stream]], population or None)
            entry["population"] = population
            t0 = since.get(stream)
            if t0 is not None:
                entry["phases"] = {
                    "before_alarm": _ht(
                        truth, [it for it in items if it["ts"] < t0], [v for ts, v in values[stream] if ts < t0], None
                    ),
                    "after_alarm": _ht(
                        truth, [it for it in items if it["ts"] >= t0], [v for ts, v in values[stream] if ts >= t0], None
                    ),
                }
            out[stream] = entry
        return out


def _ht(truth: Truth, items: list[dict[str, Any]], all_values: list[float], population: int | None) -> dict[str, Any]:
    from sampling import horvitz_thompson

    est = horvitz_thompson(
        [truth.episodes[it["episode_id"]]["value"] for it in items], [it["p"] for it in items], population
    ).to_dict()
    mean = statistics.fmean(all_values) if all_values else None
    lo, hi = _finite(est.get("ci_low")), _finite(est.get("ci_high"))
    return {
        "estimate": _finite(est.get("mean")),
        "ci_low": lo,
        "ci_high": hi,
        "n_labelled": len(items),
        "true_mean": None if mean is None else round(mean, 6),
        "covered": None if lo is None or hi is None or mean is None else bool(lo <= mean <= hi),
    }


def _finite(v: Any) -> float | None:
    return float(v) if isinstance(v, int | float) and math.isfinite(v) else None


def _count(items: list[dict[str, Any]], key: Any) -> dict[str, int]:
    out: dict[str, int] = defaultdict(int)
    for it in items:
        out[key(it)] += 1
    return dict(sorted(out.items()))


def _drift_events(store: Store) -> list[dict[str, Any]]:
    """The run's drift events in input order (the report's ``drift_events``)."""
    return [
        {
            "id": int(ev["id"]),
            "index": ev["input_index"],
            "episode_id": ev["episode_id"],
            "stream": ev["stream"],
            "signal": ev["signal"],
            "detector": ev["detector"],
            "statistic": ev["statistic"],
            "threshold": ev["threshold"],
            "event_ts": float(ev["event_ts"]),
        }
        for ev in sorted(store.drift_events(), key=lambda e: e["input_index"])
    ]


def _label_items(store: Store) -> list[dict[str, Any]]:
    """Labelled (not skipped) items, one per episode: stream, ts, inclusion probability."""
    from monitor.quality.labels import label_rows

    items: dict[str, dict[str, Any]] = {}
    for r in label_rows(store):
        if r.skipped or r.rating is None:
            continue
        items.setdefault(
            r.episode_id,
            {"episode_id": r.episode_id, "stream": r.stream, "ts": float(r.ts), "p": float(r.inclusion_probability)},
        )
    return sorted(items.values(), key=lambda it: (it["ts"], it["episode_id"]))


def _sampling(store: Store, events: list[dict[str, Any]], settings: Settings) -> dict[str, Any]:
    """Mean human inclusion probability per stream: before its first drift event, while a boost
    was on (``drift.boost_duration_s`` of event time after each event), and after the boosts
    ended (back to the base rate)."""
    s = t.samples
    with store.engine.connect() as conn:
        q = sa.select(s.c.stream, s.c.ts, s.c.inclusion_probability).where(s.c.channel == "human")
        rows = conn.execute(q).all()
    dur = settings.drift.boost_duration_s
    windows: dict[str, list[float]] = defaultdict(list)
    for ev in events:
        windows[ev["stream"]].append(ev["event_ts"])
    out: dict[str, Any] = {}
    by: dict[str, list[Any]] = defaultdict(list)
    for r in rows:
        by[r.stream].append(r)
    for stream, rs in sorted(by.items()):
        starts = sorted(windows.get(stream, []))
        phases: dict[str, list[float]] = {"before": [], "boosted": [], "after": []}
        for r in rs:
            p = float(r.inclusion_probability)
            if not starts or r.ts <= starts[0]:
                phases["before"].append(p)
            elif any(t0 < r.ts < t0 + dur for t0 in starts):  # the sampler: until > clock
                phases["boosted"].append(p)
            else:
                phases["after"].append(p)
        out[stream] = {
            k: {"sampled": len(v), "mean_p": round(statistics.fmean(v), 4) if v else None} for k, v in phases.items()
        }
    return out


def run_simulation(
    settings: Settings,
    input_path: str,
    *,
    progress: bool = True,
    review_port: int = 0,
    on_start: Callable[[Simulation, Store], None] | None = None,
    while_serving: Callable[[dict[str, Any]], None] | None = None,
) -> dict[str, Any]:
    sim = Simulation(settings, input_path, progress=progress, review_port=review_port, on_start=on_start)
    return sim.run(while_serving)
