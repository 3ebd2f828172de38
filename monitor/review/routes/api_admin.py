"""/api/v1/admin/*: the summary, estimates over all traffic and their chart, users and tokens."""

from __future__ import annotations

from fastapi import APIRouter, HTTPException, Query, Response
from fastapi.exceptions import RequestValidationError

from monitor.quality import estimates as quality_estimates
from monitor.quality import labels as quality_labels
from monitor.review import auth, queue, stats
from monitor.review.chart import estimates_svg
from monitor.review.context import Ctx
from monitor.review.deps import Admin
from monitor.review.schemas import (
    ADMIN_ONLY,
    BODY,
    CreatedUserOut,
    SeriesPointOut,
    SummaryOut,
    TokenIn,
    TokenOut,
    UserIn,
    UserOut,
    refusal,
)

router = APIRouter(prefix="/admin", tags=["admin"], responses=ADMIN_ONLY)
BUCKET_S = Query(3600, ge=60, le=86400 * 31, description="bucket width in seconds (1 minute to 31 days)")


@router.get("/summary")
def summary(_p: Admin, ctx: Ctx) -> SummaryOut:
    """Queue, throughput, agreement, drift events, action requests and estimates: the dashboard's data."""
    return SummaryOut.model_validate(stats.admin_summary(ctx.store, ctx.settings, ctx.now()))


@router.get("/estimates/series")
def series(_p: Admin, ctx: Ctx, stream: str = Query(max_length=128), bucket_s: int = BUCKET_S) -> list[SeriesPointOut]:
    """The estimated mean rating of one stream per time bucket, with its 95% interval."""
    rows = quality_estimates.estimate_series(ctx.store, stream, bucket_s)
    return [SeriesPointOut.model_validate(r) for r in rows]


@router.get(
    "/estimates/chart.svg",
    response_class=Response,
    responses={200: {"content": {"image/svg+xml": {"schema": {"type": "string"}}}, "description": "an SVG chart"}},
)
def chart(_p: Admin, ctx: Ctx, bucket_s: int = BUCKET_S) -> Response:
    """Every stream's series as one SVG line chart (the admin page shows the same)."""
    streams = sorted({q["stream"] for q in queue.queue_depth(ctx.store, ctx.now())})
    rows = quality_labels.label_rows(ctx.store)
    svg = estimates_svg({s: quality_estimates.estimate_series(ctx.store, s, bucket_s, rows) for s in streams})
    return Response(svg, media_type="image/svg+xml")


@router.get("/users")
def users(_p: Admin, ctx: Ctx) -> list[UserOut]:
    return [UserOut(name=u.name, role=u.role) for u in auth.list_users(ctx.store)]


@router.post(
    "/users",
    status_code=201,
    response_model_exclude_none=True,
    responses={**BODY, 409: refusal("a user of that name exists")},
)
def add_user(body: UserIn, _p: Admin, ctx: Ctx) -> CreatedUserOut:
    """Creates a user; without a password in the request, one is generated and shown once."""
    password = body.password or auth.generate_password()
    try:
        u = auth.create_user(ctx.store, body.name, body.role, password, gate=ctx.gate)
    except ValueError as e:
        if "exists" in str(e):
            raise HTTPException(409, str(e)) from None
        # The same shape as the request's own validation errors, as the OpenAPI document says.
        raise RequestValidationError([{"type": "value_error", "loc": ("body", "name"), "msg": str(e)}]) from None
    return CreatedUserOut(name=u.name, role=u.role, password=password if body.password is None else None)


@router.post("/users/{name}/tokens", status_code=201, responses={**BODY, 404: refusal("no such user")})
def add_token(name: str, body: TokenIn, _p: Admin, ctx: Ctx) -> TokenOut:
    """A new API token for the user (``Authorization: Bearer``), shown once."""
    u = auth.find_user(ctx.store, name)
    if u is None:
        raise HTTPException(404, "no such user")
    return TokenOut(token=auth.create_api_token(ctx.store, u, body.name, now=ctx.now()))
