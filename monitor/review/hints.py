"""Assistance hints on the review page and in the API (``review.assist``).

An assistant sees the item as its reviewer does (:func:`view_of`: the blinded item, never the
stored row). The page shows the hints in one panel; a span hint is shown as a quote of its
field around the span, with the span marked. Every part is text that the template escapes (no
HTML from a model or an assistant reaches the page).
"""

from __future__ import annotations

from dataclasses import dataclass

from monitor.assist import EpisodeView, Hint
from monitor.review.queue import Item

SPAN_CONTEXT = 60  # characters of the field shown either side of a span
MAX_SPAN = 300


def view_of(item: Item) -> EpisodeView:
    """The episode as the item shows it (the stream's blinding already applied)."""
    ts = item.timestamp if item.timestamp == item.timestamp else None  # NaN: unknown
    return EpisodeView(
        episode_id=item.claim.episode_id,
        stream=item.stream,
        prompt=item.prompt,
        response=item.response,
        alternative=item.alternative,
        timestamp=ts,
    )


@dataclass(frozen=True)
class Shown:
    """A hint as the page shows it: the hint, and for a span its quote (before, span, after)."""

    hint: Hint
    quote: tuple[str, str, str] | None = None
    where: str = ""


def quote_of(hint: Hint, item: Item) -> tuple[str, str, str] | None:
    """(before, span, after) of a span hint in its field, each bounded; None when the span is
    not a valid range of a field the item shows."""
    if hint.kind != "span" or hint.field is None or hint.start is None or hint.end is None:
        return None
    text = {"prompt": item.prompt, "response": item.response, "alternative": item.alternative}[hint.field]
    if text is None or not (0 <= hint.start < hint.end <= len(text)):
        return None
    start, end = hint.start, min(hint.end, hint.start + MAX_SPAN)
    before = text[max(0, start - SPAN_CONTEXT) : start]
    after = text[end : end + SPAN_CONTEXT]
    return (
        ("…" if start > SPAN_CONTEXT else "") + before,
        text[start:end] + ("…" if end < hint.end else ""),
        after + ("…" if end + SPAN_CONTEXT < len(text) else ""),
    )


def where_of(hint: Hint, item: Item) -> str:
    """The field of a span as the page names it (a pair's responses are lettered in shown order)."""
    if hint.field == "prompt":
        return "Prompt"
    if item.alternative is None:
        return "Response"
    first = "alternative" if item.alternative_first else "response"
    return "Response A" if hint.field == first else "Response B"


def shown(hints: list[Hint], item: Item) -> list[Shown]:
    out = []
    for h in hints:
        quote = quote_of(h, item)
        out.append(Shown(h, quote, where_of(h, item) if quote is not None else ""))
    return out
