"""The review app's routes, one module per resource; each exposes a module-level ``router``.

JSON API (mounted under /api/v1): :mod:`.api_auth` (login, logout, me), :mod:`.api_items`
(claim, label, skip, release, queue depth), :mod:`.api_admin` (summary, estimates, users,
tokens), :mod:`.api_adjudication` (disagreeing labels and their adjudication),
:mod:`.api_exports` (label exports), :mod:`.api_workday` (progress, undo, guidelines).
HTML pages: :mod:`.pages_auth` (login, logout), :mod:`.pages_review` (the reviewer's item),
:mod:`.pages_admin` (the dashboard), :mod:`.pages_adjudication` (settling disagreements),
:mod:`.pages_workday` (guidelines, undo, release, the leave beacon).
:mod:`.health` answers /healthz and /readyz.

Routes are plain functions: what they need (the app's context, the caller, a checked form)
comes from dependencies (:mod:`monitor.review.context`, :mod:`monitor.review.deps`,
:mod:`monitor.review.pages`), so one router serves every app the process builds.
"""

from __future__ import annotations

from fastapi import APIRouter

from monitor.review.routes import (
    api_adjudication,
    api_admin,
    api_auth,
    api_exports,
    api_items,
    api_workday,
    health,
    pages_adjudication,
    pages_admin,
    pages_auth,
    pages_review,
    pages_workday,
)

API_ROUTERS: tuple[APIRouter, ...] = (
    api_auth.router,
    api_items.router,
    api_admin.router,
    api_adjudication.router,
    api_exports.router,
    api_workday.router,
    api_workday.admin_router,
)
PAGE_ROUTERS: tuple[APIRouter, ...] = (
    health.router,
    pages_auth.router,
    pages_review.router,
    pages_admin.router,
    pages_adjudication.router,
    pages_workday.router,
)
