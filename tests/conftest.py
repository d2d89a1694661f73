"""Fixtures shared by every test directory.

``postgres_dsn`` (session): a PostgreSQL server for tests marked ``postgres``: the one
named by ``RECONCILER_TEST_POSTGRES_DSN``, else a throwaway server started from the
machine's PostgreSQL packages (installed with apt-get when absent and running as root;
see ``tests/support/postgres.py``). A test that needs fresh tables wraps the DSN in
``tests.support.postgres.isolated_schema``.

Hypothesis runs without deadlines or speed health checks: CI machines are shared.
"""

from __future__ import annotations

import os
from collections.abc import Iterator

import pytest
from hypothesis import HealthCheck, settings

from tests.support.postgres import ENV_DSN, ensure_bindir, start_server

# The test machines are shared and noisy: judge properties by their outcome, never by
# how fast examples were generated or ran.
settings.register_profile(
    "default", deadline=None, suppress_health_check=[HealthCheck.too_slow], print_blob=True
)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "default"))


@pytest.fixture(scope="session")
def postgres_dsn() -> Iterator[str]:
    external = os.environ.get(ENV_DSN, "")
    if external:
        yield external
        return
    server = start_server(ensure_bindir())
    try:
        yield server.dsn
    finally:
        server.stop()
