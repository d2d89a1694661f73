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
import re
import socket
import threading
import time
import urllib.request
import uuid
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import grpc
import psutil
import pytest

from reconciler.api.agent.v1 import agent_pb2, node_pb2
from reconciler.api.fleet.v1 import fleet_pb2
from tests.support.daemon import DaemonProcess, free_port, spec, wait_for
from tests.support.faultproxy import Blackhole, Delay, FaultProxy, Mode, Pass, Refuse, Reset
from tests.support.manager import (
    Fleet,
    ManagerProcess,
    UnixSocketDaemon,
    agent_set_yaml,
    cli,
    sleeper,
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


# ------------------------------------------------------------------------ fleet helpers


def metrics_text(url: str) -> str:
    with urllib.request.urlopen(url, timeout=10) as response:
        text: str = response.read().decode()
    return text


def samples(text: str, name: str) -> list[tuple[dict[str, str], float]]:
    """(labels, value) of every sample of metric ``name`` in Prometheus text."""
    found = []
    for match in re.finditer(rf"^{name}\{{([^}}]*)\}} (\S+)$", text, re.MULTILINE):
        labels = dict(re.findall(r'(\w+)="([^"]*)"', match.group(1)))
        found.append((labels, float(match.group(2))))
    return found


def served(manager: ManagerProcess, method: str) -> float:
    """Calls of ManagerService ``method`` the Manager answered OK since it started."""
    return sum(
        value
        for labels, value in samples(
            metrics_text(manager.metrics_url), "reconciler_grpc_server_handled_total"
        )
        if labels["grpc_method"] == method and labels["grpc_code"] == "OK"
    )


def agent_view(daemon: DaemonProcess) -> dict[str, tuple[int, int, int]]:
    """agent id -> (pid, phase, restart count) as the daemon shows them."""
    return {
        agent_id: (info.pid, info.phase, info.restart_count)
        for agent_id, info in daemon.agents().items()
    }


def manager_view(manager: ManagerProcess, node_id: str) -> dict[str, tuple[int, int, int]]:
    return {
        state.spec.id: (state.info.pid, state.info.phase, state.info.restart_count)
        for state in manager.agents(node_id)
    }


def all_running(view: dict[str, tuple[int, int, int]], agent_ids: set[str]) -> bool:
    return set(view) == agent_ids and all(
        phase == agent_pb2.AGENT_PHASE_RUNNING and psutil.pid_exists(pid)
        for pid, phase, _ in view.values()
    )


def apply(manager: ManagerProcess, path: Path, *extra: str) -> str:
    result = cli("apply", "-f", str(path), *extra, manager=manager.address)
    assert result.returncode == 0, result.stdout + result.stderr
    return result.stdout


# ------------------------------------------------------------------ the Manager away


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_agents_outlive_a_60s_manager_outage_and_every_daemon_is_back_within_30s(
    fleet: Fleet, tmp_path: Path
) -> None:
    manager = fleet.manager()
    # The daemons' own defaults: 10 s heartbeats, 15 s reports, 5 s call deadline.
    defaults = {"heartbeat_interval_s": 10.0, "report_interval_s": 15.0, "call_timeout_s": 5.0}
    daemons = [
        fleet.daemon(f"edge-{i}", manager_address=manager.address, link=defaults) for i in (1, 2, 3)
    ]
    node_ids = {d.node_id for d in daemons}
    manager.wait_ready_nodes(node_ids)
    path = tmp_path / "all.yaml"
    path.write_text(agent_set_yaml("all", agents=[sleeper("shipper")]))
    apply(manager, path, "--wait", "--timeout", "60s")
    before = {d.node_id: agent_view(d) for d in daemons}
    assert all(all_running(view, {"shipper"}) for view in before.values()), before

    manager.kill()
    outage_end = time.monotonic() + OUTAGE_S
    while time.monotonic() < outage_end:  # watching the agents for the whole outage
        assert {d.node_id: agent_view(d) for d in daemons} == before
        time.sleep(1.0)

    restarted, restarted_wall = time.monotonic(), time.time()
    manager.start()

    def back() -> bool:
        nodes = manager.nodes()
        heard = [nodes[n].last_heartbeat_at.ToNanoseconds() / 1e9 for n in node_ids]
        return (
            all(node.status == node_pb2.NODE_STATUS_READY for node in nodes.values())
            and all(at >= restarted_wall for at in heard)
            and served(manager, "SyncAgentStates") >= len(daemons)
            and all(manager_view(manager, d.node_id) == agent_view(d) for d in daemons)
        )

    wait_for(back, timeout_s=RECONNECT_BOUND_S + 30, interval_s=0.2, what="every daemon back")
    back_s = time.monotonic() - restarted
    print(f"after a {OUTAGE_S:.0f}s outage every daemon was back in {back_s:.2f}s")
    assert back_s <= RECONNECT_BOUND_S
    assert {d.node_id: agent_view(d) for d in daemons} == before
    assert manager.wait_ready_nodes(node_ids, timeout_s=1.0) < 1.0

    # A change while one daemon is down reaches it when it returns.
    away = daemons[2]
    away.kill()
    path.write_text(agent_set_yaml("all", agents=[sleeper("shipper"), sleeper("tailer", "3601")]))
    apply(manager, path)
    for daemon in daemons[:2]:
        wait_for(lambda d=daemon: all_running(agent_view(d), {"shipper", "tailer"}), what="tailer")
    returned = time.monotonic()
    away.start()
    wait_for(
        lambda: all_running(agent_view(away), {"shipper", "tailer"}),
        timeout_s=RECONNECT_BOUND_S,
        what="the returning daemon to converge",
    )
    took_s = time.monotonic() - returned
    print(f"a daemon down during a change converged {took_s:.2f}s after it started again")
    assert agent_view(away)["shipper"] == before[away.node_id]["shipper"]  # adopted, not restarted
    wait_for(lambda: manager_view(manager, away.node_id) == agent_view(away), what="reported")


# -------------------------------------------------------------- a faulty network


def client_calls(daemon_metrics_url: str) -> tuple[dict[str, dict[str, float]], dict[str, float]]:
    """The daemon's calls to ManagerService: counts by method and code, and per method
    the count of attempts that took longer than 2.5 s (the bucket above the deadline)."""
    text = metrics_text(daemon_metrics_url)
    counts: dict[str, dict[str, float]] = {}
    for labels, value in samples(text, "reconciler_grpc_client_handled_total"):
        if labels["grpc_service"] == MANAGER_SERVICE:
            counts.setdefault(labels["grpc_method"], {})[labels["grpc_code"]] = value
    slow: dict[str, float] = {}
    buckets = samples(text, "reconciler_grpc_client_handling_seconds_bucket")
    for labels, value in buckets:
        if labels["grpc_service"] != MANAGER_SERVICE:
            continue
        method = labels["grpc_method"]
        if labels["le"] == "+Inf":
            slow[method] = slow.get(method, 0.0) + value
        elif labels["le"] == "2.5":
            slow[method] = slow.get(method, 0.0) - value
    return counts, slow


@pytest.mark.slow
@pytest.mark.timeout(240)
def test_through_a_faulty_network_every_call_ends_by_its_deadline_and_nothing_acts_twice(
    fleet: Fleet, tmp_path: Path
) -> None:
    manager = fleet.manager()
    with (
        FaultProxy(("127.0.0.1", manager.grpc_port)) as link,
        FaultProxy(("127.0.0.1", manager.grpc_port)) as operator,
    ):
        through_proxy = f"127.0.0.1:{link.port}"
        metrics = {kind: f"127.0.0.1:{free_port()}" for kind in ("push", "pull")}
        daemon = fleet.daemon(
            "edge-1", manager_address=through_proxy, metrics={"listen": metrics["push"]}
        )
        puller = fleet.daemon(
            "pull-1",
            manager_address=through_proxy,
            metrics={"listen": metrics["pull"]},
            kind=UnixSocketDaemon,
        )
        manager.wait_ready_nodes({daemon.node_id, puller.node_id})
        path = tmp_path / "all.yaml"
        path.write_text(agent_set_yaml("all", agents=[sleeper("shipper")]))
        apply(manager, path, "--wait", "--timeout", "60s")

        faults: list[tuple[Mode, float]] = [
            (Delay(0.5, 1.0), 6.0),
            (Reset(), 4.0),
            (Delay(0.1, 0.1), 3.0),
            (Blackhole(), 8.0),
            (Refuse(), 4.0),
            (Delay(1.5, 1.5), 6.0),
        ]
        started = time.monotonic()
        for index, (mode, duration_s) in enumerate(faults):
            link.set_mode(mode)
            if index == 1:  # a change the puller must fetch through the faults
                path.write_text(
                    agent_set_yaml("all", agents=[sleeper("shipper"), sleeper("tailer", "3601")])
                )
                apply(manager, path)
            time.sleep(duration_s)  # the fault lasts this long
        link.set_mode(Pass())
        faulty_s = time.monotonic() - started
        apply(manager, path, "--wait", "--timeout", "60s")
        print(f"converged {time.monotonic() - started - faulty_s:.2f}s after the faults ended")
        assert all_running(agent_view(puller), {"shipper", "tailer"})

        for node in (daemon, puller):
            counts, slow = client_calls(
                f"http://{metrics['push' if node is daemon else 'pull']}/metrics"
            )
            print(
                f"{node.node_id}'s calls to the Manager during {faulty_s:.0f}s of faults: {counts}"
            )
            assert all(n == 0 for n in slow.values()), f"calls outlived their deadline: {slow}"
            failed = sum(n for codes in counts.values() for c, n in codes.items() if c != "OK")
            assert failed > 0  # the faults were felt
            # Two loops (heartbeats, reports), each at most one attempt per 0.5 s backoff.
            assert failed <= faulty_s * 2 / 0.5 + 10
            assert "Traceback" not in node.log_text()
        assert link.stats().resets > 0
        # Each generation was pulled once, though both of the link's loops saw it.
        pulls, _ = client_calls(f"http://{metrics['pull']}/metrics")
        generation = manager.nodes()[puller.node_id].desired_generation
        assert 0 < pulls["GetDesiredState"].get("OK", 0) <= generation

        # An operation whose answer is lost acts once when retried.
        first_pid = daemon.running()["shipper"]
        operate = fleet_pb2.OperateAgentRequest(
            node_id=daemon.node_id,
            request=agent_pb2.AgentOperationRequest(
                agent_id="shipper",
                operation=agent_pb2.OPERATION_RESTART,
                operation_id=uuid.uuid4().hex,
            ),
        )
        with manager.fleet(via=f"127.0.0.1:{operator.port}") as fleet_stub:
            fleet_stub.ListNodes(fleet_pb2.ListNodesRequest(), timeout=10)  # connected
            operator.set_mode(Delay(1.5, 0.0))
            with pytest.raises(grpc.RpcError) as lost:
                fleet_stub.OperateAgent(operate, timeout=1.0)
            assert lost.value.code() is grpc.StatusCode.DEADLINE_EXCEEDED  # type: ignore[attr-defined]
            wait_for(lambda: daemon.agents()["shipper"].restart_count == 1, what="the lost call")
            operator.set_mode(Pass())
            again = fleet_stub.OperateAgent(operate, timeout=10)
        assert again.duplicate
        second_pid = wait_for(lambda: daemon.running().get("shipper"), what="shipper running")
        assert second_pid != first_pid
        assert daemon.agents()["shipper"].restart_count == 1


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
