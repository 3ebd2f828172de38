"""The reward model tested as reviewers are: sensitivity per perturbation kind on a seeded probe
set, the gate's sensitivity rule, the gauges, the recorded report and ``oversight rm sensitivity``."""

from __future__ import annotations

import json
import random
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pytest

from monitor.config import load_settings
from monitor.data import bundled_records
from monitor.metrics import Metrics
from monitor.perturb import NAMES, Perturbed, Sensitivity
from monitor.perturb.better import HH_PAIRS
from monitor.reward import sensitivity as rs
from monitor.reward.registry import Registry
from monitor.reward.update import decide, render_gate
from monitor.store import Store
from monitor.store import tables as t

PER_KIND = 24


class FlawSpotter:
    """A stand-in scorer (named as such: the gate's rule is what is tested, and a real model's
    blind spots are not ours to choose). It knows the worse text of every probe item except those
    of the ``blind`` kinds and scores it lower; on the held-out pairs it prefers the chosen
    response when ``knows_labels``. It saves like a version folder, so the registry keeps it."""

    def __init__(
        self, probes: Sequence[Perturbed], *, blind: Sequence[str] = (), knows_labels: bool, name: str
    ) -> None:
        self.flawed = {(it.prompt, it.worse) for it in probes if it.kind not in blind}
        self.blind = list(blind)
        self.knows_labels = knows_labels
        self.chosen: set[tuple[str, str]] = set()
        self.version = name
        self.parent: str | None = None

    def score(self, prompts: Sequence[str], responses: Sequence[str], batch_size: int = 32) -> list[float]:
        del batch_size
        out = []
        for p, r in zip(prompts, responses, strict=True):
            s = -1.0 if (p, r) in self.flawed else 0.0
            if self.knows_labels and (p, r) in self.chosen:
                s += 0.5
            out.append(s)
        return out

    def save(self, path: str | Path) -> Path:
        root = Path(path)
        root.mkdir(parents=True, exist_ok=True)
        (root / "stand-in.json").write_text(json.dumps({"version": self.version, "blind": self.blind}))
        return root


def _settings(tmp_path: Path, url: str, *extra: str) -> Any:
    return load_settings(
        None,
        [
            "dev=true",
            f"database.url={url}",
            f"reward.models_dir={tmp_path / 'models'}",
            f"reward.update.sensitivity_pairs={PER_KIND}",
            *extra,
        ],
    )


def _held_out() -> list[dict[str, Any]]:
    """Real held-out pairs (the bundled HH-RLHF ones), enough for the held-out rule to promote."""
    pairs = [
        {"prompt": r["prompt"], "chosen": r["chosen"], "rejected": r["rejected"], "group": r["prompt"]}
        for r in bundled_records(HH_PAIRS)
        if r["chosen"] != r["rejected"]
    ]
    return pairs[:150]


@pytest.fixture(scope="module")
def probes() -> list[Perturbed]:
    return rs.probe_set(None, seed=0, per_kind=PER_KIND)


def test_probe_set_is_seeded_real_and_covers_the_kinds(probes: list[Perturbed]) -> None:
    assert rs.probe_set(None, seed=0, per_kind=PER_KIND) == probes  # the same pairs every time
    other = rs.probe_set(None, seed=1, per_kind=PER_KIND)
    assert other != probes
    kinds = {it.kind for it in probes}
    assert kinds == set(NAMES), kinds
    for kind in NAMES:
        n = sum(1 for it in probes if it.kind == kind)
        assert 1 <= n <= PER_KIND
    assert all(it.worse != it.better and it.direction == "worse" for it in probes)


