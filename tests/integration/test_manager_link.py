"""The daemon's link to a Manager, against a recording ManagerService on loopback.

A real daemon process talks to a small in-test ManagerService that records what it
is told and can refuse reports, so the test can check what a Manager may conclude
from heartbeats while the daemon's reports do not arrive.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from concurrent import futures
from pathlib import Path
from typing import Any

import grpc
import pytest

from reconciler.api.manager.v1 import manager_pb2, manager_pb2_grpc
from tests.support.daemon import DaemonProcess, free_port, spec, wait_for

pytestmark = pytest.mark.slow


class RecordingManager(manager_pb2_grpc.ManagerServiceServicer):
    """Answers as a Manager with nothing to push; refuses reports while told to."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.heartbeats: list[manager_pb2.HeartbeatRequest] = []
        self.reports: list[manager_pb2.SyncAgentStatesRequest] = []
        self.refuse_reports = True

    def RegisterNode(self, request: Any, context: Any) -> manager_pb2.RegisterNodeResponse:
        return manager_pb2.RegisterNodeResponse(node_id=request.node_id)

    def Heartbeat(self, request: Any, context: Any) -> manager_pb2.HeartbeatResponse:
        with self.lock:
            self.heartbeats.append(request)
        return manager_pb2.HeartbeatResponse(known=True)

    def SyncAgentStates(self, request: Any, context: Any) -> manager_pb2.SyncAgentStatesResponse:
        if self.refuse_reports:
            context.abort(grpc.StatusCode.UNAVAILABLE, "the store is down")
        with self.lock:
            self.reports.append(request)
        return manager_pb2.SyncAgentStatesResponse()

    def ReportMetrics(self, request: Any, context: Any) -> manager_pb2.ReportMetricsResponse:
        return manager_pb2.ReportMetricsResponse()

    def told(self) -> list[int]:
        """The observed generation of every heartbeat so far."""
        with self.lock:
            return [beat.observed_generation for beat in self.heartbeats]


@pytest.fixture
def manager() -> Iterator[tuple[RecordingManager, str]]:
    servicer = RecordingManager()
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=4))
    manager_pb2_grpc.add_ManagerServiceServicer_to_server(servicer, server)
    address = f"127.0.0.1:{free_port()}"
    server.add_insecure_port(address)
    server.start()
    yield servicer, address
    server.stop(grace=None)


def test_heartbeats_tell_no_observed_generation_the_manager_holds_no_states_for(
    tmp_path: Path, manager: tuple[RecordingManager, str]
) -> None:
    recorder, address = manager
    link = {"address": address, "heartbeat_interval_s": 0.1, "report_interval_s": 0.2}
    daemon = DaemonProcess(tmp_path / "daemon", settings={"manager": link})
    daemon.start()
    try:
        daemon.sync(1, [spec("a")])
        wait_for(lambda: daemon.list().observed_generation == 1, what="generation 1 acted on")
        seen = len(recorder.told())
        wait_for(lambda: len(recorder.told()) >= seen + 3, what="three more heartbeats")
        assert set(recorder.told()) == {0}, "reports were refused: the Manager holds no states"

        recorder.refuse_reports = False
        wait_for(lambda: recorder.told()[-1] == 1, what="generation 1 told after a report")
        with recorder.lock:
            report = next(r for r in recorder.reports if r.observed_generation == 1)
        assert [agent.agent_id for agent in report.agents] == ["a"]
    finally:
        daemon.close()
