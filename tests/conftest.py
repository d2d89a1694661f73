"""Fixtures shared by every test directory.

``postgres_dsn`` (session): a PostgreSQL server for tests marked ``postgres``: the one
named by ``RECONCILER_TEST_POSTGRES_DSN``, else a throwaway server started from the
machine's PostgreSQL packages (installed with apt-get when absent and running as root;
see ``tests/support/postgres.py``). A test that needs fresh tables wraps the DSN in
``tests.support.postgres.isolated_schema``.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

# The repository root, so ``tests.support`` imports under any pytest import mode.
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from tests.support.postgres import ENV_DSN, ensure_bindir, start_server


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
