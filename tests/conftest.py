"""Shared fixtures: real PostgreSQL (schema per test), SQLite files, the bundled real data, and
the CI rule that a test needing PostgreSQL or the Kafka broker is never skipped in CI (a missing
service fails the test; the hook below also turns any skip of a marked test into a failure)."""

from __future__ import annotations

import os
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING

import pytest

if TYPE_CHECKING:
    import sqlalchemy as sa

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

# `make test` runs the tests in pytest-xdist workers, one per core. Each worker's PyTorch would
# start a thread per core of its own (and so would each `oversight` process a test starts): on 2
# cores the training tests then ran 2-4x slower than alone, longer than they saved. So each worker,
# and what it starts, keeps to its share of the cores; PyTorch reads this when it is first imported,
# which is after this file. Set by hand, the variable is left alone.
if os.environ.get("PYTEST_XDIST_WORKER"):
    _workers = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
    os.environ.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // _workers)))

PG_BASE = os.environ.get("TEST_POSTGRES_URL", "postgresql+psycopg://root@127.0.0.1:5432/test")
REQUIRE_SERVICES = os.environ.get("CI_REQUIRE_SERVICES") == "1"


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]) -> Iterator[None]:
    outcome = yield
    report = outcome.get_result()  # type: ignore[attr-defined]
    if REQUIRE_SERVICES and report.skipped and any(item.iter_markers(name=m) for m in ("postgres", "kafka")):
        report.outcome = "failed"
        report.longrepr = f"CI_REQUIRE_SERVICES=1: service test was skipped: {report.longrepr}"


def _pg_admin() -> sa.Engine:
    import sqlalchemy as sa

    return sa.create_engine(PG_BASE, isolation_level="AUTOCOMMIT")


@pytest.fixture
def pg_url() -> Iterator[str]:
    """A fresh schema in the running PostgreSQL; the URL selects it via search_path."""
    import sqlalchemy as sa

    schema = f"t_{uuid.uuid4().hex[:12]}"
    try:
        admin = _pg_admin()
        with admin.connect() as conn:
            conn.execute(sa.text(f'CREATE SCHEMA "{schema}"'))
    except sa.exc.OperationalError as e:
        # Fail, not skip: a service test that silently skips proves nothing.
        # Without PostgreSQL, deselect them: pytest -m "not postgres".
        pytest.fail(f"PostgreSQL is not reachable at {PG_BASE} (deselect with -m 'not postgres'): {e}")
    try:
        yield f"{PG_BASE}?options=-csearch_path%3D{schema}"
    finally:
        with admin.connect() as conn:
            conn.execute(sa.text(f'DROP SCHEMA "{schema}" CASCADE'))
        admin.dispose()


@pytest.fixture
def sqlite_url(tmp_path: Path) -> str:
    return f"sqlite:///{tmp_path / 'oversight.db'}"


@pytest.fixture(params=["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)])
def db_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    """Run the same test against SQLite and PostgreSQL."""
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'oversight.db'}"
    return str(request.getfixturevalue("pg_url"))


@pytest.fixture(scope="session")
def real_data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The real data bundled with the tests (``tests/realdata.py``), laid out like the shared
    data set: ``alpaca_eval/<model>.jsonl.gz`` and ``hh_rlhf/harmless-base-test.jsonl.gz``."""
    from realdata import write_data_dir

    return write_data_dir(tmp_path_factory.mktemp("real-data"))
