"""/api/v1/admin/adjudications: disagreeing labels of items with overlap, and their adjudication.

``GET /pending`` lists the items whose reviewers disagree (``review.adjudication``) and that no
administrator has settled; ``POST /`` records a final label with a note; ``GET /`` is the audit
trail. Estimates and reward-model training use a final label in place of the disagreeing ones
(:mod:`monitor.quality.adjudication`).
"""

from __future__ import annotations

from dataclasses import asdict

from fastapi import APIRouter, HTTPException, Query
from fastapi.exceptions import RequestValidationError

from monitor.quality.adjudication import disagreements
from monitor.review import adjudication
from monitor.review.context import Ctx
from monitor.review.deps import Admin
from monitor.review.schemas import (
    ADMIN_ONLY,
    BODY,
    AdjudicationIn,
    AdjudicationOut,
    DisagreementOut,
    refusal,
)

router = APIRouter(prefix="/admin/adjudications", tags=["admin"], responses=ADMIN_ONLY)
STREAM = Query(None, max_length=128, description="one stream (default: all)")
LIMIT = Query(100, ge=1, le=1000)


@router.get("/pending", response_model=list[DisagreementOut])
def pending(
    _p: Admin,
    ctx: Ctx,
    stream: str | None = STREAM,
    limit: int = LIMIT,
    include_adjudicated: bool = Query(False, description="also the items already adjudicated"),
) -> list[DisagreementOut]:
    """Items whose reviewers disagree, the longest waiting first, with every reviewer's label."""
    found = disagreements(ctx.store, ctx.disagreement_rule, stream, include_adjudicated, limit)
    return [DisagreementOut.model_validate(asdict(d)) for d in found]


@router.get("", response_model=list[AdjudicationOut])
def listed(
    _p: Admin,
    ctx: Ctx,
    stream: str | None = STREAM,
    episode_id: str | None = Query(None, max_length=128, description="one item's adjudications"),
    limit: int = LIMIT,
) -> list[AdjudicationOut]:
    """Adjudications, newest first (``current`` false for a superseded one)."""
    return [out(a) for a in adjudication.history(ctx.store, stream, episode_id, limit)]


@router.post(
    "",
    status_code=201,
    responses={
        **BODY,
        404: refusal("no such episode"),
        409: refusal("fewer than two labels, or the administrator labelled the item"),
    },
)
def create(body: AdjudicationIn, p: Admin, ctx: Ctx) -> AdjudicationOut:
    """Settle an item with a final label; it replaces the item's labels in estimates and training."""
    verdict = adjudication.Verdict(body.rating, tuple(body.flags), body.preference, body.note)
    try:
        return out(ctx.adjudicate(p.user, body.episode_id, verdict))
    except adjudication.AdjudicationError as e:
        if e.status != 422:
            raise HTTPException(e.status, str(e)) from None
        # The same shape as the request's own validation errors, as the OpenAPI document says.
        loc = ("body", e.field) if e.field else ("body",)
        raise RequestValidationError([{"type": "value_error", "loc": loc, "msg": str(e)}]) from None


def out(a: adjudication.Adjudication) -> AdjudicationOut:
    return AdjudicationOut.model_validate(asdict(a))
