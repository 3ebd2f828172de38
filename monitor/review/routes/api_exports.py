"""/api/v1/admin/export/*: labels for reward-model training and analysis, as attachments.

Exports carry model outputs (attacker-controlled text): they are downloads, never pages
(``Content-Disposition: attachment``); :mod:`monitor.review.export` escapes their content.
"""

from __future__ import annotations

from collections.abc import Iterator

from fastapi import APIRouter
from fastapi.responses import StreamingResponse

from monitor.review import export
from monitor.review.context import Ctx
from monitor.review.deps import Admin
from monitor.review.schemas import ADMIN_ONLY, Responses

router = APIRouter(prefix="/admin/export", tags=["admin"], responses=ADMIN_ONLY)
JSONL = "application/x-ndjson"
CSV = "text/csv; charset=utf-8"


def documented(media_type: str, description: str) -> Responses:
    return {200: {"description": description, "content": {media_type: {"schema": {"type": "string"}}}}}


def attachment(body: Iterator[str], media_type: str, filename: str) -> StreamingResponse:
    return StreamingResponse(
        body, media_type=media_type, headers={"Content-Disposition": f'attachment; filename="{filename}"'}
    )


@router.get(
    "/pairs.jsonl",
    response_class=StreamingResponse,
    responses=documented(JSONL, 'one {"prompt", "chosen", "rejected"} object per line'),
)
def export_pairs(_p: Admin, ctx: Ctx) -> StreamingResponse:
    return attachment(export.jsonl(export.iter_pairs(ctx.store)), JSONL, "pairs.jsonl")


@router.get(
    "/ratings.jsonl",
    response_class=StreamingResponse,
    responses=documented(JSONL, "one label per line, with its episode and inclusion probability"),
)
def export_ratings(_p: Admin, ctx: Ctx) -> StreamingResponse:
    return attachment(export.jsonl(export.iter_ratings(ctx.store)), JSONL, "ratings.jsonl")


@router.get(
    "/ratings.csv",
    response_class=StreamingResponse,
    responses=documented("text/csv", "one label per row; cells a spreadsheet would run are neutralised"),
)
def export_csv(_p: Admin, ctx: Ctx) -> StreamingResponse:
    return attachment(export.csv_rows(export.iter_ratings(ctx.store)), CSV, "ratings.csv")
