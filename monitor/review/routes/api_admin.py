"""/api/v1/admin/*: the summary, estimates over all traffic and their chart, users and tokens."""

from __future__ import annotations

from fastapi import APIRouter, HTTPException, Query, Response
from fastapi.exceptions import RequestValidationError

from monitor.quality import canaries as quality_canaries
from monitor.quality import estimates as quality_estimates
from monitor.quality import labels as quality_labels
from monitor.quality.window import quality_windows
from monitor.review import auth, stats
from monitor.review.chart import estimates_svg
from monitor.review.context import Ctx
from monitor.review.deps import Admin
from monitor.review.label_stats import CHART_BUCKET_S
from monitor.review.schemas import (
    ADMIN_ONLY,
    BODY,
    CreatedUserOut,
    ExperimentReportOut,
    ReviewerQualityOut,
    RmSensitivityOut,
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
    return SummaryOut.model_validate(stats.admin_summary(ctx.store, ctx.settings, ctx.now(), ctx.label_stats.get()))


@router.get("/estimates/series")
def series(_p: Admin, ctx: Ctx, stream: str = Query(max_length=128), bucket_s: int = BUCKET_S) -> list[SeriesPointOut]:
    """The estimated mean rating of one stream per time bucket, with its 95% interval, over the
    stream's last ``quality.window_days`` of traffic."""
    windows = quality_windows(ctx.store, ctx.settings, ctx.now())
    if windows is not None:  # that stream's labels alone are read
        windows = {stream: windows[stream]} if stream in windows else {}
    rows = quality_estimates.estimate_series(ctx.store, stream, bucket_s, windows=windows)
    return [SeriesPointOut.model_validate(r) for r in rows]


@router.get(
    "/estimates/chart.svg",
    response_class=Response,
    responses={200: {"content": {"image/svg+xml": {"schema": {"type": "string"}}}, "description": "an SVG chart"}},
)
def chart(_p: Admin, ctx: Ctx, bucket_s: int = BUCKET_S) -> Response:
    """The streams' series as one SVG line chart (the admin page shows the same at an hour's bucket,
    served as the summary is: computed once for all who ask together, and paced)."""
    series = ctx.label_stats.get().series
    if bucket_s != CHART_BUCKET_S:  # another bucket: the same streams, computed afresh
        rows = quality_labels.label_rows(ctx.store, windows=quality_windows(ctx.store, ctx.settings, ctx.now()))
        series = {s: quality_estimates.estimate_series(ctx.store, s, bucket_s, rows) for s in series}
    svg = estimates_svg(series)
    return Response(svg, media_type="image/svg+xml")


@router.get("/rm/sensitivity")
def rm_sensitivity(
    _p: Admin, ctx: Ctx, version: str | None = Query(None, max_length=128, description="default: the active one")
) -> RmSensitivityOut:
    """A reward-model version's sensitivity per perturbation kind, as recorded by its gate (nothing is scored here)."""
    from monitor.reward.sensitivity import recorded

    return RmSensitivityOut.model_validate(recorded(ctx.store, ctx.settings, version))


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


@router.get("/reviewers/quality", response_model=list[ReviewerQualityOut])
def reviewer_quality(
    _p: Admin,
    ctx: Ctx,
    days: float = Query(28.0, gt=0, le=3660, description="canary labels of the last this many days"),
    bucket: str = Query("day", pattern="^(day|week)$", description="trend bucket"),
) -> list[ReviewerQualityOut]:
    """Per reviewer and perturbation kind, from canaries: detection rate, false-flag rate on
    unperturbed originals and time per item, each with its 95% interval, and the trend."""
    cfg = ctx.settings.review.canaries
    since = quality_canaries.window_start(days, ctx.now())
    rows = quality_canaries.reviewer_quality(ctx.store, cfg.min_detection_rate, since, bucket)
    return [ReviewerQualityOut.model_validate(r) for r in rows]


@router.get("/assist/report", response_model=ExperimentReportOut)
def assist_report(_p: Admin, ctx: Ctx) -> ExperimentReportOut:
    """The assistance experiment, per condition and kind: detection rate and time per item with
    95% intervals, and each condition's difference from the control (``none``, else the first)."""
    cfg = ctx.settings.review.assist
    rep = quality_canaries.experiment_report(ctx.store, cfg.name, list(cfg.conditions))
    return ExperimentReportOut.model_validate({**rep, "enabled": cfg.enabled})
