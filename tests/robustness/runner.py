"""The scenario runner: one node under changing desired states, one fault at a time.

A ``Scenario`` owns a real daemon (``node.NodeDaemon``, inside a private mount
namespace with a small tmpfs state directory and a fake wall clock), optionally a real
Manager behind a ``FaultProxy``, and the desired state it keeps changing (``Intent``
over a small pool of agents: agentlet agents that heartbeat, plain ``/bin/sleep``
ones, and a test agent that forks and exits). ``run`` repeats, for each fault the
seeded schedule names:

1. maybe change the desired state; settle: wait for convergence, checking
   ``invariants.always`` at every poll and ``convergence_gaps`` until they clear;
2. inject the fault (``faults``), which clears it again (restarts what it killed,
   lifts what it blocked) and pushes the desired state at a new generation;
3. settle again, timing convergence from the moment the fault cleared; check that
   the healthy agents the fault did not touch kept their pid, and that the Manager
   agrees with the daemon.

The first violation stops the run with an ``AssertionError`` naming the seed, the
fault and the directory kept for inspection. ``Stats`` counts faults by kind,
invariant checks, convergence times and the Manager's lag; ``summary`` is what
docs/reliability.md quotes.

What it does not do: decide what a fault is (``faults``) or what is wrong
(``invariants``).
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import random
import signal
import sys
import time
from collections import Counter, defaultdict
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc

from reconciler.api.agent.v1 import agent_pb2
from reconciler.api.fleet.v1 import fleet_pb2
from tests.robustness import procs
from tests.robustness.invariants import (
    AgentView,
    Gap,
    Intent,
    Invariant,
    Observation,
    adoption_gaps,
    always,
    convergence_gaps,
    manager_gaps,
)
from tests.robustness.node import FakeWallClock, NodeDaemon, NodeManager, PrivateTmpfs
from tests.support.daemon import ALLOWED_WITH_PYTHON, kill_node_processes, spec
from tests.support.faultproxy import FaultProxy

__all__ = ["Profile", "Scenario", "Stats", "Violation"]

ROOT = Path(__file__).resolve().parents[2]
STEADY = ROOT / "examples" / "agents" / "steady.py"
FORKING = Path(__file__).resolve().parent / "agents" / "forking.py"

HEARTBEAT_INTERVAL_S = 0.5
HEARTBEAT_TIMEOUT_S = 6.0
GRACE_S = 1.0
#: The daemon's link to the Manager heartbeats this often (the Manager's view lag).
LINK_HEARTBEAT_S = 1.0
#: An agent seen running this long counts as healthy (its pid is on disk by then).
SETTLED_S = 1.0
POLL_S = 0.05


class Violation(AssertionError):
    """An invariant broke; the message says which, where, and how to reproduce it."""


@dataclass(frozen=True, slots=True)
class Profile:
    """How much to run: from ``RECONCILER_ROBUSTNESS`` (short | long) and overrides.

    ``RECONCILER_ROBUSTNESS_SEED`` (default: random, printed), ``..._FAULTS`` (faults
    over all scenarios), ``..._DURATION_S`` (no new fault starts after it),
    ``..._CONVERGE_S`` (the convergence bound a violation is judged by).
    """

    name: str
    seed: int
    faults: int
    duration_s: float
    converge_s: float

    @classmethod
    def from_env(cls, env: Mapping[str, str] = os.environ) -> Profile:
        name = env.get("RECONCILER_ROBUSTNESS", "short") or "short"
        if name not in ("short", "long"):
            raise ValueError(f"RECONCILER_ROBUSTNESS={name!r}: want short or long")
        long = name == "long"
        seed_text = env.get("RECONCILER_ROBUSTNESS_SEED", "")
        seed = int(seed_text) if seed_text else random.SystemRandom().randrange(2**31)
        return cls(
            name=name,
            seed=seed,
            faults=int(env.get("RECONCILER_ROBUSTNESS_FAULTS", "1100" if long else "26")),
            duration_s=float(env.get("RECONCILER_ROBUSTNESS_DURATION_S", "2400" if long else "70")),
            converge_s=float(env.get("RECONCILER_ROBUSTNESS_CONVERGE_S", "60")),
        )

    def share(self, fraction: float) -> Profile:
        """This profile scaled to one scenario's share of faults and time."""
        return Profile(
            name=self.name,
            seed=self.seed,
            faults=max(1, math.ceil(self.faults * fraction)),
            duration_s=self.duration_s * fraction,
            converge_s=self.converge_s,
        )


