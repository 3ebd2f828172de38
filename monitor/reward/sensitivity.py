"""The reward model tested the way reviewers are: its sensitivity per perturbation kind.

For a version, on a fixed, seeded *probe set* of perturbed/original pairs (``monitor.perturb``),
the share of pairs in which it scores the worse version strictly lower, with a Wilson interval
and n (:func:`monitor.perturb.sensitivity`). This shows which flaws a reward model cannot see.

Probe set. Texts are real: the latest ``scan`` stored episodes of the stream(s) first, then the
bundled data (``monitor/data``: AlpacaEval answers and the HH-RLHF pairs, whose harmful requests
are what the refusal kind needs). Within each source texts are visited in the order of a keyed
hash of their id and the seed, and each kind takes the first ``per_kind`` texts it applies to, so
the same store, seed and size give the same pairs, and the active version and a candidate are
always measured on the *same* pairs.

Gate rule (:func:`compare`, used by ``monitor.reward.update.decide``). Per kind, on the shared
pairs: ``b`` pairs the active version detects and the candidate misses, ``c`` the reverse; the
loss is ``(b - c) / n``. Its one-sided lower bound at the gate's confidence comes from a Wilson
interval on ``b / (b + c)`` (McNemar's view of paired 0/1 outcomes), mapped back to the loss. A
kind *fails* when it has at least ``min_pairs`` pairs, the loss exceeds ``max_loss`` and its
lower bound is above zero: a drop both larger than the tolerance and not explainable by noise.
A kind with fewer pairs is reported and never refuses. The gate's confidence holds for the family:
with K kinds that can fail, each bound is taken at ``1 - alpha / K`` (:func:`family_z`), so a
candidate that lost nothing is refused with probability at most alpha however many kinds are
protected. Only a *protected* kind can fail: one the
active version detects better than chance (the lower bound of its detection rate above ``floor``,
0.5 by default). A version that prefers the broken answer as often as not has no sensitivity to
lose there; refusing a candidate that ranks the reviewers' new traffic far better for moving such
a kind from 0.32 to 0.16 would keep the worse overseer in place for noise.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from statistics import NormalDist
from typing import Any

import sqlalchemy as sa

from monitor.metrics import Metrics
from monitor.perturb import NAMES, Perturbed, Sensitivity, make, make_seed_key, sensitivity
from monitor.store import Store
from monitor.store import tables as t
from sampling import keyed_uniform

PROBE_KEY = b"oversight-monitor/rm-sensitivity/v1"
#: Stored episodes read for the probe set (the latest, by event time): bounds one read.
DEFAULT_SCAN = 2000

#: A scorer as the gate sees a version: ``score(prompts, responses) -> scores`` (higher is better).
Scorer = Any


@dataclass(frozen=True)
class ProbeText:
    """A real (prompt, response) a probe pair is made from; ``source`` says where it came from."""

    id: str
    prompt: str
    response: str
    source: str


def stored_texts(store: Store, streams: Sequence[str] | None = None, scan: int = DEFAULT_SCAN) -> list[ProbeText]:
    """The latest ``scan`` stored episodes (of ``streams``, default all), as probe texts."""
    ep = t.episodes
    q = sa.select(ep.c.episode_id, ep.c.stream, ep.c.prompt, ep.c.response)
    if streams:
        q = q.where(ep.c.stream.in_(list(streams)))
    q = q.order_by(ep.c.ts.desc(), ep.c.episode_id).limit(scan)
    with store.engine.connect() as conn:
        rows = conn.execute(q).all()
    return [ProbeText(str(r.episode_id), str(r.prompt), str(r.response), f"stream:{r.stream}") for r in rows]


def bundled_texts() -> list[ProbeText]:
    """Every valid text of the bundled data: demo-traffic answers and both sides of each HH pair."""
    from monitor.data import bundled_records
    from monitor.perturb.better import DEMO_TRAFFIC, HH_PAIRS

    out: list[ProbeText] = []
    for r in bundled_records(DEMO_TRAFFIC):
        if isinstance(r.get("prompt"), str) and isinstance(r.get("response"), str):
            out.append(ProbeText(f"demo:{r.get('episode_id')}", r["prompt"], r["response"], "bundled:alpaca_eval"))
    for i, r in enumerate(bundled_records(HH_PAIRS)):
        for side in ("chosen", "rejected"):
            if isinstance(r.get("prompt"), str) and isinstance(r.get(side), str):
                out.append(ProbeText(f"hh:{i}:{side}", r["prompt"], r[side], "bundled:hh_rlhf"))
    return out


def probe_items(
    sources: Sequence[Sequence[ProbeText]],
    *,
    seed: int = 0,
    per_kind: int = 40,
    kinds: Sequence[str] = NAMES,
) -> list[Perturbed]:
    """Up to ``per_kind`` perturbed items of each kind: sources in order (stored episodes before
    bundled data), texts within a source in keyed-hash order of (id, seed)."""
    salt = f"probe{seed}"[:16]
    ordered = [sorted(src, key=lambda x: (keyed_uniform(PROBE_KEY, x.id, salt), x.id)) for src in sources]
    out: list[Perturbed] = []
    for kind in kinds:
        pert = make(kind)
        got = 0
        for text in (x for src in ordered for x in src):
            if got >= per_kind:
                break
            item = pert.apply(text.prompt, text.response, make_seed_key(text.id, seed))
            if item is not None and item.worse != item.better:
                out.append(item)
                got += 1
    return out


def probe_set(
    store: Store | None,
    *,
    streams: Sequence[str] | None = None,
    seed: int = 0,
    per_kind: int = 40,
    scan: int = DEFAULT_SCAN,
) -> list[Perturbed]:
    """The probe set: stored episodes of ``streams`` (none without a store), then the bundled data."""
    stored = stored_texts(store, streams, scan) if store is not None else []
    return probe_items([stored, bundled_texts()], seed=seed, per_kind=per_kind)


class _Recorder:
    """The scorer as :func:`monitor.perturb.sensitivity` calls it, keeping every score so the
    paired comparison needs no second pass over the model."""

    def __init__(self, model: Scorer):
        self.model = model
        self.scores: dict[tuple[str, str], float] = {}

    def __call__(self, texts: Sequence[tuple[str, str]]) -> list[float]:
        got = [float(s) for s in self.model.score([p for p, _ in texts], [r for _, r in texts])]
        if len(got) == len(texts):
            self.scores.update(zip(texts, got, strict=True))
        return got


@dataclass(frozen=True)
class Measured:
    """A version's sensitivity per kind and, per probe item, whether it detected the flaw."""

    per_kind: dict[str, Sensitivity]
    detected: list[bool]


