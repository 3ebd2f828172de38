"""Property-based API tests from the OpenAPI document (schemathesis 4), as an admin with a
Bearer token, on SQLite: no server errors, and every documented response matches its schema.

The app is built at import over an in-memory SQLite database: schemathesis' lazy
``from_fixture`` loader does not work under pytest 9 (it reads ``Function._nodeid``)."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import schemathesis
from hypothesis import HealthCheck, settings
from review_helpers import API, Env, episode_row, make_env, seed, seed_simple
from schemathesis.checks import not_a_server_error
from schemathesis.specs.openapi.checks import response_schema_conformance

MAX_EXAMPLES = 40
ENV = make_env("sqlite://")
schema = schemathesis.openapi.from_asgi(f"{API}/openapi.json", ENV.app)


@pytest.fixture(scope="module")
def review_env() -> Iterator[Env]:
    ENV.user("root", "admin")
    ENV.user("rev")
    seed_simple(ENV.store, 100, slots=2)
    seed(ENV.store, [episode_row("pairwise", metadata={"alternative_response": "alt"})])
    yield ENV
    ENV.close()


@schema.parametrize()
@settings(
    max_examples=MAX_EXAMPLES, deadline=None, derandomize=True, database=None, suppress_health_check=list(HealthCheck)
)
def test_api_conforms(case: schemathesis.Case, review_env: Env) -> None:
    case.call_and_validate(
        headers={"Authorization": f"Bearer {review_env.tokens['root']}"},
        checks=[not_a_server_error, response_schema_conformance],
    )