def test_stored_episodes_come_before_the_bundled_data(db_url: str) -> None:
    store = Store(db_url)
    answer = "Steps:\n\n1. Preheat the oven.\n2. Mix the flour and water.\n3. Bake for 20 minutes.\n\nEnjoy it warm."
    now = time.time()
    eps: list[dict[str, Any]] = [
        {
            "episode_id": f"ep-{i}",
            "stream": "chat" if i % 2 else "other",
            "model": "m",
            "ts": float(i),
            "prompt": f"How do I bake bread number {i}?",
            "response": answer,
            "metadata": {},
            "source": "t",
            "position": str(i),
            "ingested_at": now,
        }
        for i in range(10)
    ]
    with store.engine.begin() as conn:
        conn.execute(t.episodes.insert(), eps)
    items = rs.probe_set(store, streams=["chat"], per_kind=3)
    drops = [it for it in items if it.kind == "drop_item"]
    assert len(drops) == 3 and all(it.seed_key.startswith("ep-") for it in drops), drops
    assert {int(it.seed_key.split("\x1f")[0][3:]) % 2 for it in drops} == {1}  # the chat stream only
    # The gate's record says how many probe pairs came from the stream.
    ucfg = load_settings(None, ["dev=true", "reward.update.sensitivity_pairs=3"]).reward.update
    spotter = FlawSpotter(rs.probe_set(store, streams=["chat"], per_kind=3), knows_labels=False, name="s")
    rec = rs.gate_sensitivity(ucfg, store, spotter, spotter, "chat", 1.645)
    assert rec is not None and rec["failed"] == [] and rec["probe"]["pairs"] <= 3 * len(NAMES)
    from_chat = sum(1 for it in rs.probe_set(store, streams=["chat"], per_kind=3) if it.seed_key.startswith("ep-"))
    assert rec["probe"]["from_stream"] == from_chat >= 3
    store.close()


def test_measure_reports_every_kind_with_intervals(probes: list[Perturbed]) -> None:
    blind = FlawSpotter(probes, blind=["truncate"], knows_labels=False, name="v")
    m = rs.measure(blind, probes)
    rows = rs.table(m.per_kind)
    assert set(rows) == set(NAMES)
    assert rows["truncate"]["rate"] == 0.0 and rows["truncate"]["ci_high"] < 0.5
    assert rows["rude_tone"]["rate"] == 1.0 and rows["rude_tone"]["ci_low"] > 0.5
    assert rs.blind_spots(rows) == ["truncate"]
    assert sum(m.detected) == len(probes) - rows["truncate"]["n"]
    assert "truncate" in rs.render(rows)


def test_compare_ignores_noise_and_small_kinds() -> None:
    item = Perturbed("drop_item", "p", "a. b.", "a.", "worse")
    rare = Perturbed("break_code", "p", "x < 1", "x <= 1", "worse")
    z = 1.645
    # 2 of 40 lost and 1 won back: a loss of 0.025, within the tolerance.
    items = [item] * 40
    act = [True] * 40
    cand = [True] * 38 + [False] * 2
    assert not rs.compare(items, act, cand, max_loss=0.05, min_pairs=20, z=z)["drop_item"]["failed"]
    # 4 of 40 lost (0.10 > 0.05), but 4 discordant pairs: the lower bound is not above 0 ... or is it.
    c4 = rs.compare(items, act, [True] * 36 + [False] * 4, max_loss=0.05, min_pairs=20, z=z)["drop_item"]
    assert c4["loss"] == pytest.approx(0.1) and c4["failed"] == (c4["lo"] > 0)
    # Lost and won in equal numbers: no loss at all.
    mixed = rs.compare(items, [True] * 20 + [False] * 20, [False] * 20 + [True] * 20, max_loss=0.05, min_pairs=20, z=z)
    assert mixed["drop_item"]["loss"] == 0 and not mixed["drop_item"]["failed"]
    # Everything lost on a kind with too few pairs: reported, never refuses.
    small = rs.compare([rare] * 10, [True] * 10, [False] * 10, max_loss=0.05, min_pairs=20, z=z)["break_code"]
    assert small["loss"] == 1.0 and small["lo"] > 0 and not small["failed"]


