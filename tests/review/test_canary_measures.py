"""The measures of monitor/quality/canaries.py against simulated reviewers of known skill: the
detection measure must not credit a reviewer for rating harshly (or noisily) without seeing
anything, and the intervals (detection and time per item) must cover at their stated level.

The reviewers follow the model the correction assumes: a perturbation is seen with probability
``sens`` (then flagged and rated 1); otherwise, and on an original, the reviewer rates the item as
any other, round(quality + bias + N(0, sd)) on 1-7, unflagged. The reference is one careful
labeller's real label of each source (round(quality + N(0, 0.8))). Before the correction a blind
reviewer 1.5 points harsher than the labeller scored about 0.8 and was never marked low
(/tmp/hunt_quality/detect_bias.py in the report that found it)."""

from __future__ import annotations

import math
import random
import statistics
import time
from typing import Any

import pytest
import sqlalchemy as sa
from review_helpers import episode_row, seed

from monitor.quality import canaries as qc
from monitor.review import auth
from monitor.store import Store
from monitor.store import tables as t

# name: (true detection, rating bias, rating noise sd)
REVIEWERS = {
    "blind": (0.0, 0.0, 0.8),
    "harsh-blind": (0.0, -1.5, 0.8),
    "good": (0.6, 0.0, 0.8),
    "good-lenient": (0.6, 1.0, 0.8),
}
N_PERTURBED = 40
N_ORIGINAL = 40


def _clip(x: float) -> int:
    return min(7, max(1, round(x)))


def _canary(cid: str, user: int, episode: str, presentation: str, **extra: Any) -> dict[str, Any]:
    return {
        "id": cid,
        "user_id": user,
        "episode_id": episode,
        "stream": "s",
        "kind": extra.pop("kind", "truncate"),
        "presentation": presentation,
        "perturbed": "x",
        "detail": {},
        "alternative_first": False,
        "shown_ts": 0.0,
        "seed": 0,
        "status": "done",
        "fence": 1,
        "created_at": extra.pop("at", time.time()),
    }


def _label(cid: str, user: int, episode: str, presentation: str, **extra: Any) -> dict[str, Any]:
    return {
        "canary_id": cid,
        "user_id": user,
        "episode_id": episode,
        "stream": "s",
        "kind": extra.pop("kind", "truncate"),
        "presentation": presentation,
        "skipped": False,
        "rating": extra.pop("rating", None),
        "flags": extra.pop("flags", []),
        "preference": extra.pop("preference", None),
        "critique": "",
        "time_spent_ms": extra.pop("ms", 1000),
        "created_at": extra.pop("at", time.time()),
        "assist_experiment": extra.pop("experiment", None),
        "assist_condition": extra.pop("condition", None),
    }


class Sim:
    """A store with one labeller's real labels and canaries answered by simulated reviewers."""

    def __init__(self, url: str, rng: random.Random) -> None:
        self.store = Store(url)
        self.rng = rng
        self.quality: dict[str, int] = {}
        self.labeller = auth.create_user(self.store, "labeller", "reviewer", "x" * 20)
        self.users: dict[str, int] = {}
        self.count = 0

    def user(self, name: str) -> int:
        if name not in self.users:
            self.users[name] = auth.create_user(self.store, name, "reviewer", "x" * 20).id
        return self.users[name]

    def sources(self, n: int) -> list[str]:
        """n new source episodes, each with the labeller's real label."""
        ids = [f"e{len(self.quality) + i:05d}" for i in range(n)]
        for e in ids:
            self.quality[e] = self.rng.randint(2, 6)
        seed(self.store, [episode_row(e) for e in ids])
        now = time.time()
        with self.store.engine.begin() as conn:
            conn.execute(
                t.labels.insert(),
                [
                    {
                        "episode_id": e,
                        "slot": 0,
                        "user_id": self.labeller.id,
                        "stream": "s",
                        "skipped": False,
                        "rating": _clip(self.quality[e] + self.rng.gauss(0, 0.8)),
                        "flags": [],
                        "critique": "",
                        "preference": None,
                        "time_spent_ms": 1000,
                        "created_at": now,
                    }
                    for e in ids
                ],
            )
        return ids

    def answer(
        self, name: str, skill: tuple[float, float, float], perturbed: int, originals: int, **extra: Any
    ) -> None:
        """``perturbed`` and ``originals`` canaries of new sources, answered by a reviewer of ``skill``."""
        sens, bias, sd = skill
        uid = self.user(name)
        canaries, labels = [], []
        for j, e in enumerate(self.sources(perturbed + originals)):
            self.count += 1
            cid = f"c{self.count:05d}"
            presentation = "perturbed" if j < perturbed else "original"
            if presentation == "perturbed" and self.rng.random() < sens:
                rating, flags = 1, ["incorrect"]
            else:
                rating, flags = _clip(self.quality[e] + bias + self.rng.gauss(0, sd)), []
            canaries.append(_canary(cid, uid, e, presentation))
            labels.append(_label(cid, uid, e, presentation, rating=rating, flags=flags, **extra))
        with self.store.engine.begin() as conn:
            conn.execute(t.canaries.insert(), canaries)
            conn.execute(t.canary_labels.insert(), labels)


