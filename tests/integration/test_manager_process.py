"""``reconciler manager`` as a real process: it serves, and SIGTERM stops it cleanly."""

from __future__ import annotations

import asyncio
import re
import signal
import sys
from pathlib import Path

import aiohttp
import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from reconciler.api.fleet.v1 import fleet_pb2, fleet_pb2_grpc
from reconciler.api.manager.v1 import manager_pb2, manager_pb2_grpc

READY = re.compile(rb"manager ready grpc=(\S+) metrics=(\S+)")


async def test_the_manager_process_serves_and_stops_on_sigterm(tmp_path: Path) -> None:
    config = tmp_path / "manager.yaml"
    config.write_text(
        f"state_dir: {tmp_path / 'state'}\n"
        'grpc: {listen: "127.0.0.1:0"}\n'
        'metrics: {listen: "127.0.0.1:0"}\n'
        "logging: {level: info}\n"
    )
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "reconciler",
        "manager",
        "--config",
        str(config),
        stderr=asyncio.subprocess.PIPE,
    )
    assert process.stderr is not None
    try:
        match = None
        while match is None:
            line = await asyncio.wait_for(process.stderr.readline(), 30)
            assert line, "the manager exited before it was ready"
            match = READY.search(line)
        grpc_address, metrics_address = (m.decode() for m in match.groups())
        async with grpc.aio.insecure_channel(grpc_address) as channel:
            health = health_pb2_grpc.HealthStub(channel)
            answer = await health.Check(health_pb2.HealthCheckRequest(), timeout=10)
            assert answer.status == health_pb2.HealthCheckResponse.SERVING
            nodes = manager_pb2_grpc.ManagerServiceStub(channel)
            registered = await nodes.RegisterNode(
                manager_pb2.RegisterNodeRequest(node_id="n1"), timeout=10
            )
            assert registered.node_id == "n1"
        url = f"http://{metrics_address}/metrics"
        async with aiohttp.ClientSession() as session, session.get(url) as response:
            assert "reconciler_grpc_server_handled_total" in await response.text()
        process.send_signal(signal.SIGTERM)
        assert await asyncio.wait_for(process.wait(), 30) == 0
        assert (tmp_path / "state" / "manager.db").exists()
    finally:
        if process.returncode is None:
            process.kill()
            await process.wait()


async def test_sighup_restarts_the_manager_in_place_once_its_settings_load(
    tmp_path: Path,
) -> None:
    config = tmp_path / "manager.yaml"
    good = (
        f"state_dir: {tmp_path / 'state'}\n"
        'grpc: {listen: "127.0.0.1:0"}\n'
        'metrics: {listen: "127.0.0.1:0"}\n'
        "logging: {level: info}\n"
    )
    config.write_text(good)
    argv = [sys.executable, "-m", "reconciler", "manager", "--config", str(config)]
    process = await asyncio.create_subprocess_exec(*argv, stderr=asyncio.subprocess.PIPE)
    assert process.stderr is not None

    async def line_with(pattern: re.Pattern[bytes]) -> re.Match[bytes]:
        assert process.stderr is not None
        while True:
            line = await asyncio.wait_for(process.stderr.readline(), 30)
            assert line, "the manager exited"
            if found := pattern.search(line):
                return found

    try:
        first = (await line_with(READY)).group(1).decode()
        async with grpc.aio.insecure_channel(first) as channel:
            nodes = manager_pb2_grpc.ManagerServiceStub(channel)
            await nodes.RegisterNode(manager_pb2.RegisterNodeRequest(node_id="n1"), timeout=10)
        config.write_text(good + "grpc: {listen: nowhere}\n")
        process.send_signal(signal.SIGHUP)
        await line_with(re.compile(rb"SIGHUP: not restarting, the running settings stay: .*grpc"))
        config.write_text(good)
        process.send_signal(signal.SIGHUP)
        second = (await line_with(READY)).group(1).decode()
        assert process.returncode is None, "the same process, restarted in place"
        async with grpc.aio.insecure_channel(second) as channel:
            fleet = fleet_pb2_grpc.FleetServiceStub(channel)
            listed = await fleet.ListNodes(fleet_pb2.ListNodesRequest(), timeout=10)
            assert [node.node_id for node in listed.nodes] == ["n1"]
        process.send_signal(signal.SIGTERM)
        assert await asyncio.wait_for(process.wait(), 30) == 0
    finally:
        if process.returncode is None:
            process.kill()
            await process.wait()