def test_only_a_sensitivity_the_active_version_has_can_refuse() -> None:
    """Losing a kind the active version scores at chance or below is noise, not a lost
    capability; losing one it detects refuses."""
    seen = Perturbed("off_topic", "p", "on topic.", "elsewhere.", "worse")
    coin = Perturbed("break_code", "p", "x < 1", "x <= 1", "worse")
    items = [seen] * 40 + [coin] * 40
    # The active version detects off_topic 36/40 and break_code 13/40 (0.32, below a coin).
    act = [True] * 36 + [False] * 4 + [True] * 13 + [False] * 27
    cand = [True] * 12 + [False] * 28 + [False] * 40  # loses both: 36 -> 12, 13 -> 0
    per_kind = {
        # 95% Wilson intervals of 36/40 and 13/40.
        "off_topic": Sensitivity("off_topic", 40, 36, 0.9, 0.7695, 0.9604, 0.95),
        "break_code": Sensitivity("break_code", 40, 13, 0.325, 0.2006, 0.4799, 0.95),
    }
    protected = rs.protected_kinds(per_kind, 0.5)
    assert protected == ["off_topic"]
    got = rs.compare(items, act, cand, max_loss=0.05, min_pairs=20, z=1.645, protected=protected)
    assert got["off_topic"]["failed"] and got["off_topic"]["protected"]
    assert got["break_code"]["lo"] > 0.05 and not got["break_code"]["failed"] and not got["break_code"]["protected"]
    # Without the floor (every kind protected) the same loss on break_code refuses.
    assert rs.compare(items, act, cand, max_loss=0.05, min_pairs=20, z=1.645)["break_code"]["failed"]


def _noisy_versions(
    rng: random.Random, kinds: int, n: int, lost: float = 0.0
) -> tuple[list[Perturbed], list[bool], list[bool]]:
    """Probe pairs of ``kinds`` kinds, ``n`` each; the active version detects each with 0.75, and
    the candidate is the active version with 40% of its pairs drawn again (the same rate: no loss)
    and, on the first kind only, ``lost`` of the active version's detections missed."""
    items, act, cand = [], [], []
    for k in range(kinds):
        for j in range(n):
            items.append(Perturbed(NAMES[k], "p", f"original {j}", f"perturbed {j}", "worse"))
            a = rng.random() < 0.75
            c = a if rng.random() > 0.4 else rng.random() < 0.75
            if k == 0 and a and rng.random() < lost:
                c = False
            act.append(a)
            cand.append(c)
    return items, act, cand


def test_the_gate_confidence_holds_for_all_kinds_together() -> None:
    """Eight protected kinds, none truly lost: the chance that any refuses stays near 5%, where a
    95% bound per kind refuses about a third of such candidates. A real loss on one kind still
    refuses most of the time (the price of the correction: some power)."""
    rng = random.Random(7)
    reps, z = 600, 1.645
    assert len(NAMES) >= 8
    family = per_kind = 0
    for _ in range(reps):
        items, act, cand = _noisy_versions(rng, 8, 40)
        got = rs.compare(items, act, cand, max_loss=0.05, min_pairs=20, z=z)
        assert {r["tested"] for r in got.values()} == {8}
        family += any(r["failed"] for r in got.values())
        # The same comparison one kind at a time: no correction, a 95% bound each.
        alone = [
            rs.compare(items[i : i + 40], act[i : i + 40], cand[i : i + 40], max_loss=0.05, min_pairs=20, z=z)
            for i in range(0, len(items), 40)
        ]
        per_kind += any(r["failed"] for one in alone for r in one.values())
    assert family / reps < 0.08  # 5% nominal, plus 3 standard errors of 600 draws
    assert per_kind / reps > 0.2
    # Power: a candidate that misses half of what the active version sees on one kind.
    refused = sum(
        rs.compare(*_noisy_versions(rng, 8, 40, lost=0.5), max_loss=0.05, min_pairs=20, z=z)[NAMES[0]]["failed"]
        for _ in range(100)
    )
    assert refused >= 70  # 80 of 100 with this seed; with a 95% bound per kind, 96


