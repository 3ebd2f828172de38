"""Label exports: reward-model training pairs and ratings (JSONL), ratings (CSV).

Exports carry model outputs, i.e. attacker-controlled text: they are served as
attachments, JSON is ASCII-escaped, and CSV cells that a spreadsheet would read
as a formula (starting with = + - @, tab or carriage return, also after Unicode compatibility
folding and leading spaces) are neutralised; control and invisible characters in CSV cells are
written as escapes.
"""

from __future__ import annotations

import csv
import io
import json
import re
import statistics
import unicodedata
from collections import defaultdict
from collections.abc import Iterable, Iterator
from typing import Any

import sqlalchemy as sa

from monitor.quality.adjudication import finals
from monitor.review.queue import alternative_of, metadata_text, parse_metadata
from monitor.store import Store
from monitor.store import tables as t

FORMULA_START = ("=", "+", "-", "@", "\t", "\r")
LEADING_SPACE = re.compile(r"\s+")


#: Rows fetched from the database at once while an export streams.
FETCH_ROWS = 500


def _rows(store: Store, *, by_prompt: bool = False) -> Iterator[Any]:
    """Every label with its episode and reviewer, in label order (``by_prompt``: grouped by prompt),
    fetched ``FETCH_ROWS`` at a time: an export streams, it never holds every label and its texts
    (at 200,000 labels with their prompts and responses, several hundred megabytes per export)."""
    lb, e, s, u = t.labels, t.episodes, t.samples, t.users
    q = (
        sa.select(
            lb.c.episode_id,
            lb.c.stream,
            lb.c.rating,
            lb.c.flags,
            lb.c.critique,
            lb.c.preference,
            lb.c.rated,
            lb.c.skipped,
            lb.c.skip_reason,
            lb.c.time_spent_ms,
            lb.c.created_at,
            u.c.name.label("reviewer"),
            e.c.prompt,
            e.c.response,
            e.c.model,
            metadata_text().label("metadata"),  # parsed by parse_metadata: a bad row cannot fail the export
            e.c.ts,
            s.c.inclusion_probability,
        )
        .join(e, e.c.episode_id == lb.c.episode_id)
        .join(u, u.c.id == lb.c.user_id)
        .join(s, sa.and_(s.c.episode_id == lb.c.episode_id, s.c.channel == "human"), isouter=True)
        .order_by(*((e.c.prompt, lb.c.id) if by_prompt else (lb.c.id,)))
    )
    with store.engine.connect() as conn:
        # A server-side cursor on PostgreSQL; SQLite's cursor reads as it goes anyway.
        yield from conn.execution_options(stream_results=True, yield_per=FETCH_ROWS).execute(q)


def iter_ratings(store: Store) -> Iterator[dict[str, Any]]:
    """One record per label (the reviewers' own, for analysis), streamed; an adjudicated
    episode's records also carry its final label (``adjudicated``, ``final_rating``,
    ``final_flags``, ``final_preference``; null when it has none), which training should use
    instead."""
    final = finals(store)
    for r in _rows(store):
        f = final.get(r.episode_id)
        yield {
            "episode_id": r.episode_id,
            "stream": r.stream,
            "model": r.model,
            "timestamp": r.ts,
            "reviewer": r.reviewer,
            "skipped": bool(r.skipped),
            "skip_reason": r.skip_reason,
            "rating": r.rating,
            "flags": list(r.flags or []),
            "critique": r.critique,
            "preference": r.preference,
            "rated": r.rated,  # final_turn or conversation; None for a v1 episode or a skip
            "time_spent_ms": r.time_spent_ms,
            "labelled_at": r.created_at,
            "inclusion_probability": r.inclusion_probability,
            "prompt": r.prompt,
            "response": r.response,
            "adjudicated": f is not None,
            "final_rating": None if f is None else f.rating,
            "final_flags": None if f is None else sorted(f.flags),
            "final_preference": None if f is None else f.preference,
        }


