"""/api/v1/queue/claim, /items/label, /items/skip, /items/release, /queue: the reviewer's work.

A claim hands out a lease with a fencing token; label, skip and release name that lease and
are refused (409) once it is no longer the current one.
"""

from __future__ import annotations

from fastapi import APIRouter, Response
from fastapi.responses import JSONResponse

from monitor.review import queue
from monitor.review.context import Ctx
from monitor.review.deps import Who
from monitor.review.schemas import (
    LEASED,
    SIGNED_IN,
    ItemOut,
    LabelBody,
    OkOut,
    QueueDepthOut,
    ReleaseBody,
    SkipBody,
    refusal,
)

router = APIRouter(tags=["review"], responses=SIGNED_IN)
CLAIM_FAILED = "the claimed item could not be shown and was set aside; claim again"


@router.post(
    "/queue/claim",
    response_model=ItemOut,
    responses={204: {"description": "the queue is empty"}, 500: refusal(CLAIM_FAILED)},
)
def claim(p: Who, ctx: Ctx) -> Response:
    """The caller's current lease, or a new one on the oldest waiting item."""
    item = ctx.claim(p.user)
    if item is None:
        return Response(status_code=204)

    # Rendered here, inside show(): a failure sets the item aside instead of leaving the
    # lease behind (every later claim would return the same held lease and fail again).
    def build() -> Response:
        out = ItemOut.model_validate({**item.to_json(), "hints": ctx.hints_for(p.user, item)})
        return JSONResponse(out.model_dump(mode="json"))

    return ctx.show(p.user, item, build, claim_failed)


def claim_failed() -> Response:
    return JSONResponse({"detail": CLAIM_FAILED}, status_code=500)


@router.post("/items/label", responses=LEASED)
def label(body: LabelBody, p: Who, ctx: Ctx) -> OkOut:
    lab = queue.LabelIn(
        rating=body.rating,
        flags=tuple(body.flags),
        critique=body.critique,
        preference=body.preference,
        time_spent_ms=body.time_spent_ms,
    )
    ctx.submit(p.user, body.episode_id, body.slot, body.fence, lab, "labelled")
    return OkOut(ok=True)


@router.post("/items/skip", responses=LEASED)
def skip(body: SkipBody, p: Who, ctx: Ctx) -> OkOut:
    """Hands the item back for someone else; a skip needs a reason and counts as seen."""
    lab = queue.LabelIn(skipped=True, skip_reason=body.reason, time_spent_ms=body.time_spent_ms)
    ctx.submit(p.user, body.episode_id, body.slot, body.fence, lab, "skipped")
    return OkOut(ok=True)


@router.post("/items/release", responses=LEASED)
def release(body: ReleaseBody, p: Who, ctx: Ctx) -> OkOut:
    queue.release(ctx.store, p.user, body.episode_id, body.slot, body.fence, now=ctx.now())
    return OkOut(ok=True)


@router.get("/queue")
def queue_state(_p: Who, ctx: Ctx) -> list[QueueDepthOut]:
    """Counts per stream only: what is waiting, leased, done and set aside."""
    return [QueueDepthOut.model_validate(row) for row in queue.queue_depth(ctx.store, ctx.now())]
