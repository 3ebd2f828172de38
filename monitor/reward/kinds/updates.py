"""The update of a brought-in reward model (the active version is an ``hf``, ``judge`` or ``http`` kind).

``monitor.reward.update.run_update`` hands over here after building the same four-way split of
fresh human-label pairs; the candidate then goes through the same gate (``decide``) as the
built-in model's, against the active version, on the same held-out pairs.

* ``hf`` with ``lora`` configured: a LoRA fine-tune on the training pairs (``lora.py``), merged into
  a new checkpoint (content-hashed): the candidate is an ``hf`` version on it, with the same
  settings. Without ``lora`` an hf version cannot update here: the update fails with that reason.
* ``judge`` and ``http`` cannot be trained here. Their update is (a) an isotonic calibration of the
  active version's raw scores on the fresh training-side labels (``calibration.py``): the
  candidate is the same endpoint, model and rubric with the map, a new version; and (b) an
  ``rm_training`` action request, ``reward_model_training_request``, through
  ``actions.rm_training_sinks`` (the outbox and sinks of retraining requests) to the owner's own
  training pipeline, keyed so that a repeated update of the same window is one request. When the
  owner later registers the retrained endpoint (``oversight rm register --kind judge --gate``), the
  gate evaluates it on the held-out labels (``gate.py``).
"""

from __future__ import annotations

import hashlib
import json
import logging
import tempfile
import time
from pathlib import Path
from typing import Any

from monitor.config import Settings
from monitor.metrics import Metrics
from monitor.reward.data import Pair, split_of
from monitor.reward.kinds.base import BackendError, Item, PairScorer, ScoringBackend
from monitor.reward.kinds.calibration import fit_isotonic
from monitor.reward.kinds.config import HfConfig
from monitor.reward.kinds.version import KIND_FILE, KindVersion, identity_of, load_backend, parse_config
from monitor.reward.registry import Registry
from monitor.reward.sensitivity import GateProbe
from monitor.store import Store
from monitor.store import requests as rq

log = logging.getLogger(__name__)
EVENT = "reward_model_training_request"
REQUEST_KIND = "rm_training"
# Below this many fresh training-side labels a calibration map is mostly noise.
MIN_CALIBRATION_LABELS = 8
LABEL_EXPORTS = {"ratings": "/admin/export/ratings.jsonl", "pairs": "/admin/export/pairs.jsonl"}


class KindCandidate(PairScorer):
    """A new version of a brought-in kind as the gate sees a candidate: it scores (its own
    backend, built from its configuration) and saves as a registry folder."""

    def __init__(self, kv: KindVersion, backend: ScoringBackend):
        super().__init__(backend)
        self.kv = kv

    @property
    def version(self) -> str:
        return self.kv.version

    @property
    def parent(self) -> str | None:
        return self.kv.parent

    def save(self, path: str | Path) -> Path:
        return self.kv.save(path)


def candidate_of(kv: KindVersion, device: str | None) -> KindCandidate:
    """The candidate with its backend loaded from its own record (so scores are what a promoted
    version would give: calibration and checkpoint checks included)."""
    with tempfile.TemporaryDirectory() as tmp:
        kv.save(tmp)
        return KindCandidate(kv, load_backend(tmp, device=device))


def active_kind(registry: Registry) -> tuple[str, str, Any, Path] | None:
    """(version, kind, configuration, folder) of the active version when it is a brought-in kind."""
    a = registry.active()
    if a is None or not (a[1] / KIND_FILE).is_file():
        return None
    rec = json.loads((a[1] / KIND_FILE).read_text(encoding="utf-8"))
    kind = str(rec["kind"])
    return a[0], kind, parse_config(kind, rec["config"]), a[1]


