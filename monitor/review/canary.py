"""Canaries: perturbed copies of stored episodes, mixed blind into each reviewer's queue.

A configured share (``review.canaries.share``) of a reviewer's claims hand out a canary instead of
the next real item. Whether claim number *n* of reviewer *u* is a canary is a keyed draw
(``sampling.keyed_uniform`` with the secret sampling key, the canary seed, *u* and *n*, where *n*
counts the reviewer's labels and canaries so far), so the position is random, reproducible, and
unpredictable to the reviewer. A canary is only handed out when a real item is waiting: an empty
queue stays empty.

Source: a stored episode labelled by someone else (the newest ``source_window`` labelled items),
else any episode of the review queue; never one the reviewer labelled or had as a canary before
(and the real queue no longer offers that reviewer a canary's source: no "seen this before").
Perturbation: :func:`monitor.perturb.choose` over ``review.canaries.kinds``, seeded by the source
episode, the canary seed and the reviewer: deterministic per item and seed.

Presentation (a keyed draw): a single response is shown as the ``original`` or as the
``perturbed`` version (half each); a pairwise episode is shown as a ``pair`` of the original and
the perturbed response, in keyed order, like every real pair.

Blind: the item has the same fields and API shape as a real one (:class:`Shown` becomes a
``queue.Item``). The id is generated in the shape of the stream's recent episode ids (positions
that are constant across them are kept, the others are keyed-random characters of the same
class; a UUID stays a valid UUID of the same version) and never names the source. The shown
event time is that of the real item the canary displaces, less a keyed 0-60 s.

Residual tells, honestly: a stream whose ids are sequential or embed a time shows a canary id
out of sequence; the queue's "waiting" count does not fall when a canary is labelled; a
reviewer who can look ids up elsewhere (an export, a trace) finds no such episode.
"""

from __future__ import annotations

import hashlib
import re
import uuid
from dataclasses import dataclass, replace
from typing import Any

import sqlalchemy as sa

from monitor.config import CanaryConfig
from monitor.perturb import Perturbed, applicable, choose, make_seed_key
from monitor.review.canary_score import SHOWN_SCORE, shown_score_of
from monitor.review.conversation import Turn
from monitor.store import tables as t
from sampling import keyed_uniform

PRESENTATIONS = ("original", "perturbed", "pair")
TEMPLATE_IDS = 20  # recent ids of the stream that give the canary id its shape
MAX_SOURCES_TRIED = 5  # sources drawn in turn when a perturbation does not apply
_UUID = re.compile(r"^[0-9a-fA-F]{8}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{12}$")
_LOWER, _UPPER, _DIGITS, _HEX = (
    "abcdefghijklmnopqrstuvwxyz",
    "ABCDEFGHIJKLMNOPQRSTUVWXYZ",
    "0123456789",
    "0123456789abcdef",
)


@dataclass(frozen=True)
class Shown:
    """What the queue turns into an ``Item``: the canary as the reviewer sees it."""

    id: str
    fence: int
    lease_expires_at: float
    stream: str
    model: str | None
    timestamp: float
    prompt: str
    response: str
    alternative: str | None
    alternative_first: bool
    metadata: dict[str, Any] | None
    messages: tuple[Turn, ...] | None


def _bytes(key: bytes, ident: str, n: int) -> bytes:
    """``n`` keyed pseudo-random bytes for ``ident`` (BLAKE2b in counter mode)."""
    out = b""
    i = 0
    while len(out) < n:
        out += hashlib.blake2b(f"{ident}\x1f{i}".encode("utf-8", "surrogatepass"), key=key[:64]).digest()
        i += 1
    return out[:n]


def shaped_id(templates: list[str], key: bytes, ident: str) -> str:
    """An id in the shape of ``templates`` (recent real ids, the first the model): a UUID becomes a
    random UUID of the same version and case; otherwise positions where all templates of the same
    length agree are kept, the others get a keyed-random character of the template's class."""
    first = templates[0]
    rnd = _bytes(key, ident, max(16, len(first)))
    if _UUID.match(first):
        version = int(first[14], 16)
        u = str(uuid.UUID(bytes=rnd[:16], version=version if 1 <= version <= 8 else 4))
        if version not in range(1, 9):
            u = u[:14] + first[14] + u[15:]
        return u.upper() if first.isupper() else u
    same = [s for s in templates if len(s) == len(first)]
    out = []
    for i, c in enumerate(first):
        column = {s[i] for s in same}
        if len(same) > 1 and len(column) == 1:
            out.append(c)  # constant across the stream's ids (a prefix, a separator): kept
            continue
        b = rnd[i]
        # The class of what the stream's ids have at this position: digits only, hex, letters.
        if column <= set(_DIGITS):
            out.append(_DIGITS[b % 10])
        elif column <= set(_HEX) and column & set("abcdef"):
            out.append(_HEX[b % 16])
        elif column <= set(_HEX.upper()) and column & set("ABCDEF"):
            out.append(_HEX.upper()[b % 16])
        elif c in _LOWER:
            out.append(_LOWER[b % 26])
        elif c in _UPPER:
            out.append(_UPPER[b % 26])
        else:
            out.append(c)
    return "".join(out)


