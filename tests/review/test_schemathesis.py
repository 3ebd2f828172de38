"""Property-based API tests from the OpenAPI document (schemathesis 4), as an admin with a
Bearer token, on SQLite: no server errors, every status code and content type documented, and
every documented response body matching its schema (the response models in
monitor/review/schemas.py).

The app is built at import over an in-memory SQLite database: schemathesis' lazy
``from_fixture`` loader does not work under pytest 9 (it reads ``Function._nodeid``)."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest
import schemathesis
from hypothesis import HealthCheck, settings
from review_helpers import API, Env, episode_row, make_env, seed, seed_simple
from schemathesis.checks import not_a_server_error
from schemathesis.specs.openapi.checks import (
    content_type_conformance,
    response_schema_conformance,
    status_code_conformance,
)

from monitor.review import auth, queue

MAX_EXAMPLES = 40
ENV = make_env("sqlite://")
schema = schemathesis.openapi.from_asgi(f"{API}/openapi.json", ENV.app)
CHECKS = [not_a_server_error, status_code_conformance, content_type_conformance, response_schema_conformance]
LEASED = {f"{API}/items/label", f"{API}/items/skip", f"{API}/items/release"}
LEASE_KEYS = ("episode_id", "slot", "fence")


@pytest.fixture(scope="module")
def review_env() -> Iterator[Env]:
    ENV.user("root", "admin")
    ENV.user("rev")
    seed_simple(ENV.store, 300, slots=2)
    seed(ENV.store, [episode_row("pairwise", metadata={"alternative_response": "alt"})])
    yield ENV
    ENV.close()


@schema.parametrize()
@settings(
    max_examples=MAX_EXAMPLES, deadline=None, derandomize=True, database=None, suppress_health_check=list(HealthCheck)
)
def test_api_conforms(case: schemathesis.Case[Any], review_env: Env) -> None:
    # A token per case: /auth/logout revokes the token it is called with, and with one shared
    # token every case after the first logout was a 401 that checked no response schema at all.
    token = auth.create_api_token(review_env.store, review_env.users["root"], "schemathesis")
    with_live_lease(case, review_env)
    case.call_and_validate(headers={"Authorization": f"Bearer {token}"}, checks=CHECKS)


def with_live_lease(case: schemathesis.Case[Any], env: Env) -> None:
    """A body naming a lease names the admin's live one: generated ids only ever reach the 404."""
    if case.path not in LEASED or not isinstance(case.body, dict) or not all(k in case.body for k in LEASE_KEYS):
        return
    item = queue.claim(env.store, env.users["root"], 600, env.settings.sampling_key())
    if item is not None:
        case.body.update(episode_id=item.claim.episode_id, slot=item.claim.slot, fence=item.claim.fence)
