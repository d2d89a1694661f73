"""A PostgreSQL server for the tests: an existing one, or a throwaway one we start.

``RECONCILER_TEST_POSTGRES_DSN`` names an existing server to use as it is. Otherwise
the PostgreSQL binaries are looked up (``initdb`` on PATH, ``/usr/lib/postgresql/*/bin``
newest first, ``/usr/local/bin``, ``/usr/local/pgsql/bin``); when there are none and we
are root, ``apt-get install postgresql`` provides them, and when we are not, the tests
fail with a message saying what to install: CI must really run them, never skip them.

The server is a fresh cluster in a temporary directory (removed afterwards), listening
on a free loopback port with its Unix socket in that directory, trust authentication,
and fsync off (nothing in it outlives the session). PostgreSQL refuses to run as root,
so as root it runs as the ``postgres`` system user (created when missing) through
``setpriv``, which execs the server so its pid is the one we signal.

``tools/test-services`` installs the same packages before ``make test`` runs pytest.
"""

from __future__ import annotations

import contextlib
import os
import pwd
import re
import shutil
import signal
import socket
import subprocess
import tempfile
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import psycopg
from psycopg import sql
from psycopg.conninfo import make_conninfo

__all__ = [
    "ENV_DSN",
    "PostgresServer",
    "PostgresUnavailable",
    "ensure_bindir",
    "find_bindir",
    "isolated_schema",
    "start_server",
]

ENV_DSN = "RECONCILER_TEST_POSTGRES_DSN"
DATABASE = "reconciler_test"
_NEEDED = ("initdb", "postgres")
_FIXED_DIRS = (Path("/usr/local/bin"), Path("/usr/local/pgsql/bin"))
_READY_TIMEOUT_S = 60.0
_STOP_TIMEOUT_S = 30.0


class PostgresUnavailable(RuntimeError):
    """No PostgreSQL server could be found, installed or started."""


@dataclass(frozen=True)
class PostgresServer:
    """A running throwaway server; ``stop`` ends it and removes its files."""

    dsn: str
    process: subprocess.Popen[bytes]
    base_dir: Path
    started_in_s: float

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGINT)  # fast shutdown
            try:
                self.process.wait(timeout=_STOP_TIMEOUT_S)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        shutil.rmtree(self.base_dir, ignore_errors=True)


# ------------------------------------------------------------------------ binaries


def _version_key(bindir: Path) -> tuple[int, ...]:
    return tuple(int(part) for part in re.findall(r"\d+", bindir.parent.name))


def _candidate_dirs() -> list[Path]:
    found = shutil.which("initdb")
    dirs = [Path(found).parent] if found else []
    versioned = sorted(Path("/usr/lib/postgresql").glob("*/bin"), key=_version_key, reverse=True)
    return [*dirs, *versioned, *_FIXED_DIRS]


def find_bindir() -> Path | None:
    """The first directory holding both ``initdb`` and ``postgres``, if any."""
    for bindir in _candidate_dirs():
        if all(os.access(bindir / name, os.X_OK) for name in _NEEDED):
            return bindir
    return None


def _install_with_apt() -> None:
    if os.geteuid() != 0:
        raise PostgresUnavailable(
            "PostgreSQL server binaries (initdb, postgres) were not found and only root may "
            "install them: run `sudo apt-get install postgresql` (or `tools/test-services` "
            f"as root), or point {ENV_DSN} at a server"
        )
    if shutil.which("apt-get") is None:
        raise PostgresUnavailable(
            f"PostgreSQL server binaries were not found and there is no apt-get: install "
            f"the PostgreSQL server or point {ENV_DSN} at a server"
        )
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    for argv in (["apt-get", "update"], ["apt-get", "install", "-y", "postgresql"]):
        done = subprocess.run(argv, env=env, capture_output=True, check=False)
        if done.returncode != 0:
            raise PostgresUnavailable(f"{' '.join(argv)} failed:\n{done.stderr.decode()[-2000:]}")


def ensure_bindir() -> Path:
    """Find the binaries, installing them with apt-get first when absent (root only)."""
    bindir = find_bindir()
    if bindir is None:
        _install_with_apt()
        bindir = find_bindir()
    if bindir is None:
        raise PostgresUnavailable("apt-get installed postgresql but initdb is still missing")
    return bindir


# -------------------------------------------------------------------------- server


def _server_user() -> pwd.struct_passwd | None:
    """The user the server runs as: ``postgres`` when we are root, else ourselves."""
    if os.geteuid() != 0:
        return None
    try:
        return pwd.getpwnam("postgres")
    except KeyError:
        subprocess.run(
            ["useradd", "--system", "--user-group", "--no-create-home", "--home-dir",
             "/nonexistent", "--shell", "/usr/sbin/nologin", "postgres"],
            check=True, capture_output=True,
        )  # fmt: skip
        return pwd.getpwnam("postgres")