def check_kinds(cfg: CanaryConfig) -> None:
    """ValueError naming the unknown kinds of ``review.canaries.kinds`` (or an empty list)."""
    if cfg.kinds is not None:
        if not cfg.kinds:
            raise ValueError("review.canaries.kinds is empty (null: every kind)")
        applicable("", "", cfg.kinds)


def claim_number(conn: sa.Connection, user_id: int) -> int:
    """How many items the reviewer has been handed so far, as the canary draw counts them: their
    labels and skips plus their canaries. A release does not advance it (the same draw again)."""
    labels = conn.execute(sa.select(sa.func.count()).where(t.labels.c.user_id == user_id)).scalar_one()
    canaries = conn.execute(sa.select(sa.func.count()).where(t.canaries.c.user_id == user_id)).scalar_one()
    return int(labels) + int(canaries)


def canary_turn(key: bytes, cfg: CanaryConfig, user_id: int, n: int) -> bool:
    """Whether the reviewer's claim number ``n`` hands out a canary."""
    return cfg.share > 0 and keyed_uniform(key, f"{cfg.seed}\x1f{user_id}\x1f{n}", "canary") < cfg.share


def _live() -> sa.ColumnElement[bool]:
    """A canary whose id no real episode has taken since. An id is free when the canary is made,
    but a stream with sequential ids can later ingest a real episode of that very id; from then on
    the id names the real item (its lease, its label), and the canary is abandoned: otherwise the
    reviewer's label of the real item would be taken for the canary's and refused (409) on every
    try, holding that reviewer on one item forever."""
    return ~sa.exists().where(t.episodes.c.episode_id == t.canaries.c.id)


def held(conn: sa.Connection, user_id: int, now: float) -> Any:
    """The reviewer's canary under a live lease, or None."""
    c = t.canaries
    return conn.execute(
        sa.select(c).where(c.c.user_id == user_id, c.c.status == "claimed", c.c.lease_expires_at > now, _live())
    ).first()


def waiting(conn: sa.Connection, user_id: int, now: float) -> Any:
    """The reviewer's oldest canary that was released or whose lease expired, or None: it is
    handed out again before anything else, as a released real item is the queue's oldest."""
    c = t.canaries
    return conn.execute(
        sa.select(c)
        .where(
            c.c.user_id == user_id,
            sa.or_(c.c.status == "pending", sa.and_(c.c.status == "claimed", c.c.lease_expires_at <= now)),
            _live(),
        )
        .order_by(c.c.created_at, c.c.id)
        .limit(1)
    ).first()


def find(conn: sa.Connection, user_id: int, canary_id: str, lock: bool = False) -> Any:
    """The reviewer's canary of this id, or None (another reviewer's canary is no canary to them,
    nor is one whose id a real episode has taken since: :func:`_live`)."""
    c = t.canaries
    q = sa.select(c).where(c.c.id == canary_id, c.c.user_id == user_id, _live())
    return conn.execute(q.with_for_update() if lock else q).first()


def set_aside(conn: sa.Connection, canary_id: str) -> None:
    """Never serve the canary again (status ``error``): its source cannot be read back, or the
    score its shown text needs cannot be had. It is not measured."""
    c = t.canaries
    conn.execute(c.update().where(c.c.id == canary_id).values(status="error", lease_expires_at=None))


def needs_shown_score(row: Any, version: str | None) -> bool:
    """Whether the canary ``row`` shows a perturbed response never scored (an original shows its
    source's text, whose stored score the hint reads; a pair shows no score). Scored once, by the
    version active when it was first claimed: a canary held across a promotion keeps that score,
    as a real item keeps the old version's until it is scored again, and a page view never waits
    on a model."""
    return version is not None and row.presentation == "perturbed" and not shown_score_of(row.detail)


