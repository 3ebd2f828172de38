"""The built-in assistants: ``rm_score``, ``drift_signals`` and ``neighbours``.

Each reads a bounded number of rows from the store (a ``LIMIT`` on every query) and runs no
model: a reviewer opening an item waits for a few indexed reads, never a forward pass. Each
returns no hint when it has nothing to say (no score stored, too few episodes for a range, no
labelled neighbour), so an item looks the same under a condition whose assistant is silent.

Blinding: every query is restricted to the episode's own stream, and a hint carries only
episode text of that stream (which its reviewers see anyway), a score or a human rating; never
metadata, a policy version, a reviewer's name or a critique.
"""

from __future__ import annotations

import math
import re
import threading
from collections.abc import Sequence
from typing import Any, ClassVar

import sqlalchemy as sa
from pydantic import BaseModel, ConfigDict, Field

from monitor.assist.base import MAX_HINT_CHARS, MAX_HINTS, AssistContext, EpisodeView, Hint, register, registered
from monitor.signals import TEXT_SIGNALS, text_stats
from monitor.store import tables as t

BUILTIN = ("rm_score", "drift_signals", "neighbours")
_WORD = re.compile(r"\w+", re.UNICODE)
_SPACE = re.compile(r"\s+")


class _Params(BaseModel):
    # An unknown parameter is a typo in the experiment's configuration: refused, not ignored.
    model_config = ConfigDict(extra="forbid", frozen=True)


def clip(text: str, limit: int) -> str:
    """``text`` on one line, at most ``limit`` characters (an ellipsis marks the cut).

    >>> clip("a  b\\n c", 10), clip("abcdef", 4)
    ('a b c', 'abc…')
    """
    one = _SPACE.sub(" ", text).strip()
    return one if len(one) <= limit else one[: max(0, limit - 1)].rstrip() + "…"


def ordinal(n: int) -> str:
    """``n`` as an English ordinal.

    >>> [ordinal(n) for n in (1, 2, 3, 4, 11, 12, 13, 21, 100)]
    ['1st', '2nd', '3rd', '4th', '11th', '12th', '13th', '21st', '100th']
    """
    suffix = "th" if 10 <= n % 100 <= 20 else {1: "st", 2: "nd", 3: "rd"}.get(n % 10, "th")
    return f"{n}{suffix}"


def percentile_of(value: float, values: Sequence[float]) -> float:
    """The mid-rank percentile of ``value`` among ``values`` (ties count half).

    >>> percentile_of(2.0, [1.0, 2.0, 3.0, 4.0])
    37.5
    """
    below = sum(1 for v in values if v < value)
    equal = sum(1 for v in values if v == value)
    return 100.0 * (below + 0.5 * equal) / len(values)


def quantile(sorted_values: Sequence[float], q: float) -> float:
    """Linear-interpolated quantile of already sorted values (numpy's default method)."""
    pos = q * (len(sorted_values) - 1)
    lo = math.floor(pos)
    hi = min(lo + 1, len(sorted_values) - 1)
    return sorted_values[lo] + (sorted_values[hi] - sorted_values[lo]) * (pos - lo)


# -- rm_score -------------------------------------------------------------------------------


#: The reward-model score assistant's name (a perturbed canary is scored for it: monitor/review/canary_score.py).
RM_SCORE = "rm_score"


class RmScoreParams(_Params):
    window: int = Field(1000, ge=10, le=100_000, description="recent scored episodes of the stream for the percentile")
    min_scores: int = Field(20, ge=2, description="fewer scored episodes than this: the score without a percentile")


class RmScore:
    """The active reward model's stored score of the episode and its percentile among the
    stream's ``window`` most recent scores of the same version.

    Silent when no version is active, the episode was not scored by it, the item is a pair
    (the score is of one response, and which one is shown first is the item's keyed order),
    or the stored response is not the text the reviewer sees (a score of other text misleads).
    A perturbed canary's text was scored when the canary was made (``episode.shown_scores``):
    silent there, the hint would tell the canaries apart from the real items, which all have one.
    """

    name: ClassVar[str] = RM_SCORE

    def __init__(self, params: dict[str, Any]):
        self.p = RmScoreParams.model_validate(params)

    def hints(self, episode: EpisodeView, ctx: AssistContext) -> list[Hint]:
        if episode.alternative is not None:
            return []
        s, e = t.rm_scores, t.episodes
        with ctx.store.engine.connect() as conn:
            version = conn.execute(
                sa.select(t.rm_active.c.version).where(t.rm_active.c.stream_set == ctx.settings.reward.stream_set)
            ).scalar()
            if version is None:
                return []
            score = episode.shown_scores.get(version)
            if score is None:
                row = conn.execute(
                    sa.select(s.c.score, e.c.response, e.c.stream)
                    .join(e, e.c.episode_id == s.c.episode_id)
                    .where(s.c.episode_id == episode.episode_id, s.c.version == version)
                ).first()
                if row is None or row.stream != episode.stream or row.response != episode.response:
                    return []
                score = float(row.score)
            if not math.isfinite(score):
                return []
            recent = [
                float(v)
                for v in conn.execute(
                    sa.select(s.c.score)
                    .where(s.c.stream == episode.stream, s.c.version == version)
                    .order_by(s.c.ts.desc())
                    .limit(self.p.window)
                ).scalars()
                if math.isfinite(v)
            ]
        if len(recent) < self.p.min_scores:
            return [Hint(assistant=self.name, kind="score", score=score, text=f"Reward model score {score:.3f}")]
        pct = percentile_of(score, recent)
        text = (
            f"Reward model score {score:.3f}: {ordinal(round(pct))} percentile of the stream's"
            f" {len(recent)} most recent scored episodes"
        )
        return [Hint(assistant=self.name, kind="score", score=score, percentile=pct, text=text)]