def update_kind(
    settings: Settings,
    store: Store,
    registry: Registry,
    split: dict[str, list[Pair]],
    records: list[dict[str, Any]],
    *,
    stream: str,
    since: float,
    metrics: Metrics | None = None,
    request_id: str | None = None,
    progress: bool = False,
    probe: GateProbe | None = None,
) -> dict[str, Any]:
    """Build the kind's candidate, gate it against the active version (``decide``); the result has
    ``run_update``'s shape, plus ``training_request`` for a remote kind. ``probe``: the gate's
    sensitivity probe set, drawn before training."""
    from monitor.reward.train import pair_texts
    from monitor.reward.update import UpdateError, decide

    found = active_kind(registry)
    if found is None:
        raise UpdateError("the active version is not a brought-in kind")
    active_version, kind, cfg, active_path = found
    counts = {k: len(v) for k, v in split.items()}
    window = {"stream": stream, "since": since, "pairs": counts, "labels": len(records), "request": request_id}
    device = settings.reward.device
    t0 = time.perf_counter()
    request: dict[str, Any] | None = None
    if isinstance(cfg, HfConfig):
        if cfg.lora is None:
            raise UpdateError(
                f"hf version {active_version} has no lora configuration: it cannot train here; register a new "
                "checkpoint (rm register --kind hf --gate) or one with lora settings"
            )
        from monitor.reward.kinds.lora import finetune

        # The newest window's pairs first, so max_pairs keeps what the update is for.
        ordered = split["train_new"] + split["train_old"] + split.get("train_perturbed", [])
        train_pairs = [pair_texts(p) for p in ordered]
        say = (lambda m: log.info("%s", m)) if progress else None
        try:
            path, train_metrics = finetune(cfg, train_pairs, registry.root, device=device, progress=say)
        except BackendError as e:
            raise UpdateError(str(e)) from None
        raw = cfg.model_dump()
        raw["path"] = str(path.resolve())
        new_cfg = parse_config(kind, raw)
        kv = KindVersion(kind, new_cfg, identity_of(kind, new_cfg), {"training": {"description": f"lora, {stream}"}})
    else:
        kv, train_metrics = calibrate(settings, active_path, kind, cfg, records, stream=stream, since=since)
    kv.parent = active_version
    candidate = candidate_of(kv, device)
    active = PairScorer(load_backend(active_path, device=device))
    try:
        train_s = time.perf_counter() - t0
        verdict = decide(
            settings,
            registry,
            candidate,
            active,
            split,
            data_window=window,
            train_metrics={**train_metrics, "train_seconds": round(train_s, 1)},
            metrics=metrics,
            probe=probe,
        )
    finally:
        candidate.backend.close()
        active.backend.close()
    if kind in ("judge", "http"):
        request = request_training(
            store, active_version, kind, cfg, stream=stream, since=since, labels=len(records), verdict=verdict
        )
    return {
        "version": verdict["version"],
        "parent": active_version,
        "promoted": verdict["passed"],
        "gate": verdict,
        "pairs": counts,
        "train_seconds": round(train_s, 1),
        "kind": kind,
        "training_request": request,
    }


def calibrate(
    settings: Settings,
    active_path: Path,
    kind: str,
    cfg: Any,
    records: list[dict[str, Any]],
    *,
    stream: str,
    since: float,
) -> tuple[KindVersion, dict[str, Any]]:
    """The active remote version with an isotonic map fitted on the fresh labels of ``stream``
    that sit on the training side of the split (the gate's held-out prompts are never used)."""
    from monitor.reward.update import HOLDOUT_SEED, UpdateError

    frac = settings.reward.update.holdout_fraction
    fresh = [
        r
        for r in records
        if r["stream"] == stream and r["ts"] >= since and split_of(r["prompt"], frac, seed=HOLDOUT_SEED) == "train"
    ]
    if len(fresh) < MIN_CALIBRATION_LABELS:
        raise UpdateError(f"{len(fresh)} fresh training-side labels < {MIN_CALIBRATION_LABELS} to calibrate on")
    backend = load_backend(active_path, device=settings.reward.device)
    try:
        # The raw scores: a version already calibrated is refitted from its endpoint's own scale.
        inner = getattr(backend, "inner", backend)
        scores = inner.score([Item(r["prompt"], r["response"]) for r in fresh])
    finally:
        backend.close()
    failed = [s.error for s in scores if not s.ok]
    if failed:
        raise UpdateError(f"{len(failed)} of {len(scores)} calibration items could not be scored (first: {failed[0]})")
    t0 = time.perf_counter()
    try:
        cal = fit_isotonic([float(s.value or 0.0) for s in scores], [float(r["rating"]) for r in fresh])
    except ValueError as e:
        raise UpdateError(f"calibration: {e}") from None
    fit_s = time.perf_counter() - t0
    raw = cfg.model_dump()
    raw["calibration"] = cal.model_dump()
    new_cfg = parse_config(kind, raw)
    kv = KindVersion(
        kind, new_cfg, identity_of(kind, new_cfg), {"training": {"description": f"isotonic calibration, {stream}"}}
    )
    return kv, {"method": "isotonic", "labels": len(fresh), "knots": len(cal.x), "fit_seconds": round(fit_s, 4)}


def request_training(
    store: Store,
    active_version: str,
    kind: str,
    cfg: Any,
    *,
    stream: str,
    since: float,
    labels: int,
    verdict: dict[str, Any],
) -> dict[str, Any]:
    """Ask the owner's training pipeline for a retrained model (an ``rm_training`` action request,
    delivered by the action worker through ``actions.rm_training_sinks``). One request per active
    version, stream and window start: the key, also sent as the idempotency key."""
    key = hashlib.sha256(f"{active_version}\x00{stream}\x00{since!r}".encode()).hexdigest()[:32]
    ident = identity_of(kind, cfg)
    payload = {
        "event": EVENT,
        "idempotency_key": key,
        "rm_version": active_version,
        "kind": kind,
        "endpoint": ident.get("endpoint"),
        "model": ident.get("model"),
        "rubric_sha256": ident.get("rubric_sha256"),
        "label_window": {"stream": stream, "since": since, "until": time.time()},
        "labels": {"count": labels, "exports": LABEL_EXPORTS},
        "calibration": {"version": verdict["version"], "verdict": verdict["verdict"]},
        "then": "register the retrained endpoint or model: oversight rm register --kind "
        f"{kind} --gate --stream <stream> --since <since>",
    }
    rid, created = rq.create(store, REQUEST_KIND, key, stream, payload)
    if created:
        log.info("reward-model training request %s for %s (stream %s)", rid, active_version, stream)
    return {"id": rid, "created": created, "key": key}