def measure(model: Scorer, items: Sequence[Perturbed], confidence: float = 0.95) -> Measured:
    """The sensitivity of ``model`` (anything with ``score(prompts, responses)``) per kind on ``items``."""
    rec = _Recorder(model)
    per_kind = sensitivity(rec, items, confidence=confidence)
    detected = [rec.scores[(it.prompt, it.worse)] < rec.scores[(it.prompt, it.better)] for it in items]
    return Measured(per_kind, detected)


def table(per_kind: Mapping[str, Sensitivity], kinds: Iterable[str] = NAMES) -> dict[str, dict[str, Any]]:
    """Every kind (n = 0 where the probe set had none), JSON-ready and rounded."""
    out: dict[str, dict[str, Any]] = {}
    for kind in kinds:
        s = per_kind.get(kind)
        if s is None:
            out[kind] = {"n": 0, "detected": 0, "rate": None, "ci_low": None, "ci_high": None}
        else:
            out[kind] = {
                "n": s.n,
                "detected": s.detected,
                "rate": round(s.rate, 4),
                "ci_low": round(s.ci_low, 4),
                "ci_high": round(s.ci_high, 4),
            }
    return out


def blind_spots(rows: Mapping[str, Mapping[str, Any]], level: float = 0.5) -> list[str]:
    """Kinds a version cannot see: measured, and the upper bound of its detection rate below
    ``level`` (0.5: no better than a coin, surely)."""
    return [k for k, r in rows.items() if r["n"] and r["ci_high"] is not None and r["ci_high"] < level]


def _wilson(p: float, n: float, z: float) -> tuple[float, float]:
    if n <= 0:
        return 0.0, 1.0
    denom = 1 + z * z / n
    centre = (p + z * z / (2 * n)) / denom
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / denom
    return max(0.0, centre - half), min(1.0, centre + half)


def compare(
    items: Sequence[Perturbed],
    active: Sequence[bool],
    candidate: Sequence[bool],
    *,
    max_loss: float,
    min_pairs: int,
    z: float,
    protected: Iterable[str] | None = None,
) -> dict[str, dict[str, Any]]:
    """Per kind: n, the loss of the candidate against the active version on the same pairs, its
    lower bound, whether the kind is protected (None: every kind is) and whether it fails (see
    the module docstring). ``z`` is the one-sided bound for the whole family: each of the K kinds
    that can fail is bounded at ``1 - alpha / K`` (Bonferroni), and ``tested`` says K."""
    guarded = None if protected is None else set(protected)
    counts: dict[str, list[int]] = {}
    for it, seen_a, seen_c in zip(items, active, candidate, strict=True):
        k = counts.setdefault(it.kind, [0, 0, 0])  # n, active-only, candidate-only
        k[0] += 1
        k[1] += int(seen_a and not seen_c)
        k[2] += int(seen_c and not seen_a)
    can_fail = {kind for kind, (n, _, _) in counts.items() if (guarded is None or kind in guarded) and n >= min_pairs}
    zk = family_z(z, len(can_fail))
    out: dict[str, dict[str, Any]] = {}
    for kind, (n, b, c) in sorted(counts.items()):
        loss = (b - c) / n
        disc = b + c
        lo = 0.0 if disc == 0 else disc / n * (2 * _wilson(b / disc, disc, zk)[0] - 1)
        failed = kind in can_fail and loss > max_loss and lo > 0
        out[kind] = {
            "n": n,
            "loss": round(loss, 4),
            "lo": round(lo, 4),
            "protected": guarded is None or kind in guarded,
            "tested": len(can_fail),
            "failed": failed,
        }
    return out


