"""The daemon's /metrics: real daemon process, real agents, Prometheus's own parser."""

from __future__ import annotations

import os
import signal
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest
from prometheus_client.parser import text_string_to_metric_families

from reconciler.api.agent.v1 import agent_pb2
from tests.support.daemon import DaemonProcess, free_port, spec, wait_for

pytestmark = pytest.mark.slow

Samples = dict[tuple[str, tuple[tuple[str, str], ...]], float]


def scrape(address: str) -> Samples:
    """Every sample of ``/metrics``, parsed by prometheus_client's own text parser."""
    with urllib.request.urlopen(f"http://{address}/metrics", timeout=5) as answer:
        text = answer.read().decode()
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


def agent(metric: str, agent_id: str) -> tuple[str, tuple[tuple[str, str], ...]]:
    return (metric, (("agent_id", agent_id),))


@pytest.fixture
def daemon(tmp_path: Path) -> Iterator[DaemonProcess]:
    process = DaemonProcess(
        tmp_path / "daemon",
        settings={"metrics": {"listen": f"127.0.0.1:{free_port()}"}},
    )
    process.start()
    yield process
    process.close()


def test_counters_move_as_agents_start_crash_back_off_and_stop(daemon: DaemonProcess) -> None:
    address = daemon.settings["metrics"]["listen"]
    before = scrape(address)
    assert before[("reconciler_agents", (("phase", "Running"),))] == 0

    daemon.sync(1, [spec("steady"), spec("crashy", command=("/bin/false",))])
    pid = wait_for(lambda: daemon.running().get("steady"), what="steady running")
    started = scrape(address)
    assert started[agent("reconciler_agent_starts_total", "steady")] == 1
    assert started[("reconciler_agents", (("phase", "Running"),))] >= 1
    assert started[("reconciler_desired_generation", ())] == 1

    os.kill(pid, signal.SIGKILL)
    wait_for(
        lambda: scrape(address).get(agent("reconciler_agent_restarts_total", "steady"), 0) >= 1,
        what="the killed agent's restart to be counted",
    )
    wait_for(
        lambda: scrape(address).get(agent("reconciler_agent_backoffs_total", "crashy"), 0) >= 2,
        what="the crash loop's backoffs to be counted",
    )
    crashed = scrape(address)
    assert crashed[agent("reconciler_agent_crashes_total", "steady")] == 1
    assert crashed[agent("reconciler_agent_starts_total", "steady")] == 2
    assert crashed[agent("reconciler_agent_crashes_total", "crashy")] >= 2

    stopped_spec = spec("steady")
    stopped_spec.state = agent_pb2.DESIRED_STATE_STOPPED
    daemon.sync(2, [stopped_spec])
    wait_for(
        lambda: scrape(address).get(agent("reconciler_agent_stops_total", "steady"), 0) == 1,
        what="the stop to be counted",
    )
    after = scrape(address)
    assert ("reconciler_agent_starts_total", (("agent_id", "crashy"),)) not in after, (
        "an agent the node no longer has leaves no series behind"
    )
    assert after[("reconciler_events_total", (("type", "AgentStopped"),))] >= 1
    assert (
        after[("reconciler_reconcile_duration_seconds_count", ())]
        > started[("reconciler_reconcile_duration_seconds_count", ())]
    )
    assert after[("reconciler_reconcile_duration_seconds_sum", ())] > 0
    assert ("reconciler_workqueue_depth", ()) in after
    sync_ok = (
        ("grpc_code", "OK"),
        ("grpc_method", "SyncAgentStates"),
        ("grpc_service", "reconciler.api.daemon.v1.DaemonService"),
    )
    assert after[("reconciler_grpc_server_handled_total", sync_ok)] == 2


def test_refused_rpcs_and_heartbeats_are_counted_by_code_and_reason(
    daemon: DaemonProcess,
) -> None:
    address = daemon.settings["metrics"]["listen"]
    daemon.sync(2, [])
    with pytest.raises(grpc.RpcError) as refused:
        daemon.sync(1, [])
    assert refused.value.code() is grpc.StatusCode.FAILED_PRECONDITION
    request = urllib.request.Request(
        f"http://127.0.0.1:{daemon.http_port}/heartbeat",
        data=b"{not json",
        headers={"Content-Type": "application/json"},
    )
    with pytest.raises(urllib.error.HTTPError):
        urllib.request.urlopen(request, timeout=5)
    stale = (
        ("grpc_code", "FAILED_PRECONDITION"),
        ("grpc_method", "SyncAgentStates"),
        ("grpc_service", "reconciler.api.daemon.v1.DaemonService"),
    )
    # An aborted call's status reaches the client before the server's interceptor
    # has counted it: the count is due soon after, not before the caller hears.
    wait_for(
        lambda: scrape(address).get(("reconciler_grpc_server_handled_total", stale)) == 1,
        what="the refused call counted once",
    )
    samples = scrape(address)
    rejected = {
        key[1]: value
        for key, value in samples.items()
        if key[0] == "reconciler_heartbeats_rejected_total"
    }
    assert sum(v for labels, v in rejected.items() if ("transport", "http") in labels) >= 1
    assert samples[("reconciler_heartbeats_received_total", (("transport", "http"),))] >= 1
