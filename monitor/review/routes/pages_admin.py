"""/admin: the dashboard (queue, throughput, agreement and the disagreements waiting for
adjudication, estimates and their chart, drift events, action requests, exports). Everything
on it may come from traffic: all escaped."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter
from fastapi.responses import HTMLResponse, Response
from markupsafe import Markup

from monitor.quality import canaries as quality_canaries
from monitor.quality.adjudication import waiting_per_stream
from monitor.review import guidelines, stats
from monitor.review.chart import estimates_svg
from monitor.review.context import Ctx, ReviewContext
from monitor.review.pages import AdminSession, render

router = APIRouter(include_in_schema=False)

EXPORTS = (
    ("/api/v1/admin/export/pairs.jsonl", "Preference pairs (JSONL)"),
    ("/api/v1/admin/export/ratings.jsonl", "Ratings (JSONL)"),
    ("/api/v1/admin/export/ratings.csv", "Ratings (CSV)"),
)
REQUEST_COLUMNS = ["id", "kind", "stream", "state", "attempts", "updated_at", "last_error"]
MAX_DRIFT_ROWS, MAX_DRIFT_COLUMNS = 50, 9
# The per-stream drift and incident table (``stats.admin_summary``'s ``drift_streams``).
STREAM_COLUMNS = [
    "stream",
    "open_incident_since",
    "events_attached",
    "incidents_24h",
    "incident_limit_24h",
    "false_alarms_per_30d",
]


def columns(rows: list[Any], limit: int) -> list[str]:
    """The keys of ``rows`` in order of first appearance (drift events differ by detector)."""
    cols: list[str] = []
    for row in rows:
        if isinstance(row, dict):
            cols.extend(k for k in row if k not in cols)
    return cols[:limit]


def dashboard(summary: dict[str, Any]) -> dict[str, Any]:
    """The template's values from the admin summary, tolerant of missing or odd parts."""
    drift = list(summary.get("drift_events") or [])[-MAX_DRIFT_ROWS:]
    rm = summary.get("rm_agreement")
    return {
        "queue": summary.get("queue") or [],
        "throughput": summary.get("throughput") or [],
        "agreement": summary.get("agreement") or {},
        "rm": rm if isinstance(rm, dict) else ({"value": rm} if rm is not None else None),
        "drift": drift,
        # ``detail`` is the JSON behind ``size`` (the API has it): the page shows the words.
        "drift_cols": [c for c in columns(drift, MAX_DRIFT_COLUMNS + 1) if c != "detail"][:MAX_DRIFT_COLUMNS],
        "drift_streams": [r for r in (summary.get("drift_streams") or []) if isinstance(r, dict)],
        "stream_cols": STREAM_COLUMNS,
        "requests": [r for r in (summary.get("requests") or []) if isinstance(r, dict)],
        "request_cols": REQUEST_COLUMNS,
        "estimates": summary.get("estimates") or [],
    }


@router.get("/admin", response_class=HTMLResponse)
def get_admin(ctx: Ctx, session: AdminSession) -> Response:
    labels = ctx.label_stats.get()  # the window's labels: computed once for the summary and the chart, paced
    summary = stats.admin_summary(ctx.store, ctx.settings, ctx.now(), labels)
    values = dashboard(summary)
    return render(
        "admin.html",
        200,
        session,
        **values,
        flags=list(ctx.settings.review.flags),
        # Our own SVG: every text in it is escaped by the builder.
        chart=Markup(estimates_svg(labels.series)),  # noqa: S704
        labels_computed_at=labels.computed_at,
        labels_window_days=labels.window_days,
        exports=EXPORTS,
        guidelines=guidelines.current_versions(ctx.store),
        disagreements_waiting=sum(waiting_per_stream(ctx.store, ctx.disagreement_rule).values()),
        **quality(ctx),
    )


def quality(ctx: ReviewContext) -> dict[str, Any]:
    """Reviewer quality over the metrics' window, and the assistance experiment's report."""
    rc = ctx.settings.review
    since = quality_canaries.window_start(rc.canaries.window_days, ctx.now())
    report = quality_canaries.experiment_report(ctx.store, rc.assist.name, list(rc.assist.conditions))
    return {
        "quality": quality_canaries.reviewer_quality(ctx.store, rc.canaries.min_detection_rate, since),
        "quality_days": rc.canaries.window_days,
        "assist": {**report, "enabled": rc.assist.enabled},
    }