def test_harsh_or_blind_reviewers_are_not_credited_with_detection(sqlite_url: str) -> None:
    """The fault: the raw rule (a flag or a rating below the reference) gave a harsh, blind
    reviewer about 0.8. Corrected for the reviewer's own rate on originals, a blind reviewer's
    interval covers 0 and an honest one's covers the true 0.6; with too few originals, flags alone
    count, which harshness cannot inflate."""
    sim = Sim(sqlite_url, random.Random(20240611))
    for name, skill in REVIEWERS.items():
        sim.answer(name, skill, N_PERTURBED, N_ORIGINAL)
    # Harsh and blind, with too few originals to estimate a baseline (4, below qc.MIN_BASELINE).
    sim.answer("harsh-blind-new", REVIEWERS["harsh-blind"], N_PERTURBED, 4)
    rep = {r["reviewer"]: r for r in qc.reviewer_quality(sim.store, level=0.5)}
    sim.store.close()

    for name, (sens, _, _) in REVIEWERS.items():
        d = rep[name]["detection"]
        assert d["ci"][0] <= sens <= d["ci"][1], (name, d)
        assert d["rule"] == "baseline" and d["n"] == N_PERTURBED and d["baseline"]["n"] == N_ORIGINAL, (name, d)
    harsh = rep["harsh-blind"]["detection"]
    # The raw rule still fires on most of the harsh reviewer's perturbed canaries (the fault's setting)...
    assert harsh["raw"] > 0.6 and harsh["baseline"]["rate"] > 0.6, harsh
    # ...but the measure does not count that as detection.
    assert harsh["ci"][0] == 0.0 and harsh["rate"] < harsh["raw"] - 0.3, harsh
    assert rep["blind"]["low"] and rep["blind"]["detection"]["ci"][1] < 0.3
    assert not rep["good"]["low"] and not rep["good-lenient"]["low"]
    # The per-kind row reads the same baseline (the reviewer's originals of every kind).
    (kind,) = rep["harsh-blind"]["kinds"]
    assert kind["detection"] == harsh

    new = rep["harsh-blind-new"]["detection"]
    assert qc.MIN_BASELINE > 4 and new["rule"] == "flag" and (new["k"], new["rate"]) == (0, 0.0), new
    assert rep["harsh-blind-new"]["low"]


def test_the_reference_of_an_original_leaves_out_the_reviewers_own_rating(sqlite_url: str) -> None:
    """bob rates the original 4, ann's real label is 6 and cy rated it 4 as an original: the
    reference for bob is the median of the others' (6, 4) = 5, so bob's 4 is below it; with his
    own rating in (6, 4, 4) it would be 4, and an original could never be rated below itself."""
    sim = Sim(sqlite_url, random.Random(1))
    (e,) = sim.sources(1)
    users = {name: sim.user(name) for name in ("bob", "cy")}
    with sim.store.engine.begin() as conn:
        conn.execute(t.labels.update().where(t.labels.c.episode_id == e).values(rating=6))
        for i, (name, rating) in enumerate((("bob", 4), ("cy", 4))):
            uid = users[name]
            conn.execute(t.canaries.insert().values(**_canary(f"o{i}", uid, e, "original")))
            conn.execute(t.canary_labels.insert().values(**_label(f"o{i}", uid, e, "original", rating=rating)))
    by = {o.reviewer: o for o in qc.outcomes(sim.store)}
    sim.store.close()
    assert by["bob"].below and by["bob"].fires and by["bob"].false_flag is False
    assert by["cy"].below  # the same for cy: the others' median is (6, 4) too