# -- drift_signals --------------------------------------------------------------------------


class DriftSignalsParams(_Params):
    window: int = Field(500, ge=20, le=20_000, description="recent episodes of the stream that form the reference")
    min_reference: int = Field(50, ge=10, description="fewer reference episodes than this: no hint")
    coverage: float = Field(0.95, gt=0.5, lt=1, description="central share of the reference that is in range")
    cache_s: float = Field(60.0, ge=0, description="seconds a stream's reference is reused")
    signals: list[str] | None = Field(None, description="text signals to check (default: those drift watches)")


# How a signal reads to a person: its label and how its value is shown (log signals as counts).
_SHOWN: dict[str, tuple[str, str]] = {
    "response_log_chars": ("Response length", "characters"),
    "prompt_log_chars": ("Prompt length", "characters"),
    "response_log_lines": ("Response lines", "non-blank lines"),
    "distinct_token_ratio": ("Distinct-word ratio", ""),
    "non_text_ratio": ("Share of non-text characters", ""),
}


def shown_value(signal: str, x: float) -> str:
    if signal.endswith(("_log_chars", "_log_lines")):
        return f"{math.expm1(x):,.0f}"
    return f"{x:.3g}"


class DriftSignals:
    """The episode's text statistics (``monitor.signals``) that fall outside the stream's
    reference: the central ``coverage`` of its ``window`` most recent episodes for a continuous
    signal; for a binary one, a value that fewer than ``(1 - coverage) / 2`` of them share.

    Why recent episodes and not the drift monitor's reference: the monitor keeps its detectors'
    state as signed pickles, which the review service has no business unpickling; the recent
    traffic of the stream is what the reviewer's item is compared with anyway. The reference is
    computed once per stream per ``cache_s`` seconds (``window`` rows, bounded text statistics).
    """

    name: ClassVar[str] = "drift_signals"

    def __init__(self, params: dict[str, Any]):
        self.p = DriftSignalsParams.model_validate(params)
        unknown = sorted(set(self.p.signals or ()) - set(TEXT_SIGNALS))
        if unknown:
            raise ValueError(f"drift_signals: unknown text signals {unknown}; known: {sorted(TEXT_SIGNALS)}")
        self._cache: dict[str, tuple[float, dict[str, list[float]]]] = {}
        self._lock = threading.Lock()

    def signals_of(self, ctx: AssistContext) -> list[str]:
        if self.p.signals is not None:
            return list(self.p.signals)
        watched = [s for s in ctx.settings.drift.signals if s in TEXT_SIGNALS]
        return watched or list(TEXT_SIGNALS)

    def reference(self, episode: EpisodeView, ctx: AssistContext) -> dict[str, list[float]]:
        """Sorted values of every text signal over the stream's recent episodes (not this one)."""
        with self._lock:
            hit = self._cache.get(episode.stream)
            if hit is not None and ctx.now - hit[0] < self.p.cache_s:
                return hit[1]
        e = t.episodes
        with ctx.store.engine.connect() as conn:
            rows = conn.execute(
                sa.select(e.c.prompt, e.c.response)
                .where(e.c.stream == episode.stream, e.c.episode_id != episode.episode_id)
                .order_by(e.c.ts.desc())
                .limit(self.p.window)
            ).all()
        values: dict[str, list[float]] = {name: [] for name in TEXT_SIGNALS}
        for r in rows:
            for name, x in text_stats(r.prompt, r.response).items():
                if name in values and math.isfinite(x):
                    values[name].append(x)
        ref = {name: sorted(v) for name, v in values.items()}
        with self._lock:
            if len(self._cache) >= 256:  # streams are few; a bound all the same
                self._cache.clear()
            self._cache[episode.stream] = (ctx.now, ref)
        return ref

    def hints(self, episode: EpisodeView, ctx: AssistContext) -> list[Hint]:
        ref = self.reference(episode, ctx)
        stats = text_stats(episode.prompt, episode.response)
        tail = (1 - self.p.coverage) / 2
        out: list[Hint] = []
        for name in self.signals_of(ctx):
            values, x = ref.get(name, []), stats.get(name)
            if x is None or not math.isfinite(x) or len(values) < self.p.min_reference:
                continue
            spec = TEXT_SIGNALS[name]
            n = len(values)
            if spec.kind == "binary":
                share = sum(1 for v in values if v == x) / n
                if share >= tail:
                    continue
                state = "yes" if x else "no"
                text = (
                    f"{spec.description[0].upper()}{spec.description[1:]}: {state} for this episode,"
                    f" but for only {share:.1%} of the stream's {n} most recent episodes"
                )
            else:
                lo, hi = quantile(values, tail), quantile(values, 1 - tail)
                if lo <= x <= hi:
                    continue
                label, unit = _SHOWN.get(name, (name, ""))
                unit = f" {unit}" if unit else ""
                text = (
                    f"{label} {shown_value(name, x)}{unit} is {'below' if x < lo else 'above'} the stream's usual"
                    f" range {shown_value(name, lo)} to {shown_value(name, hi)}{unit} (central"
                    f" {self.p.coverage:.0%} of its {n} most recent episodes)"
                )
            out.append(Hint(assistant=self.name, kind="flag", score=x, text=clip(text, MAX_HINT_CHARS)))
        return out[:MAX_HINTS]