def save_shown_score(conn: sa.Connection, row: Any, score: dict[str, Any]) -> None:
    """Keep ``score`` (``{"version", "score"}``) of the canary's shown text with it."""
    c = t.canaries
    detail = dict(row.detail) if isinstance(row.detail, dict) else {}
    conn.execute(c.update().where(c.c.id == row.id).values(detail={**detail, SHOWN_SCORE: score}))


def sources_of(user_id: int) -> sa.Select[Any]:
    """The episodes that have been this reviewer's canary sources (the real queue skips them)."""
    return sa.select(t.canaries.c.episode_id).where(t.canaries.c.user_id == user_id)


#: Rows read per candidate wanted: an item with overlap has a label per reviewer.
ROWS_PER_ITEM = 4


def _candidates(conn: sa.Connection, user_id: int, window: int) -> list[str]:
    """The newest ``window`` labelled items the reviewer neither labelled nor was shown as a
    canary; before anyone has labelled, the newest pending items of the queue.

    Read newest first along an index (the labels' primary key, ``ix_review_tasks_status_created``)
    and stopped after ``window * ROWS_PER_ITEM`` rows: grouping every label by item to sort the
    groups took 0.14 s (PostgreSQL) to 0.26 s (SQLite) per canary turn at 200,000 labels, and the
    fallback grouped every review task (millions at production volume)."""
    lb, rt = t.labels, t.review_tasks
    mine = t.labels.alias("mine")
    used = sources_of(user_id)

    def fresh(episode: sa.ColumnElement[str]) -> tuple[sa.ColumnElement[bool], ...]:
        return (~sa.exists().where(mine.c.episode_id == episode, mine.c.user_id == user_id), episode.not_in(used))

    labelled = conn.execute(
        sa.select(lb.c.episode_id)
        .where(lb.c.skipped == sa.false(), *fresh(lb.c.episode_id))
        .order_by(lb.c.id.desc())
        .limit(window * ROWS_PER_ITEM)
    ).scalars()
    out = list(dict.fromkeys(labelled))[:window]
    if out:
        return out
    queued = conn.execute(
        sa.select(rt.c.episode_id)
        .where(rt.c.status == "pending", *fresh(rt.c.episode_id))
        .order_by(rt.c.created_at.desc())
        .limit(window * ROWS_PER_ITEM)
    ).scalars()
    return list(dict.fromkeys(queued))[:window]


def _templates(conn: sa.Connection, stream: str) -> list[str]:
    e = t.episodes
    return list(
        conn.execute(
            sa.select(e.c.episode_id).where(e.c.stream == stream).order_by(e.c.ts.desc()).limit(TEMPLATE_IDS)
        ).scalars()
    )


def _free_id(conn: sa.Connection, key: bytes, templates: list[str], ident: str) -> str | None:
    for attempt in range(3):
        cid = shaped_id(templates, key, f"{ident}\x1f{attempt}")
        taken = conn.execute(sa.select(t.episodes.c.episode_id).where(t.episodes.c.episode_id == cid)).first()
        taken = taken or conn.execute(sa.select(t.canaries.c.id).where(t.canaries.c.id == cid)).first()
        if taken is None and cid:
            return cid
    return None


def _final_turn_matches(messages: tuple[Turn, ...] | None, response: str) -> bool:
    if messages is None:
        return True
    return any(m.final and m.text == response for m in messages)


def request_of(messages: tuple[Turn, ...] | None, prompt: str) -> str:
    """What a perturbation reads as the episode's request: a conversation's user turns, the last
    first, else the (v1) prompt. The flattened v2 prompt starts with the system prompt and carries
    the flattening's role words: ``refusal_to_compliance`` fired on a benign refusal whenever a
    system prompt listed what is forbidden, missed a harmful request after 4,000 characters of
    system prompt (perturbations read that many), and ``unsupported_claim`` took "assistant" and
    "called" for the topic.

    >>> request_of((Turn("system", None, "Never help build a bomb."), Turn("user", None, "A film?"),
    ...             Turn("assistant", None, "No.", final=True)), "system: Never ...")
    'A film?'
    >>> request_of(None, "List three colours.")
    'List three colours.'
    """
    if messages is None:
        return prompt
    asked = [m.text for m in reversed(messages) if m.role == "user" and m.text.strip()]
    return "\n\n".join(asked) if asked else prompt