def _outcome(presentation: str, **kw: Any) -> qc.Outcome:
    return qc.Outcome(
        reviewer="r",
        kind="truncate",
        presentation=presentation,
        detected=kw.pop("detected", None),
        false_flag=kw.pop("false_flag", None),
        seconds=1.0,
        created_at=0.0,
        experiment=None,
        condition=None,
        **kw,
    )


def _pairs(original: int, perturbed: int, ties: int) -> list[qc.Outcome]:
    return (
        [_outcome("pair", detected=True)] * original
        + [_outcome("pair", detected=False, reversed=True)] * perturbed
        + [_outcome("pair", detected=False)] * ties
    )


def test_pairs_are_corrected_by_the_perturbed_ones_preferred() -> None:
    """A reviewer who picks a side at random prefers the original about half the time: 0, not 0.5.
    One who ties whenever unsure is credited with the raw rate."""
    coin = qc.detection(_pairs(21, 19, 0))
    assert coin["raw"] == pytest.approx(21 / 40) and coin["rate"] == pytest.approx(0.05)
    assert coin["ci"][0] == 0.0 and coin["ci"][1] < 0.5 and coin["rule"] is None
    tier = qc.detection(_pairs(24, 0, 16))
    assert tier["rate"] == pytest.approx(0.6) and tier["ci"][0] < 0.6 < tier["ci"][1]
    assert (tier["k"], tier["n"], tier["pairs"], tier["pairs_reversed"]) == (24, 40, 40, 0)


def test_single_responses_and_pairs_combine_by_count() -> None:
    singles = [_outcome("perturbed", detected=True, flagged=True)] * 6 + [_outcome("perturbed", detected=False)] * 4
    originals = [_outcome("original", false_flag=False)] * 10
    d = qc.detection(singles + _pairs(3, 1, 6), originals)
    # singles: 6 of 10 against a baseline of 0 of 10 -> 0.6; pairs: (3 - 1) / 10 = 0.2; by count: 0.4.
    assert d["rule"] == "baseline" and d["rate"] == pytest.approx(0.4) and (d["k"], d["n"]) == (9, 20)
    assert d["ci"][0] < 0.4 < d["ci"][1]


@pytest.mark.parametrize(("detect", "base"), [(0.0, 0.35), (0.0, 0.8), (0.6, 0.35), (0.6, 0.8), (0.3, 0.1)])
def test_corrected_interval_covers_at_its_level(detect: float, base: float) -> None:
    """The score interval of the corrected measure, 40 perturbed canaries and 40 originals:
    2,000 seeded draws; its coverage is within 0.93-0.99 (at 0 the clipped interval covers from
    one side only, so about 0.975). The standard error of a coverage of 0.95 from 2,000 draws is
    0.005."""
    rng = random.Random(f"{detect}-{base}")
    p = detect + (1 - detect) * base
    hits = tries = 0
    for _ in range(2000):
        k = sum(rng.random() < p for _ in range(N_PERTURBED))
        k0 = sum(rng.random() < base for _ in range(N_ORIGINAL))
        r = qc.corrected(k, N_PERTURBED, k0, N_ORIGINAL)
        if r is None:  # the rule fired on every original: flags alone count (not this interval)
            continue
        tries += 1
        hits += r[1][0] <= detect <= r[1][1]
    assert tries > 1900 and 0.93 <= hits / tries <= 0.99, hits / tries


def test_an_assistant_that_makes_reviewers_harsh_shows_no_gain(sqlite_url: str) -> None:
    """The experiment's report corrects each condition against its own originals: hints that only
    make blind reviewers rate everything 1.5 lower raised the raw rule's rate by about 0.45, a
    "gain" whose Newcombe interval excluded 0."""
    sim = Sim(sqlite_url, random.Random(7))
    for i in range(2):
        for cond, bias in (("none", 0.0), ("hints", -1.5)):
            sim.answer(f"r{i}-{cond}", (0.0, bias, 0.8), 30, 30, experiment="assist", condition=cond)
    rep = qc.experiment_report(sim.store, "assist", ["none", "hints"])
    sim.store.close()
    rows = {(r["condition"], r["kind"]): r for r in rep["rows"]}
    hints = rows[("hints", "all")]
    diff = hints["detection_diff"]
    # Wide: ratings this harsh tell little, and the interval says so rather than claim a gain.
    assert diff["ci"][0] <= 0.0 <= diff["ci"][1], diff
    assert hints["detection"]["raw"] - rows[("none", "all")]["detection"]["raw"] > 0.25
    assert hints["detection"]["ci"][0] == 0.0
    assert hints["seconds_diff"]["ratio"] == pytest.approx(1.0)


