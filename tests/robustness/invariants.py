"""The promises the robustness runner checks, as pure functions over one observation.

An ``Observation`` is what the runner saw at one moment: the daemon's ListAgents (or
nothing, while it is down), the node's processes from /proc and the daemon's zombie
children. ``Intent`` is what the node should converge to. The functions answer with
``Gap`` values (the invariant concerned and what is wrong), empty when all is well:

- ``always``: must hold at every observation, during a fault too: at most one
  instance per agent id, no process of an agent confirmed stopped, and the daemon's
  generation never below one it acknowledged.
- ``convergence_gaps``: must be empty within the convergence bound after a fault
  clears: the generation acted on, each agent in its desired phase with exactly its
  one instance, nothing left of stopped or removed agents (grandchildren included),
  no zombies.
- ``adoption_gaps``: agents healthy before a daemon crash keep their pid.
- ``manager_gaps``: the Manager shows each agent in the daemon's phase with its pid.

What it does not do: read /proc or call anything (``procs``, ``runner``).
"""

from __future__ import annotations

import enum
from collections import defaultdict
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field

from tests.robustness.procs import Proc

__all__ = [
    "AgentView",
    "Gap",
    "Intent",
    "Invariant",
    "Observation",
    "adoption_gaps",
    "always",
    "convergence_gaps",
    "manager_gaps",
]

RUNNING = "AGENT_PHASE_RUNNING"
STOPPED = "AGENT_PHASE_STOPPED"


class Invariant(enum.StrEnum):
    """Every promise the runner checks, worded as docs/reliability.md words it."""

    ONE_INSTANCE = "at most one process per agent id"
    STOPPED_NEVER_RUNS = "an agent desired stopped never runs"
    GENERATION_SURVIVES = "every acknowledged generation survives"
    NO_ZOMBIES = "no zombies"
    NO_ORPHANS = "no orphaned grandchildren"
    CONVERGES = "the node converges within the bound"
    ADOPTED = "agents healthy before a daemon crash are adopted, not restarted"
    MANAGER_AGREES = "the Manager's view matches the daemon's"


@dataclass(frozen=True, slots=True)
class Gap:
    """One thing wrong, and the promise it breaks."""

    invariant: Invariant
    message: str

    def __str__(self) -> str:
        return f"{self.invariant}: {self.message}"


@dataclass(frozen=True, slots=True)
class AgentView:
    """One agent as a daemon or the Manager lists it."""

    agent_id: str
    phase: str
    pid: int


@dataclass(frozen=True, slots=True)
class Observation:
    """The node at one moment; ``agents`` is None while the daemon does not answer."""

    current_generation: int | None = None
    observed_generation: int | None = None
    agents: Mapping[str, AgentView] | None = None
    procs: Sequence[Proc] = ()
    zombies: Sequence[int] = ()


@dataclass(frozen=True, slots=True)
class Intent:
    """What the node should run: the generation that says so and each agent's state."""

    generation: int
    running: frozenset[str] = field(default_factory=frozenset)
    stopped: frozenset[str] = field(default_factory=frozenset)


def _instances(procs: Iterable[Proc]) -> dict[str, list[int]]:
    found: dict[str, list[int]] = defaultdict(list)
    for proc in procs:
        if proc.instance and proc.agent_id:
            found[proc.agent_id].append(proc.pid)
    return found


def always(obs: Observation, *, confirmed_stopped: Iterable[str], acked: int) -> list[Gap]:
    """What must hold at every observation, whatever fault is in progress."""
    gaps = [
        Gap(Invariant.ONE_INSTANCE, f"agent {agent_id} has instances {sorted(pids)}")
        for agent_id, pids in sorted(_instances(obs.procs).items())
        if len(pids) > 1
    ]
    stopped = set(confirmed_stopped)
    gaps += [
        Gap(Invariant.STOPPED_NEVER_RUNS, f"agent {p.agent_id} runs as pid {p.pid}")
        for p in obs.procs
        if p.agent_id in stopped
    ]
    if obs.current_generation is not None and obs.current_generation < acked:
        message = (
            f"the daemon holds generation {obs.current_generation} after acknowledging {acked}"
        )
        gaps.append(Gap(Invariant.GENERATION_SURVIVES, message))
    return gaps