# -- neighbours -----------------------------------------------------------------------------


class NeighboursParams(_Params):
    window: int = Field(300, ge=1, le=5000, description="most recent labels of the stream searched")
    k: int = Field(3, ge=1, le=MAX_HINTS, description="neighbours shown at most")
    min_similarity: float = Field(0.2, ge=0, le=1, description="word-set Jaccard similarity a neighbour needs")
    excerpt_chars: int = Field(160, ge=20, le=300, description="characters of a neighbour's prompt shown")
    scan_chars: int = Field(4000, ge=100, le=50_000, description="characters of prompt and response compared")


def words(text: str, limit: int) -> frozenset[str]:
    """The lower-cased word set of the first ``limit`` characters.

    >>> sorted(words("The cat, the CAT!", 100))
    ['cat', 'the']
    """
    return frozenset(_WORD.findall(text[:limit].lower()))


def jaccard(a: frozenset[str], b: frozenset[str]) -> float:
    """Shared over all words (0 for two empty sets).

    >>> jaccard(frozenset("ab"), frozenset("bc"))
    0.3333333333333333
    """
    union = len(a | b)
    return len(a & b) / union if union else 0.0


class Neighbours:
    """The already-labelled episodes of the same stream most like this one (word-set Jaccard
    over prompt and response, among the stream's ``window`` most recent labels), each as a
    note with its mean human rating and a short excerpt of its prompt.

    Only rated labels count (a skip or a preference alone says nothing a reviewer can compare
    with); the episode itself is never its own neighbour (another slot's label of an item with
    overlap would leak the other reviewer's rating)."""

    name: ClassVar[str] = "neighbours"

    def __init__(self, params: dict[str, Any]):
        self.p = NeighboursParams.model_validate(params)

    def hints(self, episode: EpisodeView, ctx: AssistContext) -> list[Hint]:
        lab, e = t.labels, t.episodes
        with ctx.store.engine.connect() as conn:
            rows = conn.execute(
                sa.select(lab.c.episode_id, lab.c.rating, e.c.prompt, e.c.response)
                .join(e, e.c.episode_id == lab.c.episode_id)
                .where(
                    lab.c.stream == episode.stream,
                    e.c.stream == episode.stream,
                    lab.c.episode_id != episode.episode_id,
                    lab.c.skipped.is_(False),
                    lab.c.rating.is_not(None),
                )
                .order_by(lab.c.created_at.desc(), lab.c.id.desc())
                .limit(self.p.window)
            ).all()
        if not rows:
            return []
        ratings: dict[str, list[int]] = {}
        texts: dict[str, tuple[str, str]] = {}
        for r in rows:
            ratings.setdefault(r.episode_id, []).append(int(r.rating))
            texts[r.episode_id] = (r.prompt, r.response)
        mine = words(episode.prompt, self.p.scan_chars) | words(episode.response, self.p.scan_chars)
        scored = []
        for eid, (prompt, response) in texts.items():
            sim = jaccard(mine, words(prompt, self.p.scan_chars) | words(response, self.p.scan_chars))
            if sim >= self.p.min_similarity:
                scored.append((sim, eid))
        scored.sort(key=lambda se: (-se[0], se[1]))
        out = []
        for sim, eid in scored[: self.p.k]:
            rs = ratings[eid]
            mean = sum(rs) / len(rs)
            rated = f"rated {mean:.1f}/7 by {len(rs)} reviewers" if len(rs) > 1 else f"rated {rs[0]}/7"
            excerpt = clip(texts[eid][0], self.p.excerpt_chars)
            text = f"Similar labelled episode ({sim:.0%} word overlap), {rated}. Prompt: “{excerpt}”"
            out.append(Hint(assistant=self.name, kind="note", score=mean, text=clip(text, MAX_HINT_CHARS)))
        return out


def register_builtins() -> None:
    """Register the built-in assistants; a second call does nothing (the registry refuses a
    name twice, and an import of this module must never depend on being the first)."""
    known = set(registered())
    for name, factory in (("rm_score", RmScore), ("drift_signals", DriftSignals), ("neighbours", Neighbours)):
        if name not in known:
            register(name, factory)
