"""/admin/adjudication: items whose reviewers disagree, one shown with its labels and a form for
the final label (administrators only; the form carries the session's CSRF token).

The item is shown as its stream's reviewers see it (the same blinding, the same keyed order of
a pair); the reviewers' labels are shown as "Reviewer A, B..." without names, so the verdict
is about the labels, not about who gave them (the API's audit trail has the names).
"""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import APIRouter, Form, Query
from fastapi.responses import HTMLResponse, Response

from monitor.quality.adjudication import Disagreement, disagreements
from monitor.review import adjudication
from monitor.review import queue as q
from monitor.review.auth import Session
from monitor.review.context import Ctx, ReviewContext
from monitor.review.pages import AdminSession, FormSession, PageRefused, error_page, redirect, render
from monitor.review.routes.pages_review import RATING_ANCHORS, pair_of

router = APIRouter(include_in_schema=False)

MAX_LISTED = 200
DONE_NOTICE = "Adjudicated: the final label now counts in estimates and training instead of the reviewers' labels."


def adjudication_page(
    ctx: ReviewContext, session: Session, episode: str = "", status: int = 200, **messages: Any
) -> HTMLResponse:
    """The waiting list, and ``episode`` (default: the longest waiting) with its labels and the form."""
    rule = ctx.settings.review.adjudication
    waiting = disagreements(ctx.store, ctx.disagreement_rule, limit=MAX_LISTED)
    chosen = pick(ctx, episode, waiting)
    item = q.episode_item(ctx.store, chosen.episode_id, ctx.key, ctx.settings.review.blinding) if chosen else None
    return render(
        "adjudication.html",
        status,
        session,
        waiting=waiting,
        max_listed=MAX_LISTED,
        rating_gap=rule.rating_gap,
        chosen=chosen,
        # One cannot settle one's own disagreement (monitor.review.adjudication refuses it).
        own=chosen is not None and any(x.user_id == session.user.id for x in chosen.labels),
        item=item,
        pair=pair_of(item),
        letters="ABCDEFGH",
        flags=list(ctx.settings.review.flags),
        anchors=RATING_ANCHORS,
        max_note=adjudication.MAX_NOTE,
        history=adjudication.history(ctx.store, episode_id=chosen.episode_id, limit=20) if chosen else [],
        error=messages.get("error"),
        notice=messages.get("notice"),
        form=messages.get("form") or {},
    )


def pick(ctx: ReviewContext, episode: str, waiting: list[Disagreement]) -> Disagreement | None:
    """The item the page shows: the one named (adjudicated already or not), else the first waiting."""
    if not episode:
        return waiting[0] if waiting else None
    for d in waiting:
        if d.episode_id == episode:
            return d
    # Not in the waiting list: already adjudicated (shown again to revise it), or beyond the list.
    found = disagreements(ctx.store, ctx.disagreement_rule, include_adjudicated=True, episode_id=episode)
    return found[0] if found else None


@router.get("/admin/adjudication", response_class=HTMLResponse)
def get_adjudication(
    ctx: Ctx,
    session: AdminSession,
    episode: Annotated[str, Query(max_length=128)] = "",
    done: Annotated[int, Query(ge=0, le=1)] = 0,
) -> Response:
    return adjudication_page(ctx, session, episode, notice=DONE_NOTICE if done else None)


@router.post("/admin/adjudication")
def post_adjudication(
    ctx: Ctx,
    session: FormSession,
    episode_id: Annotated[str, Form(max_length=128)] = "",
    rating: Annotated[str, Form(max_length=8)] = "",
    flags: Annotated[list[str], Form()] = [],  # noqa: B006 - FastAPI copies defaults
    preference: Annotated[str, Form(max_length=16)] = "",
    note: Annotated[str, Form()] = "",
) -> Response:
    """Record the final label; a refused one shows the page again with the input kept."""
    if not session.user.is_admin:
        raise PageRefused(403, session, "Forbidden", "This page is for administrators.")
    form = {"rating": rating, "flags": flags, "preference": preference, "note": note}
    try:
        r = int(rating)
    except ValueError:
        return adjudication_page(ctx, session, episode_id, 422, error="Choose a rating from 1 to 7.", form=form)
    verdict = adjudication.Verdict(r, tuple(flags), preference or None, note.replace("\r\n", "\n"))
    try:
        ctx.adjudicate(session.user, episode_id, verdict)
    except adjudication.AdjudicationError as e:
        if e.status == 404:
            return error_page(404, session, "No such item", str(e))
        return adjudication_page(ctx, session, episode_id, e.status, error=str(e), form=form)
    return redirect("/admin/adjudication?done=1")