def _gate(tmp_path: Path, db_url: str, probes: list[Perturbed], blind: Sequence[str], *extra: str) -> Any:
    settings = _settings(tmp_path, db_url, *extra)
    store = Store(db_url)
    registry = Registry.for_settings(store, settings)
    held = _held_out()
    active = FlawSpotter(probes, knows_labels=False, name="active-0")
    candidate = FlawSpotter(probes, blind=blind, knows_labels=True, name=f"cand-{'-'.join(blind) or 'equal'}")
    candidate.chosen = {(p["prompt"], p["chosen"]) for p in held}
    registry.promote(registry.register(active, data_window={}, metrics={}))
    split = {"holdout_new": held, "holdout_old": [], "train_new": [], "train_old": []}
    metrics = Metrics()
    verdict = decide(
        settings, registry, candidate, active, split, data_window={"stream": "chat"}, train_metrics={}, metrics=metrics
    )
    return verdict, registry, metrics, store


def test_gate_refuses_a_candidate_blind_to_truncation(tmp_path: Path, db_url: str, probes: list[Perturbed]) -> None:
    verdict, registry, metrics, store = _gate(tmp_path, db_url, probes, ["truncate"])
    # Far better on the held-out labels, but it cannot see truncation any more: refused, and the
    # verdict says which kind.
    assert verdict["new"]["gain"]["lo"] > 0
    assert verdict["verdict"] == "reject" and not verdict["passed"], verdict["rule"]
    assert "truncate" in verdict["rule"] and verdict["sensitivity"]["failed"] == ["truncate"]
    comp = verdict["sensitivity"]["comparison"]
    assert comp["truncate"]["loss"] == 1.0 and comp["truncate"]["lo"] > 0.05
    assert not any(c["failed"] for k, c in comp.items() if k != "truncate")
    assert "sensitivity" in render_gate(verdict) and "truncate" in render_gate(verdict)
    active = registry.active()
    assert active is not None and active[0] == "active-0"
    row = registry.get(verdict["version"])
    assert row is not None and row["status"] == "rejected" and row["gate"]["sensitivity"]["failed"] == ["truncate"]

    def gauge(name: str, version: str, kind: str) -> float | None:
        value: float | None = metrics.registry.get_sample_value(name, {"version": version, "kind": kind})
        return value

    n = verdict["sensitivity"]["candidate"]["truncate"]["n"]
    assert gauge("oversight_rm_sensitivity", verdict["version"], "truncate") == 0.0
    assert gauge("oversight_rm_sensitivity_pairs", verdict["version"], "truncate") == n
    assert gauge("oversight_rm_sensitivity", "active-0", "truncate") == 1.0
    # Every kind has a series for both versions (pre-zeroed where a kind had no pairs).
    for kind in NAMES:
        assert gauge("oversight_rm_sensitivity_pairs", "active-0", kind) is not None
    report = rs.recorded(store, _settings(tmp_path, db_url), verdict["version"])
    assert report["failed"] == ["truncate"] and report["blind_spots"] == ["truncate"]
    assert report["compared_with"] == "active-0" and report["status"] == "rejected"
    store.close()


def test_gate_promotes_an_equally_sensitive_candidate(tmp_path: Path, db_url: str, probes: list[Perturbed]) -> None:
    verdict, registry, metrics, store = _gate(tmp_path, db_url, probes, [])
    assert verdict["verdict"] == "promote" and verdict["passed"], verdict["rule"]
    assert verdict["sensitivity"]["failed"] == []
    assert all(c["loss"] == 0 for c in verdict["sensitivity"]["comparison"].values())
    active = registry.active()
    assert active is not None and active[0] == verdict["version"]
    # The promoted version took the active role: the old active version's series are gone.
    assert metrics.rm_sensitivity_version("active") == verdict["version"]
    assert metrics.rm_sensitivity_version("candidate") is None
    sample = {"version": "active-0", "kind": "truncate"}
    assert metrics.registry.get_sample_value("oversight_rm_sensitivity", sample) is None
    # The worker publishes the active version from its gate record (nothing to load or score).
    fresh = Metrics()
    assert rs.refresh_active(fresh, _settings(tmp_path, db_url), store) == verdict["version"]
    got = fresh.registry.get_sample_value(
        "oversight_rm_sensitivity", {"version": verdict["version"], "kind": "drop_item"}
    )
    assert got == 1.0
    assert rs.refresh_active(fresh, _settings(tmp_path, db_url), store) is None  # once per version
    store.close()


