"""Load for the Manager benchmarks: simulated daemons in one process (grpc.aio).

What, one subcommand each, run as a child of ``bench.manager``:

- ``fleet``: registers ``--nodes`` node ids, reports each node's observed state, then
  every node heartbeats every ``--interval`` seconds (each at its own random phase)
  and reports its state every third heartbeat; prints ``ready`` once registered, then
  after a warm-up interval and ``--duration`` seconds a JSON line with the heartbeat
  latencies seen in that window. Nodes share ``--channels`` connections.
- ``ladder``: heartbeats of those node ids sent open-loop at each rate of ``--rates``
  for ``--step`` seconds; a JSON line per rate with its latencies; stops after the
  first rate whose p99 reaches ``--p99-limit-ms``.
- ``bare``: the comparison, a grpc.aio server whose ManagerService answers Heartbeat
  with a constant and does nothing else.
- ``daemons``: one grpc.aio DaemonService answering SyncAgentStates for ``--nodes``
  node ids registered with its address; prints ``ready``, then ``done <monotonic>``
  once every node has acknowledged a desired state holding agents.

What not: no judging (``bench.manager``).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import random
import sys
import time
from collections import Counter
from collections.abc import Sequence
from typing import Any

import grpc

from reconciler.api.agent.v1 import agent_pb2
from reconciler.api.daemon.v1 import daemon_pb2, daemon_pb2_grpc
from reconciler.api.manager.v1 import manager_pb2, manager_pb2_grpc

__all__ = ["main", "percentile"]

TIMEOUT_S = 10.0


def percentile(values: Sequence[float], fraction: float) -> float:
    """Nearest-rank percentile (nan for no values)."""
    if not values:
        return math.nan
    ordered = sorted(values)
    return ordered[max(0, math.ceil(fraction * len(ordered)) - 1)]


def node_id(prefix: str, index: int) -> str:
    return f"{prefix}-{index:05d}"


def _summary(latencies: Sequence[float], errors: Counter[str], **extra: Any) -> str:
    return json.dumps(
        {
            "count": len(latencies),
            "errors": sum(errors.values()),
            "error_codes": dict(errors),
            "p50_ms": 1000 * percentile(latencies, 0.50),
            "p99_ms": 1000 * percentile(latencies, 0.99),
            **extra,
        }
    )


class _Stubs:
    def __init__(self, target: str, channels: int) -> None:
        self.channels = [grpc.aio.insecure_channel(target) for _ in range(channels)]
        self.stubs = [manager_pb2_grpc.ManagerServiceStub(c) for c in self.channels]

    def pick(self, index: int) -> manager_pb2_grpc.ManagerServiceAsyncStub:
        return self.stubs[index % len(self.stubs)]

    async def close(self) -> None:
        for channel in self.channels:
            await channel.close()


async def _register(
    stubs: _Stubs, prefix: str, count: int, *, address: str = "", labels: dict[str, str]
) -> None:
    gate = asyncio.Semaphore(128)

    async def one(index: int) -> None:
        name = node_id(prefix, index)
        request = manager_pb2.RegisterNodeRequest(
            node_id=name, hostname=f"{name}.bench", ip="127.0.0.1", labels=labels,
            version="bench", daemon_address=address,
        )  # fmt: skip
        async with gate:
            await stubs.pick(index).RegisterNode(request, timeout=60)

    await asyncio.gather(*(one(i) for i in range(count)))


def _observed(name: str) -> manager_pb2.SyncAgentStatesRequest:
    agents = [
        agent_pb2.AgentInfo(
            agent_id=f"agent-{i}", phase=agent_pb2.AGENT_PHASE_RUNNING, pid=1000 + i
        )
        for i in range(2)
    ]
    return manager_pb2.SyncAgentStatesRequest(node_id=name, agents=agents)


async def _fleet(args: argparse.Namespace) -> None:
    stubs = _Stubs(args.target, args.channels)
    await _register(stubs, args.prefix, args.nodes, labels={"bench": "fleet"})
    print("ready", flush=True)
    started = time.monotonic()
    window_from = started + args.interval
    window_to = window_from + args.duration
    latencies: list[float] = []
    errors: Counter[str] = Counter()

    async def node(index: int) -> None:
        name = node_id(args.prefix, index)
        stub = stubs.pick(index)
        beat = 0
        await asyncio.sleep(random.random() * args.interval)
        while time.monotonic() < window_to:
            sent = time.monotonic()
            try:
                if beat % 3 == 0:
                    await stub.SyncAgentStates(_observed(name), timeout=TIMEOUT_S)
                sent = time.monotonic()
                request = manager_pb2.HeartbeatRequest(node_id=name)
                await stub.Heartbeat(request, timeout=TIMEOUT_S)
                if window_from <= sent < window_to:
                    latencies.append(time.monotonic() - sent)
            except grpc.aio.AioRpcError as error:
                errors[error.code().name] += 1
            beat += 1
            await asyncio.sleep(max(0.0, sent + args.interval - time.monotonic()))

    await asyncio.gather(*(node(i) for i in range(args.nodes)))
    print(_summary(latencies, errors, nodes=args.nodes), flush=True)
    await stubs.close()


async def _step(
    stubs: _Stubs, args: argparse.Namespace, rate: float
) -> tuple[list[float], Counter[str]]:
    latencies: list[float] = []
    errors: Counter[str] = Counter()
    tasks: set[asyncio.Task[None]] = set()

    async def call(index: int) -> None:
        sent = time.monotonic()
        request = manager_pb2.HeartbeatRequest(node_id=node_id(args.prefix, index))
        try:
            await stubs.pick(index).Heartbeat(request, timeout=TIMEOUT_S)
            latencies.append(time.monotonic() - sent)
        except grpc.aio.AioRpcError as error:
            errors[error.code().name] += 1

    began = time.monotonic()
    total = int(rate * args.step)
    for n in range(total):
        delay = began + n / rate - time.monotonic()
        if delay > 0:
            await asyncio.sleep(delay)
        task = asyncio.create_task(call(random.randrange(args.nodes)))
        tasks.add(task)
        task.add_done_callback(tasks.discard)
    if tasks:
        await asyncio.wait(tasks)
    return latencies, errors


async def _ladder(args: argparse.Namespace) -> None:
    stubs = _Stubs(args.target, args.channels)
    if args.register:
        await _register(stubs, args.prefix, args.nodes, labels={"bench": "ladder"})
    for rate in (float(r) for r in args.rates.split(",")):
        began = time.monotonic()
        latencies, errors = await _step(stubs, args, rate)
        achieved = len(latencies) / max(time.monotonic() - began, 1e-9)
        print(_summary(latencies, errors, rate=rate, achieved=achieved), flush=True)
        if sum(errors.values()) or 1000 * percentile(latencies, 0.99) >= args.p99_limit_ms:
            break
    await stubs.close()


class _BareManager(manager_pb2_grpc.ManagerServiceServicer):
    async def Heartbeat(
        self, request: manager_pb2.HeartbeatRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> manager_pb2.HeartbeatResponse:
        return manager_pb2.HeartbeatResponse(known=True, desired_generation=1)

    async def RegisterNode(
        self, request: manager_pb2.RegisterNodeRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> manager_pb2.RegisterNodeResponse:
        return manager_pb2.RegisterNodeResponse()


class _Daemons(daemon_pb2_grpc.DaemonServiceServicer):
    def __init__(self, expected: int) -> None:
        self.expected = expected
        self.acknowledged: set[str] = set()

    async def SyncAgentStates(
        self,
        request: daemon_pb2.SyncAgentStatesRequest,
        context: grpc.aio.ServicerContext[Any, Any],
    ) -> daemon_pb2.SyncAgentStatesResponse:
        if request.agents and request.node_id not in self.acknowledged:
            self.acknowledged.add(request.node_id)
            if len(self.acknowledged) == self.expected:
                print(f"done {time.monotonic()}", flush=True)
        return daemon_pb2.SyncAgentStatesResponse(
            accepted_generation=request.generation,
            current_generation=request.generation,
            observed_generation=request.generation,
        )


async def _serve(args: argparse.Namespace) -> None:
    server = grpc.aio.server(maximum_concurrent_rpcs=None)
    port = server.add_insecure_port("127.0.0.1:0")
    if args.command == "bare":
        bare = _BareManager()  # type: ignore[abstract]  # other methods answer UNIMPLEMENTED
        manager_pb2_grpc.add_ManagerServiceServicer_to_server(bare, server)
    else:
        daemons = _Daemons(args.nodes)  # type: ignore[abstract]  # only SyncAgentStates is called
        daemon_pb2_grpc.add_DaemonServiceServicer_to_server(daemons, server)
    await server.start()
    print(f"port {port}", flush=True)
    if args.command == "daemons":
        stubs = _Stubs(args.target, args.channels)
        address = f"127.0.0.1:{port}"
        await _register(stubs, args.prefix, args.nodes, address=address, labels={"bench": "fanout"})
        await stubs.close()
        print("ready", flush=True)
    await asyncio.get_running_loop().run_in_executor(None, sys.stdin.readline)
    await server.stop(0)


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m bench.manager_load")
    commands = parser.add_subparsers(dest="command", required=True)
    for name in ("fleet", "ladder", "bare", "daemons"):
        sub = commands.add_parser(name)
        sub.add_argument("--target", default="")
        sub.add_argument("--nodes", type=int, default=1000)
        sub.add_argument("--prefix", default="bench-node")
        sub.add_argument("--channels", type=int, default=16)
    commands.choices["fleet"].add_argument("--interval", type=float, default=10.0)
    commands.choices["fleet"].add_argument("--duration", type=float, default=20.0)
    ladder = commands.choices["ladder"]
    ladder.add_argument("--rates", required=True, help="comma-separated calls per second")
    ladder.add_argument("--step", type=float, default=5.0)
    ladder.add_argument("--p99-limit-ms", type=float, default=50.0)
    ladder.add_argument("--register", action="store_true")
    return parser


def main(argv: Sequence[str] | None = None) -> None:
    args = _parser().parse_args(argv)
    runners = {"fleet": _fleet, "ladder": _ladder, "bare": _serve, "daemons": _serve}
    asyncio.run(runners[args.command](args))


if __name__ == "__main__":
    main()
