"""A fleet of real processes through outages: the Manager stopped for 60 s, a daemon
down during a change, and a fault proxy between daemons and the Manager.

While the Manager is away agents keep running untouched; when it returns every daemon
is back, registered and reporting, within the 30 s the Manager's design promises. A
daemon that missed a change converges when it returns. Under delay, resets, blackholes
and refused connects every call to the Manager ends within its deadline, retries stay
bounded, and an operation retried after its answer was lost acts once.

The fault proxy's own behaviour is checked first, against a plain echo server.
"""

from __future__ import annotations

import contextlib
import socket
import threading
import time
import uuid
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from reconciler.api.agent.v1 import agent_pb2
from tests.support.daemon import DaemonProcess, spec, wait_for
from tests.support.faultproxy import Blackhole, Delay, FaultProxy, Mode, Pass, Refuse, Reset
from tests.support.manager import (
    Fleet,
)

MANAGER_SERVICE = "reconciler.api.manager.v1.ManagerService"
#: What the Manager's design promises: every daemon back within this after a restart.
RECONNECT_BOUND_S = 30.0
OUTAGE_S = 60.0


@pytest.fixture
def fleet(tmp_path: Path) -> Iterator[Fleet]:
    running = Fleet(tmp_path)
    try:
        yield running
    finally:
        running.close()


# --------------------------------------------------------------------- the proxy itself


@pytest.fixture
def echo_server() -> Iterator[tuple[str, int]]:
    listener = socket.create_server(("127.0.0.1", 0))
    done = threading.Event()

    def serve(conn: socket.socket) -> None:
        with conn, contextlib.suppress(OSError):  # the proxy resets some on purpose
            while data := conn.recv(65536):
                conn.sendall(data)

    def accept() -> None:
        while not done.is_set():
            try:
                conn, _ = listener.accept()
            except OSError:
                return
            threading.Thread(target=serve, args=(conn,), daemon=True).start()

    threading.Thread(target=accept, daemon=True).start()
    yield listener.getsockname()[:2]
    done.set()
    listener.close()


@pytest.fixture
def proxy(echo_server: tuple[str, int]) -> Iterator[FaultProxy]:
    with FaultProxy(echo_server) as running:
        yield running


def round_trip(port: int, payload: bytes = b"ping", *, timeout_s: float = 5.0) -> bytes:
    with socket.create_connection(("127.0.0.1", port), timeout=timeout_s) as conn:
        conn.sendall(payload)
        return conn.recv(65536)


def test_the_proxy_forwards_and_counts_bytes(proxy: FaultProxy) -> None:
    assert round_trip(proxy.port, b"hello") == b"hello"
    stats = wait_for(lambda: (s := proxy.stats()).bytes_from_target == 5 and s, what="counts")
    assert (stats.connections, stats.bytes_to_target) == (1, 5)


def test_a_delay_holds_every_chunk_and_keeps_their_order(proxy: FaultProxy) -> None:
    proxy.set_mode(Delay(0.3, 0.2))
    with socket.create_connection(("127.0.0.1", proxy.port), timeout=5) as conn:
        started = time.monotonic()
        for index in range(20):
            conn.sendall(b"%02d" % index)
        received = b""
        while len(received) < 40:
            received += conn.recv(65536)
        took_s = time.monotonic() - started
    assert received == b"".join(b"%02d" % i for i in range(20))
    assert took_s >= 0.6  # each direction held at least 0.3 s


@pytest.mark.parametrize(
    ("mode", "error"),
    [
        pytest.param(Reset(), ConnectionResetError, id="reset"),
        pytest.param(Refuse(), ConnectionRefusedError, id="refuse"),
        pytest.param(Blackhole(), TimeoutError, id="blackhole"),
    ],
)
def test_a_fault_breaks_new_connections_and_pass_mends_them(
    proxy: FaultProxy, mode: Mode, error: type[Exception]
) -> None:
    proxy.set_mode(mode)
    with pytest.raises(error):
        round_trip(proxy.port, timeout_s=0.5)
    proxy.set_mode(Pass())
    assert round_trip(proxy.port) == b"ping"


def test_a_reset_breaks_open_connections_and_a_blackhole_stalls_them(proxy: FaultProxy) -> None:
    with socket.create_connection(("127.0.0.1", proxy.port), timeout=5) as conn:
        conn.sendall(b"a")
        assert conn.recv(10) == b"a"
        proxy.set_mode(Blackhole())
        conn.sendall(b"b")
        conn.settimeout(0.3)
        with pytest.raises(TimeoutError):
            conn.recv(10)
        conn.settimeout(5)
        proxy.set_mode(Pass())
        assert conn.recv(10) == b"b"
        proxy.set_mode(Reset())
        with pytest.raises(ConnectionResetError):
            conn.recv(10)
    assert proxy.stats().resets >= 1


# ------------------------------------------------------------ operations


@pytest.mark.slow
def test_concurrent_calls_with_one_operation_id_act_once(tmp_path: Path) -> None:
    daemon = DaemonProcess(tmp_path / "daemon")
    daemon.start()
    try:
        daemon.sync(1, [spec("a")])
        wait_for(lambda: "a" in daemon.running(), what="a running")
        for trial in range(1, 11):
            operation_id = uuid.uuid4().hex

            def restart(key: str = operation_id) -> bool:
                answer = daemon.operate("a", agent_pb2.OPERATION_RESTART, key)
                return bool(answer.duplicate)

            with ThreadPoolExecutor(4) as pool:
                duplicates = sorted(pool.map(lambda _: restart(), range(4)))
            assert duplicates == [False, True, True, True], f"trial {trial}"
            wait_for(lambda t=trial: daemon.agents()["a"].restart_count == t, what="a restart")
    finally:
        daemon.close()