@dataclass
class Stats:
    """What one scenario did, for the report."""

    faults: Counter[str] = field(default_factory=Counter)
    checks: Counter[str] = field(default_factory=Counter)
    converge_s: dict[str, list[float]] = field(default_factory=lambda: defaultdict(list))
    manager_lag_s: list[float] = field(default_factory=list)
    notes: Counter[str] = field(default_factory=Counter)
    started_s: float = field(default_factory=time.monotonic)

    def summary(self) -> dict[str, Any]:
        every = sorted(t for times in self.converge_s.values() for t in times)
        return {
            "faults": sum(self.faults.values()),
            "faults_by_kind": dict(sorted(self.faults.items())),
            "invariant_checks": sum(self.checks.values()),
            "checks_by_invariant": dict(sorted(self.checks.items())),
            "violations": 0,
            "run_time_s": round(time.monotonic() - self.started_s, 1),
            "converge_s": _spread(every),
            "converge_max_s_by_kind": {
                k: round(max(v), 3) for k, v in sorted(self.converge_s.items())
            },
            "manager_lag_s": _spread(sorted(self.manager_lag_s)),
            "notes": dict(sorted(self.notes.items())),
        }


def _spread(values: list[float]) -> dict[str, float]:
    if not values:
        return {}
    pick = lambda q: values[min(len(values) - 1, int(q * len(values)))]  # noqa: E731
    return {
        "n": len(values),
        "median": round(pick(0.5), 3),
        "p99": round(pick(0.99), 3),
        "max": round(values[-1], 3),
    }


# ----------------------------------------------------------------------- agents


def agent_spec(agent_id: str, *, version: int, running: bool) -> agent_pb2.AgentSpec:
    """The pool: ``hb-*`` heartbeat (agentlet), ``sleep-*`` are plain, ``fork-*`` forks."""
    fields: dict[str, Any] = {"version": str(version), "grace": GRACE_S}
    if agent_id.startswith("hb-"):
        command: tuple[str, ...] = (sys.executable, str(STEADY))
        fields["heartbeat"] = (HEARTBEAT_INTERVAL_S, HEARTBEAT_TIMEOUT_S)
    elif agent_id.startswith("fork-"):
        command = (sys.executable, str(FORKING))
    else:
        command = ("/bin/sleep", "3600")
    message = spec(agent_id, command, **fields)
    if not running:
        message.state = agent_pb2.DESIRED_STATE_STOPPED
    return message


POOL = ("hb-1", "hb-2", "sleep-1", "sleep-2", "fork-1")


@dataclass
class DesiredAgents:
    """The desired state the runner keeps changing: id -> (version, running)."""

    agents: dict[str, tuple[int, bool]] = field(
        default_factory=lambda: dict.fromkeys(POOL, (1, True))
    )

    def specs(self) -> list[agent_pb2.AgentSpec]:
        return [
            agent_spec(agent_id, version=version, running=running)
            for agent_id, (version, running) in sorted(self.agents.items())
        ]

    def intent(self, generation: int) -> Intent:
        running = frozenset(a for a, (_, on) in self.agents.items() if on)
        stopped = frozenset(a for a, (_, on) in self.agents.items() if not on)
        return Intent(generation, running, stopped)

    def mutate(self, rng: random.Random, *, start: bool = False) -> set[str]:
        """One random change (``start``: one that starts a process); the ids it touches."""
        agent_id = rng.choice(POOL)
        version, running = self.agents.get(agent_id, (0, False))
        choice = rng.choice(("toggle", "bump", "remove"))
        if start or agent_id not in self.agents:
            self.agents[agent_id] = (version + 1, True)
        elif choice == "remove" and len(self.agents) > 3:
            del self.agents[agent_id]
        elif choice == "toggle":
            self.agents[agent_id] = (version, not running)
        else:
            self.agents[agent_id] = (version + 1, running)
        return {agent_id}