def convergence_gaps(obs: Observation, intent: Intent) -> list[Gap]:
    """What still differs from ``intent``; empty once the node has converged."""
    if obs.agents is None:
        return [Gap(Invariant.CONVERGES, "the daemon does not answer")]
    gaps = _generation_gaps(obs, intent)
    gaps += _agent_gaps(obs.agents, intent)
    gaps += _process_gaps(obs, intent)
    if obs.zombies:
        gaps.append(Gap(Invariant.NO_ZOMBIES, f"unreaped children {sorted(obs.zombies)}"))
    return gaps


def _generation_gaps(obs: Observation, intent: Intent) -> list[Gap]:
    if obs.current_generation != intent.generation:
        message = f"generation {obs.current_generation}, want {intent.generation}"
        return [Gap(Invariant.CONVERGES, message)]
    if obs.observed_generation != obs.current_generation:
        message = f"observed generation {obs.observed_generation} of {obs.current_generation}"
        return [Gap(Invariant.CONVERGES, message)]
    return []


def _agent_gaps(agents: Mapping[str, AgentView], intent: Intent) -> list[Gap]:
    gaps = []
    for agent_id in sorted(intent.running):
        view = agents.get(agent_id)
        if view is None or view.phase != RUNNING or view.pid <= 0:
            gaps.append(Gap(Invariant.CONVERGES, f"agent {agent_id} is {view}, want running"))
    for agent_id in sorted(intent.stopped):
        view = agents.get(agent_id)
        if view is None or view.phase != STOPPED or view.pid != 0:
            gaps.append(Gap(Invariant.CONVERGES, f"agent {agent_id} is {view}, want stopped"))
    unwanted = set(agents) - intent.running - intent.stopped
    gaps += [Gap(Invariant.CONVERGES, f"removed agent {a} still listed") for a in sorted(unwanted)]
    return gaps


def _process_gaps(obs: Observation, intent: Intent) -> list[Gap]:
    assert obs.agents is not None
    gaps = []
    instances = _instances(obs.procs)
    for agent_id in sorted(intent.running):
        view = obs.agents.get(agent_id)
        if view is not None and instances.get(agent_id, []) != [view.pid]:
            message = (
                f"agent {agent_id} listed as pid {view.pid}, instances {instances.get(agent_id)}"
            )
            gaps.append(Gap(Invariant.CONVERGES, message))
    for proc in obs.procs:
        if proc.agent_id not in intent.running:
            gaps.append(
                Gap(Invariant.NO_ORPHANS, f"pid {proc.pid} of stopped agent {proc.agent_id}")
            )
            continue
        view = obs.agents.get(proc.agent_id)
        if view is not None and proc.sid != view.pid:
            message = f"pid {proc.pid} of agent {proc.agent_id} outlived an earlier instance"
            gaps.append(Gap(Invariant.NO_ORPHANS, message))
    return gaps


def adoption_gaps(before: Mapping[str, int], agents: Mapping[str, AgentView]) -> list[Gap]:
    """Agents that ran as ``before`` (id -> pid) and now run as another pid."""
    gaps = []
    for agent_id, pid in sorted(before.items()):
        view = agents.get(agent_id)
        if view is None or view.pid != pid:
            message = f"agent {agent_id} was pid {pid}, now {view.pid if view else 'gone'}"
            gaps.append(Gap(Invariant.ADOPTED, message))
    return gaps


def manager_gaps(daemon: Mapping[str, AgentView], manager: Mapping[str, AgentView]) -> list[Gap]:
    """Where the Manager's list of the node's agents differs from the daemon's."""
    gaps = []
    for agent_id in sorted(set(daemon) | set(manager)):
        ours, theirs = daemon.get(agent_id), manager.get(agent_id)
        if ours is None or theirs is None or (ours.phase, ours.pid) != (theirs.phase, theirs.pid):
            gaps.append(Gap(Invariant.MANAGER_AGREES, f"daemon {ours}, Manager {theirs}"))
    return gaps