def family_z(z: float, tests: int) -> float:
    """The one-sided bound for each of ``tests`` kinds so that, when no kind truly lost anything,
    the chance that any of them refuses stays at most that of ``z`` alone (Bonferroni). Without
    it, eight protected kinds at 95% each refused about a third of candidates that had lost
    nothing (``tests/reward/test_rm_sensitivity.py``).

    >>> round(family_z(1.6449, 1), 4), round(family_z(1.6449, 4), 4)
    (1.6449, 2.2414)
    """
    if tests <= 1:
        return z
    alpha = 1.0 - NormalDist().cdf(z)
    return NormalDist().inv_cdf(1.0 - alpha / tests)


def protected_kinds(per_kind: Mapping[str, Sensitivity], floor: float) -> list[str]:
    """Kinds a version detects better than chance: its detection rate's lower bound above ``floor``."""
    return [k for k, s in per_kind.items() if s.n and s.ci_low > floor]


def failed_kinds(comparison: Mapping[str, Mapping[str, Any]]) -> list[str]:
    return [k for k, r in comparison.items() if r["failed"]]


def publish(metrics: Metrics, version: str, rows: Mapping[str, Mapping[str, Any]], role: str) -> None:
    """``oversight_rm_sensitivity{version,kind}`` (and ``_pairs``) for every kind of ``rows``,
    0 where unmeasured; the role (active, candidate) holds one version at a time, so the series
    stay bounded by two versions."""
    metrics.set_rm_sensitivity(role, version, {k: (r["rate"] or 0.0, int(r["n"])) for k, r in rows.items()})


def render(rows: Mapping[str, Mapping[str, Any]], comparison: Mapping[str, Mapping[str, Any]] | None = None) -> str:
    """The per-kind table for people (CLI, logs)."""
    lines = [f"{'kind':24} {'n':>4} {'detected':>8} {'rate':>6}  interval"]
    for kind, r in rows.items():
        if not r["n"]:
            lines.append(f"{kind:24} {0:>4} {'-':>8} {'-':>6}  (no probe pairs)")
            continue
        line = f"{kind:24} {r['n']:>4} {r['detected']:>8} {r['rate']:>6.2f}  [{r['ci_low']:.2f}, {r['ci_high']:.2f}]"
        if comparison is not None and kind in comparison:
            c = comparison[kind]
            line += f"  loss {c['loss']:+.2f} (lower bound {c['lo']:+.2f})"
            line += "  FAILED" if c["failed"] else ("" if c.get("protected", True) else "  (not protected)")
        lines.append(line)
    return "\n".join(lines)


@dataclass(frozen=True)
class GateProbe:
    """The gate's probe set for one update, drawn once: the update keeps its prompts out of the
    perturbed training pairs (``monitor.reward.augment``) and the gate measures on these items even
    if episodes arrive while the candidate trains. ``from_stream``: items made from stored episodes."""

    items: list[Perturbed]
    from_stream: int

    @property
    def prompts(self) -> set[str]:
        return {it.prompt for it in self.items}


def gate_probe(ucfg: Any, store: Store | None, stream: str | None) -> GateProbe | None:
    """The probe set the gate of an update of ``stream`` measures on (``ucfg`` is
    ``reward.update``); None when ``sensitivity_pairs`` is 0 (not measured)."""
    if ucfg.sensitivity_pairs <= 0:
        return None
    stored = stored_texts(store, [stream] if stream else None) if store is not None else []
    items = probe_items([stored, bundled_texts()], seed=ucfg.sensitivity_seed, per_kind=ucfg.sensitivity_pairs)
    stored_keys = {make_seed_key(x.id, ucfg.sensitivity_seed) for x in stored}
    return GateProbe(items, sum(1 for it in items if it.seed_key in stored_keys))