def iter_pairs(store: Store) -> Iterator[dict[str, str]]:
    """``{"prompt", "chosen", "rejected"}`` pairs, streamed one prompt at a time: from pairwise
    preferences, and from ratings of different responses to the same prompt (mean rating per
    response; ties give no pair). An adjudicated episode counts once, with its final label, in
    place of its reviewers' labels."""
    final = finals(store)
    done: set[str] = set()
    prompt: str | None = None
    responses: dict[str, list[int]] = defaultdict(list)
    for r in _rows(store, by_prompt=True):
        if r.prompt != prompt:
            yield from _rating_pairs(prompt, responses)
            prompt, responses = r.prompt, defaultdict(list)
        if r.skipped or r.episode_id in done:
            continue
        f = final.get(r.episode_id)
        if f is not None:
            done.add(r.episode_id)
        preference = r.preference if f is None else f.preference
        rating = r.rating if f is None else f.rating
        alt = alternative_of(parse_metadata(r.metadata, r.episode_id))
        if alt is not None and preference in ("response", "alternative"):
            chosen, rejected = (r.response, alt) if preference == "response" else (alt, r.response)
            yield {"prompt": r.prompt, "chosen": chosen, "rejected": rejected}
        if rating is not None:
            responses[r.response].append(int(rating))
    yield from _rating_pairs(prompt, responses)


def _rating_pairs(prompt: str | None, responses: dict[str, list[int]]) -> Iterator[dict[str, str]]:
    """The pairs of one prompt's rated responses: each over every response with a lower mean."""
    if prompt is None:
        return
    means = sorted(((statistics.fmean(v), resp) for resp, v in responses.items()), reverse=True)
    for i, (mi, ri) in enumerate(means):
        for mj, rj in means[i + 1 :]:
            if mi > mj:
                yield {"prompt": prompt, "chosen": ri, "rejected": rj}


def jsonl(records: Iterable[dict[str, Any]]) -> Iterator[str]:
    for rec in records:
        yield json.dumps(rec, ensure_ascii=True, sort_keys=True) + "\n"


def _visible(c: str) -> str:
    cat = unicodedata.category(c)
    if c in "\t\n" or cat not in ("Cc", "Cf", "Zl", "Zp"):
        return c
    return f"\\u{ord(c):04x}"


def neutralize(value: Any) -> str:
    r"""A CSV cell no spreadsheet runs and no terminal obeys.

    * A cell that starts like a formula gets a leading quote, also where it does so after Unicode
      compatibility folding or any amount of leading whitespace (a full-width equals sign is an = to some spreadsheets).
    * Line ends are LF. Control characters other than tab and LF (ESC, BEL, a lone CR: ``cat
      ratings.csv`` ran the OSC 52 clipboard write a model's answer held, or hid rows), and
      invisible or direction-changing ones (U+202E turned a model name around), are written as
      ``\uXXXX``.

    >>> neutralize(" " * 40 + "=1+1")[0], neutralize("\n\xa0" * 20 + "@SUM(A1)")[0], neutralize("  a=1")[0]
    ("'", "'", ' ')
    >>> neutralize("\uff1d1+1")[0], neutralize("a\x1b]52;c;QQ==\x07b"), neutralize("one\r\ntwo\rthree")
    ("'", 'a\\u001b]52;c;QQ==\\u0007b', 'one\ntwo\\u000dthree')
    """
    text = "" if value is None else str(value)
    # After all the leading whitespace, however much: a spreadsheet that trims cells on import
    # (LibreOffice's "Trim spaces") reads a formula after 16 spaces, newlines or NBSPs as well.
    lead = LEADING_SPACE.match(text)
    skip = lead.end() if lead is not None else 0
    start = unicodedata.normalize("NFKC", text[skip : skip + 16]).lstrip()
    quote = text.startswith(FORMULA_START) or start.startswith(FORMULA_START)
    text = text.replace("\r\n", "\n")
    if not text.replace("\n", "").replace("\t", "").isprintable():
        text = "".join(c if c.isprintable() else _visible(c) for c in text)
    return "'" + text if quote else text


CSV_FIELDS = [
    "episode_id",
    "stream",
    "model",
    "timestamp",
    "reviewer",
    "skipped",
    "skip_reason",
    "rating",
    "flags",
    "critique",
    "preference",
    "rated",
    "time_spent_ms",
    "labelled_at",
    "inclusion_probability",
    "prompt",
    "response",
    "adjudicated",
    "final_rating",
    "final_flags",
    "final_preference",
]


LIST_FIELDS = ("flags", "final_flags")


def csv_rows(records: Iterable[dict[str, Any]]) -> Iterator[str]:
    buf = io.StringIO()
    w = csv.writer(buf, quoting=csv.QUOTE_ALL)
    w.writerow(CSV_FIELDS)
    yield buf.getvalue()
    for rec in records:
        buf.seek(0)
        buf.truncate()
        w.writerow(
            [neutralize(";".join(rec[k]) if k in LIST_FIELDS and rec[k] is not None else rec[k]) for k in CSV_FIELDS]
        )
        yield buf.getvalue()