def _as_user(user: pwd.struct_passwd | None, argv: list[str]) -> list[str]:
    if user is None:
        return argv
    ids = [f"--reuid={user.pw_uid}", f"--regid={user.pw_gid}", "--clear-groups"]
    return ["setpriv", *ids, "--", *argv]


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _initdb(bindir: Path, base: Path, user: pwd.struct_passwd | None) -> Path:
    data = base / "data"
    argv = [str(bindir / "initdb"), "-D", str(data), "-U", "postgres", "-A", "trust",
            "-E", "UTF8", "--locale=C", "--no-sync"]  # fmt: skip
    done = subprocess.run(_as_user(user, argv), cwd=base, capture_output=True, check=False)
    if done.returncode != 0:
        raise PostgresUnavailable(f"initdb failed:\n{done.stderr.decode()[-2000:]}")
    return data


def _spawn(
    bindir: Path, base: Path, user: pwd.struct_passwd | None, port: int
) -> subprocess.Popen[bytes]:
    settings = {
        "listen_addresses": "127.0.0.1",
        "unix_socket_directories": str(base),
        "fsync": "off",
        "synchronous_commit": "off",
        "full_page_writes": "off",
        "max_connections": "200",
    }
    argv = [str(bindir / "postgres"), "-D", str(base / "data"), "-p", str(port)]
    for key, value in settings.items():
        argv += ["-c", f"{key}={value}"]
    log = (base / "server.log").open("ab")
    with log:
        return subprocess.Popen(
            _as_user(user, argv), cwd=base, stdout=log, stderr=subprocess.STDOUT
        )


def _log_tail(base: Path) -> str:
    with contextlib.suppress(OSError):
        return (base / "server.log").read_text(errors="replace")[-2000:]
    return ""


def _wait_ready(dsn: str, process: subprocess.Popen[bytes], base: Path) -> None:
    deadline = time.monotonic() + _READY_TIMEOUT_S
    while True:
        if process.poll() is not None:
            raise PostgresUnavailable(f"postgres exited at start:\n{_log_tail(base)}")
        try:
            psycopg.connect(dsn, connect_timeout=2).close()
            return
        except psycopg.OperationalError:
            if time.monotonic() > deadline:
                raise PostgresUnavailable(f"postgres not ready:\n{_log_tail(base)}") from None
            time.sleep(0.02)  # polling for readiness, with a deadline


def _create_database(admin_dsn: str) -> None:
    with psycopg.connect(admin_dsn, autocommit=True) as conn:
        conn.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(DATABASE)))


def _run_on_free_port(
    bindir: Path, base: Path, user: pwd.struct_passwd | None, *, attempts: int
) -> tuple[subprocess.Popen[bytes], str]:
    """Start the server; another process may take the free port first, so try again."""
    for attempt in range(1, attempts + 1):
        port = _free_port()
        admin_dsn = f"host=127.0.0.1 port={port} user=postgres dbname=postgres"
        process = _spawn(bindir, base, user, port)
        try:
            _wait_ready(admin_dsn, process, base)
        except PostgresUnavailable:
            process.kill()
            process.wait()
            if attempt == attempts:
                raise
        else:
            return process, admin_dsn
    raise PostgresUnavailable("no attempt to start postgres was made")


def start_server(bindir: Path, *, attempts: int = 3) -> PostgresServer:
    """initdb a cluster in a new temporary directory and start it on a free port."""
    started = time.monotonic()
    user = _server_user()
    base = Path(tempfile.mkdtemp(prefix="reconciler-pg-"))
    try:
        if user is not None:
            os.chown(base, user.pw_uid, user.pw_gid)
        _initdb(bindir, base, user)
        process, admin_dsn = _run_on_free_port(bindir, base, user, attempts=attempts)
    except BaseException:
        shutil.rmtree(base, ignore_errors=True)
        raise
    server = PostgresServer(admin_dsn, process, base, 0.0)
    try:
        _create_database(admin_dsn)
    except BaseException:
        server.stop()
        raise
    dsn = make_conninfo(admin_dsn, dbname=DATABASE)
    return PostgresServer(dsn, process, base, time.monotonic() - started)


@contextlib.contextmanager
def isolated_schema(dsn: str) -> Iterator[str]:
    """A DSN whose ``search_path`` is a new empty schema, dropped afterwards, so each
    test gets fresh tables on a shared server."""
    name = f"test_{uuid.uuid4().hex[:16]}"
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute(sql.SQL("CREATE SCHEMA {}").format(sql.Identifier(name)))
    try:
        yield make_conninfo(dsn, options=f"-c search_path={name}")
    finally:
        with psycopg.connect(dsn, autocommit=True) as conn:
            conn.execute(sql.SQL("DROP SCHEMA {} CASCADE").format(sql.Identifier(name)))
