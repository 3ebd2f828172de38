"""/healthz (the process answers) and /readyz (the database answers), outside the API document."""

from __future__ import annotations

from fastapi import APIRouter
from fastapi.responses import JSONResponse

from monitor.review.context import Ctx

router = APIRouter(include_in_schema=False)


@router.get("/healthz")
async def healthz() -> dict[str, str]:
    return {"status": "ok"}


@router.get("/readyz")
def readyz(ctx: Ctx) -> JSONResponse:
    ok = ctx.store.ping()
    return JSONResponse({"ready": ok, "checks": {"database": ok}}, status_code=200 if ok else 503)