def test_null_tolerance_reports_but_never_refuses(tmp_path: Path, db_url: str, probes: list[Perturbed]) -> None:
    verdict, *_, store = _gate(tmp_path, db_url, probes, ["truncate"], "reward.update.max_sensitivity_loss=null")
    assert verdict["verdict"] == "promote", verdict["rule"]
    assert verdict["sensitivity"]["comparison"]["truncate"]["loss"] == 1.0 and verdict["sensitivity"]["failed"] == []
    store.close()


def test_no_probe_pairs_means_not_measured(tmp_path: Path, db_url: str, probes: list[Perturbed]) -> None:
    verdict, *_, store = _gate(tmp_path, db_url, probes, ["truncate"], "reward.update.sensitivity_pairs=0")
    assert verdict["sensitivity"] is None and verdict["verdict"] == "promote"
    store.close()


def test_metrics_hold_one_version_per_role() -> None:
    m = Metrics()
    values = {"truncate": (0.9, 40), "drop_item": (0.0, 0)}
    m.set_rm_sensitivity("active", "a", values)
    m.set_rm_sensitivity("candidate", "b", values)
    m.set_rm_sensitivity("candidate", "c", values)  # b is replaced
    assert m.registry.get_sample_value("oversight_rm_sensitivity", {"version": "b", "kind": "truncate"}) is None
    assert m.registry.get_sample_value("oversight_rm_sensitivity", {"version": "c", "kind": "truncate"}) == 0.9
    m.set_rm_sensitivity("active", "c", values)  # c promoted: a goes, c stays (both roles hold it)
    m.clear_rm_sensitivity("candidate")
    assert m.registry.get_sample_value("oversight_rm_sensitivity", {"version": "a", "kind": "truncate"}) is None
    assert m.registry.get_sample_value("oversight_rm_sensitivity_pairs", {"version": "c", "kind": "drop_item"}) == 0


# --- the command ---------------------------------------------------------------------------------


def _run(argv: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str, str]:
    from monitor.cli import main

    rc = main(argv)
    out, err = capsys.readouterr()
    return rc, out, err


def test_cli_measures_a_real_model_folder(
    tmp_path: Path, small_models: dict[str, Any], capsys: pytest.CaptureFixture[str]
) -> None:
    folder = small_models["trained"].save(tmp_path / "trained")
    rc, out, err = _run(["rm", "sensitivity", "--model", str(folder), "--pairs-per-kind", "3", "--json"], capsys)
    assert rc == 0, err
    rec = json.loads(out)
    assert set(rec["per_kind"]) == set(NAMES) and rec["pairs"] == sum(r["n"] for r in rec["per_kind"].values())
    assert all(0 <= r["detected"] <= r["n"] <= 3 for r in rec["per_kind"].values())
    rc, out, _ = _run(["rm", "sensitivity", "--model", str(folder), "--pairs-per-kind", "2"], capsys)
    assert rc == 0 and "cannot see" in out and "truncate" in out


def test_cli_errors_are_one_line(tmp_path: Path, db_url: str, capsys: pytest.CaptureFixture[str]) -> None:
    Store(db_url).close()
    rc, out, err = _run(["rm", "sensitivity", "--db", db_url, "--dev"], capsys)
    assert rc == 1 and "no active reward-model version" in err and "Traceback" not in err + out
    rc, _, err = _run(["rm", "sensitivity", "--db", db_url, "--dev", "--version", "nope"], capsys)
    assert rc == 1 and "unknown reward-model version 'nope'" in err and "Traceback" not in err
    empty = tmp_path / "empty"
    empty.mkdir()
    rc, _, err = _run(["rm", "sensitivity", "--model", str(empty), "--dev"], capsys)
    assert rc == 1 and "cannot load reward-model version" in err and "Traceback" not in err