# ----------------------------------------------------------------------- scenario


class Scenario:
    """One node (and maybe a Manager) under the runner's faults."""

    def __init__(
        self,
        root: Path,
        profile: Profile,
        *,
        name: str,
        with_manager: bool,
    ) -> None:
        self.root = root
        self.profile = profile
        self.name = name
        self.rng = random.Random(f"{profile.seed}:{name}")
        self.stats = Stats()
        self.desired = DesiredAgents()
        self.generation = 0
        self.acked = 0
        self.confirmed_stopped: set[str] = set()
        self.seen_since: dict[tuple[str, int], float] = {}
        self.last_view: dict[str, AgentView] = {}
        self.fault_index = 0
        self.fault_name = "setup"
        root.mkdir(parents=True, exist_ok=True)
        self.tmpfs = PrivateTmpfs(root / "daemon" / "state")
        self.clock = FakeWallClock(root / "faketime")
        self.manager: NodeManager | None = None
        self.proxy: FaultProxy | None = None
        if with_manager:
            self.manager = NodeManager(
                root / "manager",
                settings={"push": {"timeout_s": 2.0, "max_attempts": 3}},
            )
        self.daemon = NodeDaemon(
            root / "daemon",
            node_id=f"robust-{name}-{profile.seed}",
            settings=self._daemon_settings(),
        )

    # -- lifecycle ---------------------------------------------------------------

    def _daemon_settings(self) -> dict[str, Any]:
        settings: dict[str, Any] = {
            "agents": {
                "allowed_commands": ALLOWED_WITH_PYTHON,
                "log_dir": str(self.root / "agent-logs"),
            },
            "backoff": {
                "initial_s": 1.0,
                "max_s": 2.0,
                "reset_after_s": 5.0,
                "burst_starts": 1000,
                "burst_window_s": 10.0,
            },
        }
        return settings

    def start(self) -> None:
        print(f"robustness {self.name}: seed {self.profile.seed}, state kept in {self.root}")
        self.tmpfs.start()
        self.daemon.prefix = self.tmpfs.prefix()
        self.daemon.base_env = self.clock.env()
        if self.manager is not None:
            self.manager.start()
            self.proxy = FaultProxy(target=("127.0.0.1", self.manager.grpc_port))
            port = self.proxy.start()
            self.daemon.settings["manager"] = {
                "address": f"127.0.0.1:{port}",
                "heartbeat_interval_s": LINK_HEARTBEAT_S,
                "report_interval_s": 1.0,
                "call_timeout_s": 1.0,
            }
        self.daemon.start()
        self.push_desired()
        self.settle(touched=set())

    def close(self) -> None:
        with contextlib.suppress(Exception):
            self.clock.set(0)
        self.daemon.kill()
        kill_node_processes(self.daemon.node_id)
        if self.proxy is not None:
            self.proxy.stop()
        if self.manager is not None:
            self.manager.kill()
        self.tmpfs.copy_out(self.root / "state-copy")
        self.tmpfs.stop()
        (self.root / "summary.json").write_text(json.dumps(self.stats.summary(), indent=2))

    # -- the desired state -------------------------------------------------------

    def push_desired(self) -> bool:
        """Send the desired state at a new generation; True when it was acknowledged."""
        if self.manager is not None:
            return self._apply_agent_set()
        self.generation = max(self.generation, self.acked) + 1
        try:
            self.daemon.sync(self.generation, self.desired.specs())
        except grpc.RpcError:
            return False
        self.acked = max(self.acked, self.generation)
        return True

    def _apply_agent_set(self) -> bool:
        assert self.manager is not None
        message = fleet_pb2.AgentSet(
            api_version="reconciler/v1",
            kind="AgentSet",
            metadata=fleet_pb2.AgentSetMetadata(name="robust"),
            spec=fleet_pb2.AgentSetSpec(
                node_selector=fleet_pb2.NodeSelector(node_ids=[self.daemon.node_id]),
                agents=self.desired.specs(),
            ),
        )
        with self.manager.fleet() as fleet:
            fleet.ApplyAgentSet(fleet_pb2.ApplyAgentSetRequest(agent_set=message), timeout=10)
        return True

    def change(self, *, start: bool = False) -> set[str]:
        """Change the desired state (not yet sent); the agent ids it touches."""
        touched = self.desired.mutate(self.rng, start=start)
        self.confirmed_stopped -= self.desired.intent(0).running
        return touched

    def expected_generation(self) -> int:
        if self.manager is None:
            return self.generation
        node = self.manager.nodes().get(self.daemon.node_id)
        return int(node.desired_generation) if node is not None else -1

    # -- observing ---------------------------------------------------------------

    def observe(self) -> Observation:
        processes = procs.node_processes(self.daemon.node_id)
        zombies = procs.zombie_children(self.daemon.pid) if self.daemon.alive else []
        if not self.daemon.alive:
            return Observation(procs=processes, zombies=zombies)
        try:
            listed = self.daemon.list()
        except grpc.RpcError:
            return Observation(procs=processes, zombies=zombies)
        agents = {s.info.agent_id: _view(s.info) for s in listed.agents}
        now = time.monotonic()
        for view in agents.values():
            if view.phase == "AGENT_PHASE_RUNNING":
                self.seen_since.setdefault((view.agent_id, view.pid), now)
        self.last_view = agents
        self.acked = max(self.acked, listed.current_generation)
        return Observation(
            current_generation=listed.current_generation,
            observed_generation=listed.observed_generation,
            agents=agents,
            procs=processes,
            zombies=zombies,
        )

    def check_always(self, obs: Observation) -> None:
        acked_before = self.acked
        gaps = always(obs, confirmed_stopped=self.confirmed_stopped, acked=acked_before)
        for invariant in (
            Invariant.ONE_INSTANCE,
            Invariant.STOPPED_NEVER_RUNS,
            Invariant.GENERATION_SURVIVES,
        ):
            self.stats.checks[invariant] += 1
        self.fail_on(gaps)

    def watch(self, seconds: float) -> None:
        """Keep checking the always-invariants for ``seconds`` (a fault in progress)."""
        end = time.monotonic() + seconds
        while time.monotonic() < end:
            self.check_always(self.observe())
            time.sleep(POLL_S)

    def healthy(self, *, exclude: Iterable[str] = ()) -> dict[str, int]:
        """Agents running for SETTLED_S or more: id -> pid (without ``exclude``)."""
        now = time.monotonic()
        skip = set(exclude)
        return {
            agent_id: view.pid
            for agent_id, view in self.last_view.items()
            if agent_id not in skip
            and view.phase == "AGENT_PHASE_RUNNING"
            and now - self.seen_since.get((agent_id, view.pid), now) >= SETTLED_S
        }

    def settle(self, *, touched: set[str], kept: Mapping[str, int] | None = None) -> float:
        """Wait for convergence (checking as it goes); the seconds it took."""
        started = time.monotonic()
        deadline = started + self.profile.converge_s
        gaps: list[Gap] = []
        while True:
            obs = self.observe()
            self.check_always(obs)
            try:
                intent = self.desired.intent(self.expected_generation())
            except grpc.RpcError:
                intent = None
            gaps = (
                convergence_gaps(obs, intent)
                if intent
                else [Gap(Invariant.CONVERGES, "no Manager")]
            )
            if not gaps:
                break
            if time.monotonic() > deadline:
                self.fail_on(gaps)
            time.sleep(POLL_S)
        elapsed = time.monotonic() - started
        for invariant in (Invariant.CONVERGES, Invariant.NO_ZOMBIES, Invariant.NO_ORPHANS):
            self.stats.checks[invariant] += 1
        assert obs.agents is not None
        if kept:
            self.stats.checks[Invariant.ADOPTED] += 1
            self.fail_on(
                adoption_gaps({a: p for a, p in kept.items() if a not in touched}, obs.agents)
            )
        self.confirmed_stopped = set(POOL) - intent.running if intent else set()
        if self.manager is not None:
            self._manager_agrees(obs.agents)
        return elapsed

    def _manager_agrees(self, daemon: Mapping[str, AgentView]) -> None:
        assert self.manager is not None
        started = time.monotonic()
        deadline = started + self.profile.converge_s
        while True:
            try:
                listed = self.manager.agents(self.daemon.node_id)
                theirs = {s.info.agent_id: _view(s.info) for s in listed}
                gaps = manager_gaps(daemon, theirs)
            except grpc.RpcError as error:
                gaps = [Gap(Invariant.MANAGER_AGREES, f"ListAgents failed: {error.code()}")]
            if not gaps:
                break
            if time.monotonic() > deadline:
                self.fail_on(gaps)
            time.sleep(POLL_S)
        self.stats.checks[Invariant.MANAGER_AGREES] += 1
        self.stats.manager_lag_s.append(time.monotonic() - started)

    def fail_on(self, gaps: list[Gap]) -> None:
        if not gaps:
            return
        self.tmpfs.copy_out(self.root / "state-copy")
        lines = "\n  ".join(str(g) for g in gaps)
        raise Violation(
            f"robustness {self.name}: seed {self.profile.seed}, fault #{self.fault_index} "
            f"({self.fault_name}):\n  {lines}\n"
            f"state kept in {self.root} (daemon log: {self.root / 'daemon' / 'daemon.log'})\n"
            f"reproduce: RECONCILER_ROBUSTNESS_SEED={self.profile.seed} "
            f"RECONCILER_ROBUSTNESS={self.profile.name} pytest tests/robustness"
        )

    # -- the loop ----------------------------------------------------------------

    def run(
        self,
        schedule: Callable[[Scenario], list[tuple[str, Callable[[Scenario], None]]]],
        *,
        at_least: int = 0,
    ) -> None:
        """Inject the faults ``schedule`` lists, one at a time, until the count or time
        ends (time never ends the first ``at_least``: one of each kind)."""
        ends = time.monotonic() + self.profile.duration_s
        for index, (name, inject) in enumerate(schedule(self), start=1):
            if index > at_least and time.monotonic() > ends:
                self.stats.notes["stopped early: duration reached"] += 1
                break
            self.fault_index, self.fault_name = index, name
            if self.rng.random() < 0.5:
                self.change()
                self.push_desired()
            began = time.monotonic()
            self.settle(touched=set())
            settled = time.monotonic()
            inject(self)
            self.stats.faults[name] += 1
            print(
                f"{self.name} #{index} {name}: settled {settled - began:.2f}s, "
                f"fault {time.monotonic() - settled:.2f}s",
                flush=True,
            )

    def cleared(self, name: str, *, touched: set[str], kept: Mapping[str, int] | None) -> None:
        """The fault ``name`` is over: push the desired state, settle, time it."""
        cleared_at = time.monotonic()
        self.push_desired()
        self.settle(touched=touched, kept=kept)
        self.stats.converge_s[name].append(time.monotonic() - cleared_at)


def _view(info: agent_pb2.AgentInfo) -> AgentView:
    return AgentView(info.agent_id, agent_pb2.AgentPhase.Name(info.phase), info.pid)


def kill(pid: int, signum: int = signal.SIGKILL) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, signum)