def gate_sensitivity(
    ucfg: Any,
    store: Store | None,
    candidate: Scorer,
    active: Scorer | None,
    stream: str | None,
    z: float,
    probe: GateProbe | None = None,
) -> dict[str, Any] | None:
    """The gate's sensitivity record: both versions measured on one probe set (``ucfg`` is
    ``reward.update``; ``probe``: the set drawn before training, default drawn now), the paired
    comparison per kind and the kinds that fail. None when ``sensitivity_pairs`` is 0 (not measured)."""
    if probe is None:
        probe = gate_probe(ucfg, store, stream)
    if probe is None:
        return None
    items = probe.items
    confidence = 0.95
    cand = measure(candidate, items, confidence)
    out: dict[str, Any] = {
        "probe": {
            "seed": ucfg.sensitivity_seed,
            "per_kind": ucfg.sensitivity_pairs,
            "pairs": len(items),
            "from_stream": probe.from_stream,
        },
        "candidate": table(cand.per_kind),
        "active": None,
        "comparison": None,
        "failed": [],
        "max_loss": ucfg.max_sensitivity_loss,
        "min_pairs": ucfg.sensitivity_min_pairs,
        "floor": ucfg.sensitivity_floor,
    }
    if active is not None:
        act = measure(active, items, confidence)
        out["active"] = table(act.per_kind)
        comparison = compare(
            items,
            act.detected,
            cand.detected,
            max_loss=1.0 if ucfg.max_sensitivity_loss is None else ucfg.max_sensitivity_loss,
            min_pairs=ucfg.sensitivity_min_pairs,
            z=z,
            protected=protected_kinds(act.per_kind, ucfg.sensitivity_floor),
        )
        if ucfg.max_sensitivity_loss is None:
            comparison = {k: {**v, "failed": False} for k, v in comparison.items()}
        out["comparison"] = comparison
        out["failed"] = failed_kinds(comparison)
    return out


def failure_rule(record: Mapping[str, Any]) -> str:
    """The gate's rule when kinds failed: which ones, with the numbers."""
    parts = []
    for kind in record["failed"]:
        c = record["comparison"][kind]
        a, k = record["active"][kind], record["candidate"][kind]
        parts.append(
            f"{kind} {a['rate']:.2f} -> {k['rate']:.2f} on {c['n']} probe pairs"
            f" (loss {c['loss']:+.2f} > {record['max_loss']}, lower bound {c['lo']:+.2f} > 0)"
        )
    return "sensitivity lost: " + "; ".join(parts)


def refresh_active(
    metrics: Metrics, settings: Any, store: Store, active: tuple[str, Path, int] | None = None
) -> str | None:
    """Publish the active version's sensitivity once per version (the action worker calls this
    every round): from its gate record when it was promoted through the gate, else measured now
    (a version activated by hand). ``active``: the registry's active version as the caller read
    it (default: read here). Returns the version published, None when nothing changed."""
    from monitor.reward.kinds import PairScorer, load_backend
    from monitor.reward.registry import Registry

    registry = Registry.for_settings(store, settings)
    active = active if active is not None else registry.active()
    if active is None or metrics.rm_sensitivity_version("active") == active[0]:
        return None
    version, path, _ = active
    row = registry.get(version) or {}
    gate = row.get("gate") if isinstance(row.get("gate"), dict) else None
    rows = (gate or {}).get("sensitivity", {}) or {}
    if isinstance(rows.get("candidate"), dict):
        publish(metrics, version, rows["candidate"], "active")
        return version
    ucfg = settings.reward.update
    if ucfg.sensitivity_pairs <= 0:
        return None
    items = probe_set(store, seed=ucfg.sensitivity_seed, per_kind=ucfg.sensitivity_pairs)
    scorer = PairScorer(load_backend(path, device=settings.reward.device))
    try:
        measured = measure(scorer, items)
    finally:
        scorer.backend.close()
    publish(metrics, version, table(measured.per_kind), "active")
    return version


def recorded(store: Store, settings: Any, version: str | None = None) -> dict[str, Any]:
    """What the registry recorded for ``version`` (default: the active one), without scoring
    anything: its per-kind table from the gate that decided it, the comparison with the version
    it was gated against, and its blind spots. ``per_kind`` is None when no gate measured it (a
    version activated by hand: ``oversight rm sensitivity`` measures it)."""
    from monitor.reward.registry import Registry

    registry = Registry.for_settings(store, settings)
    if version is None:
        active = registry.active()
        version = None if active is None else active[0]
    row = None if version is None else registry.get(version)
    gate = row.get("gate") if row is not None else None
    sens = gate.get("sensitivity") if isinstance(gate, dict) else None
    rows = sens.get("candidate") if isinstance(sens, dict) else None
    return {
        "version": version,
        "status": None if row is None else row.get("status"),
        "per_kind": rows,
        "compared_with": gate.get("active") if isinstance(gate, dict) and rows is not None else None,
        "comparison": sens.get("comparison") if isinstance(sens, dict) else None,
        "failed": list(sens.get("failed", [])) if isinstance(sens, dict) else [],
        "blind_spots": blind_spots(rows) if isinstance(rows, dict) else [],
    }