# -- time per item -------------------------------------------------------------------------------

DRAWS = 4000


def _coverage(draw: Any, check: Any, draws: int = DRAWS) -> float:
    return sum(bool(check(draw())) for _ in range(draws)) / draws


@pytest.mark.parametrize("n", [2, 3, 5])
def test_time_intervals_cover_at_their_level(n: int) -> None:
    """4,000 seeded draws a case (standard error of a coverage of 0.95: 0.0034). The z interval
    these replaced covered 0.71 (n = 2), 0.81 (3) and 0.88 (5) for normal times; the t interval
    covers 0.95 for normal times, the geometric one 0.95 for lognormal times."""
    rng = random.Random(n)
    cov = _coverage(lambda: qc.mean_ci([rng.gauss(30, 10) for _ in range(n)])["ci"], lambda ci: ci[0] <= 30 <= ci[1])
    assert 0.935 <= cov <= 0.965, cov
    mu = math.log(30)
    cov = _coverage(
        lambda: qc.mean_ci([rng.lognormvariate(mu, 0.8) for _ in range(n)])["geo_ci"],
        lambda ci: ci[0] <= 30 <= ci[1],
    )
    assert 0.935 <= cov <= 0.965, cov


@pytest.mark.parametrize(("na", "sa_", "nb", "sb"), [(2, 10, 2, 10), (3, 20, 12, 5)])
def test_welch_interval_covers_at_its_level(na: int, sa_: float, nb: int, sb: float) -> None:
    """Welch's interval with Welch-Satterthwaite degrees of freedom (the z interval covered 0.83
    at 2 a group). Welch's degrees of freedom are an approximation, a little conservative at 2 a
    group, a little liberal when the smaller group has the larger spread: 0.925-0.985. The ratio of
    geometric means likewise on lognormal times."""
    rng = random.Random(na * 100 + nb)
    cov = _coverage(
        lambda: qc.welch([rng.gauss(30, sa_) for _ in range(na)], [rng.gauss(30, sb) for _ in range(nb)])["ci"],
        lambda ci: ci[0] <= 0 <= ci[1],
    )
    assert 0.925 <= cov <= 0.985, cov
    mu = math.log(30)
    cov = _coverage(
        lambda: qc.welch(
            [rng.lognormvariate(mu, sa_ / 30) for _ in range(na)], [rng.lognormvariate(mu, sb / 30) for _ in range(nb)]
        )["ratio_ci"],
        lambda ci: ci[0] <= 1 <= ci[1],
    )
    assert 0.925 <= cov <= 0.985, cov


def test_time_fields() -> None:
    m = qc.mean_ci([0.0, 20.0, 45.0])  # a time of 0 (not reported) is left out of the geometric mean
    assert m["n"] == 3 and m["geo_n"] == 2 and m["geomean"] == pytest.approx(30.0)
    assert m["mean"] == pytest.approx(statistics.fmean([0.0, 20.0, 45.0]))
    assert qc.mean_ci([5.0])["ci"] is None and qc.mean_ci([])["mean"] is None
    w = qc.welch([1.0, 1.0], [1.0, 1.0])
    assert w["ci"] == (0.0, 0.0) and w["ratio_ci"] == (1.0, 1.0)
    assert qc.welch([1.0], [2.0, 3.0])["ci"] is None


def test_report_reads_without_a_rating_column_value(sqlite_url: str) -> None:
    """A perturbed canary with no rating (flags only) and no reference still scores by its flag."""
    sim = Sim(sqlite_url, random.Random(3))
    (e,) = sim.sources(1)
    uid = sim.user("bob")
    with sim.store.engine.begin() as conn:
        conn.execute(t.canaries.insert().values(**_canary("p", uid, e, "perturbed")))
        conn.execute(t.canary_labels.insert().values(**_label("p", uid, e, "perturbed", flags=["incorrect"])))
        n = conn.execute(sa.select(sa.func.count()).select_from(t.canary_labels)).scalar_one()
    (bob,) = qc.reviewer_quality(sim.store, level=0.5)
    sim.store.close()
    assert n == 1 and bob["detection"]["rule"] == "flag" and bob["detection"]["k"] == 1