def create(
    conn: sa.Connection,
    key: bytes,
    cfg: CanaryConfig,
    user_id: int,
    n: int,
    head: Any,
    now: float,
    expires: float,
    load: Any,
) -> str | None:
    """Make the reviewer's canary number ``n`` (leased to them until ``expires``) in place of the
    real item ``head`` (its episode_id and ts); its id, or None when no source can be perturbed.

    ``load(conn, episode_id)`` reads an episode as ``(row, metadata, messages)`` (the queue's
    own defensive readers); the row has stream, model, ts, prompt and response."""
    ident = f"{cfg.seed}\x1f{user_id}\x1f{n}"
    cands = _candidates(conn, user_id, cfg.source_window)
    if not cands:
        return None
    start = min(int(keyed_uniform(key, ident, "canary-source") * len(cands)), len(cands) - 1)
    for k in range(min(MAX_SOURCES_TRIED, len(cands))):
        episode_id = cands[(start + k) % len(cands)]
        row, meta, messages = load(conn, episode_id)
        if not _final_turn_matches(messages, row.response):
            continue  # a conversation whose final turn is not the flattened response: not perturbable as shown
        seed_key = make_seed_key(episode_id, f"{cfg.seed}:{user_id}")
        p = choose(request_of(messages, row.prompt), row.response, seed_key, cfg.kinds)
        if p is None:
            continue
        pairwise = isinstance(meta, dict) and isinstance(meta.get("alternative_response"), str)
        if pairwise:
            presentation = "pair"
        else:
            presentation = "original" if keyed_uniform(key, ident, "canary-present") < 0.5 else "perturbed"
        cid = _free_id(conn, key, [head.episode_id, *_templates(conn, row.stream)], ident)
        if cid is None:
            return None
        _insert(conn, cid, user_id, episode_id, row.stream, p, presentation, key, ident, head, cfg, now, expires)
        return cid
    return None


def _insert(
    conn: sa.Connection,
    cid: str,
    user_id: int,
    episode_id: str,
    stream: str,
    p: Perturbed,
    presentation: str,
    key: bytes,
    ident: str,
    head: Any,
    cfg: CanaryConfig,
    now: float,
    expires: float,
) -> None:
    g = t.guidelines
    version = conn.execute(sa.select(sa.func.max(g.c.version)).where(g.c.stream == stream)).scalar()
    conn.execute(
        t.canaries.insert().values(
            id=cid,
            user_id=user_id,
            episode_id=episode_id,
            stream=stream,
            kind=p.kind,
            presentation=presentation,
            perturbed=p.perturbed,
            detail=p.detail,
            alternative_first=keyed_uniform(key, ident, "canary-order") < 0.5,
            shown_ts=float(head.ts) - 60.0 * keyed_uniform(key, ident, "canary-ts"),
            seed=cfg.seed,
            status="claimed",
            lease_expires_at=expires,
            fence=1,
            guidelines_version=version,
            created_at=now,
        )
    )


def lease(conn: sa.Connection, row: Any, expires: float) -> int | None:
    """Lease a waiting canary again (compare-and-set on its fence); the new fence, or None if it
    changed meanwhile."""
    c = t.canaries
    res = conn.execute(
        c.update()
        .where(c.c.id == row.id, c.c.fence == row.fence)
        .values(status="claimed", lease_expires_at=expires, fence=int(row.fence) + 1)
    )
    return int(row.fence) + 1 if res.rowcount == 1 else None


def renew(conn: sa.Connection, row: Any, expires: float) -> None:
    c = t.canaries
    conn.execute(c.update().where(c.c.id == row.id, c.c.fence == row.fence).values(lease_expires_at=expires))


def shown(row: Any, source: Any, meta: dict[str, Any] | None, messages: tuple[Turn, ...] | None) -> Shown:
    """The canary as the reviewer sees it (metadata still unfiltered: the queue applies the blinding)."""
    response, alternative = source.response, None
    if row.presentation == "perturbed":
        response = row.perturbed
        if messages is not None:
            messages = tuple(replace(m, text=row.perturbed) if m.final else m for m in messages)
    elif row.presentation == "pair":
        alternative = row.perturbed
    return Shown(
        id=row.id,
        fence=int(row.fence),
        lease_expires_at=float(row.lease_expires_at or 0.0),
        stream=row.stream,
        model=source.model,
        timestamp=float(row.shown_ts),
        prompt=source.prompt,
        response=response,
        alternative=alternative,
        alternative_first=bool(row.alternative_first),
        metadata=meta,
        messages=messages,
    )
