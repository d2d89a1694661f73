"""What every node should run: AgentSets and nodes in, per-node desired states out.

``plan`` is a pure function. Given every AgentSet as it would be after a change (one
applied or deleted), every registered node with its labels and its stored desired
state, it computes each node's new agent list (the union of the sets that select it),
diffs it against the stored one, and numbers a new generation only for nodes whose
list changed: applying the same AgentSet twice plans nothing.

A node is selected by a set whose selector is empty, lists the node's id, or whose
labels all match the node's. Two sets defining one agent id on one node is a
``AgentConflict`` naming both sets, the node and the agent. When a conflict does not
involve the set being changed (``focus``), the node keeps its stored state and the
conflict is reported in ``Plan.conflicts`` instead, so one bad pair of sets cannot
block every other change.

What it does not do: read or write the store, validate specs (``agentset.py`` does),
or push anything (``push.py``). ``fleet.py`` feeds it and writes its result.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

from reconciler.model.errors import Conflict
from reconciler.model.ids import AgentId
from reconciler.model.spec import AgentSpec

__all__ = [
    "AgentConflict",
    "NodePlan",
    "NodeSelector",
    "NodeState",
    "Plan",
    "SetDefinition",
    "desired_agents",
    "next_generation",
    "owners",
    "plan",
]


@dataclass(frozen=True, slots=True)
class NodeSelector:
    """Which nodes a set selects: empty selects every node; otherwise a node is selected
    when its id is listed or its labels contain every ``match_labels`` pair."""

    match_labels: Mapping[str, str] = field(default_factory=dict)
    node_ids: frozenset[str] = frozenset()

    def selects(self, node_id: str, labels: Mapping[str, str]) -> bool:
        """True when the node with ``node_id`` and ``labels`` is selected."""
        if not self.match_labels and not self.node_ids:
            return True
        if node_id in self.node_ids:
            return True
        return bool(self.match_labels) and all(
            labels.get(key) == value for key, value in self.match_labels.items()
        )


@dataclass(frozen=True, slots=True)
class SetDefinition:
    """One AgentSet as the planner sees it (already validated)."""

    name: str
    selector: NodeSelector
    agents: tuple[AgentSpec, ...]


@dataclass(frozen=True, slots=True)
class NodeState:
    """A registered node and its stored desired state.

    ``held_generation`` is the newest generation the node's daemon reported holding; a
    new generation is numbered above it too, so a Manager with a fresh database never
    offers a daemon a generation it would refuse as old.
    """

    node_id: str
    labels: Mapping[str, str]
    generation: int = 0
    agents: tuple[AgentSpec, ...] = ()
    held_generation: int = 0


@dataclass(frozen=True, slots=True)
class NodePlan:
    """A node's new desired state and how it differs from the stored one."""

    node_id: str
    previous_generation: int
    generation: int
    agents: tuple[AgentSpec, ...]
    added: tuple[str, ...] = ()
    changed: tuple[str, ...] = ()
    removed: tuple[str, ...] = ()


@dataclass(frozen=True, slots=True)
class Plan:
    """The nodes whose desired state changes (sorted by id), and the conflicts that
    left other nodes as they were."""

    nodes: tuple[NodePlan, ...] = ()
    conflicts: tuple[str, ...] = ()

    @property
    def changed(self) -> bool:
        """True when some node gets a new generation."""
        return bool(self.nodes)


def next_generation(node: NodeState) -> int:
    """The generation a change to ``node`` gets: above everything seen for it."""
    return max(node.generation, node.held_generation) + 1


class AgentConflict(Conflict):
    """Two AgentSets place one agent id on one node."""

    def __init__(self, *, node_id: str, agent_id: str, sets: tuple[str, str]) -> None:
        first, second = sorted(sets)
        super().__init__(
            f"agent {agent_id!r} on node {node_id!r} is defined by both AgentSet "
            f"{first!r} and AgentSet {second!r}"
        )
        self.node_id = node_id
        self.agent_id = agent_id
        self.sets = (first, second)


def _placements(
    node_id: str, labels: Mapping[str, str], sets: Sequence[SetDefinition]
) -> dict[AgentId, tuple[str, AgentSpec]]:
    """Agent id -> (set name, spec) of every agent the sets place on the node."""
    found: dict[AgentId, tuple[str, AgentSpec]] = {}
    for agent_set in sorted(sets, key=lambda s: s.name):
        if not agent_set.selector.selects(node_id, labels):
            continue
        for spec in agent_set.agents:
            if spec.id in found:
                pair = (found[spec.id][0], agent_set.name)
                raise AgentConflict(node_id=node_id, agent_id=spec.id, sets=pair)
            found[spec.id] = (agent_set.name, spec)
    return found


def owners(
    node_id: str, labels: Mapping[str, str], sets: Sequence[SetDefinition]
) -> dict[AgentId, str]:
    """Agent id -> the name of the set that places it on the node; ``AgentConflict``
    when two sets place the same id."""
    return {agent_id: name for agent_id, (name, _) in _placements(node_id, labels, sets).items()}


def desired_agents(
    node_id: str, labels: Mapping[str, str], sets: Sequence[SetDefinition]
) -> tuple[AgentSpec, ...]:
    """The node's agents, sorted by id: the union of the sets that select it."""
    placed = _placements(node_id, labels, sets)
    return tuple(placed[agent_id][1] for agent_id in sorted(placed))


def _node_plan(node: NodeState, agents: tuple[AgentSpec, ...]) -> NodePlan | None:
    old = {spec.id: spec for spec in node.agents}
    new = {spec.id: spec for spec in agents}
    added = tuple(sorted(set(new) - set(old)))
    removed = tuple(sorted(set(old) - set(new)))
    changed = tuple(sorted(i for i in set(new) & set(old) if new[i] != old[i]))
    behind = node.held_generation > node.generation and (node.generation > 0 or bool(agents))
    if not (added or removed or changed or behind):
        return None
    return NodePlan(
        node_id=node.node_id,
        previous_generation=node.generation,
        generation=next_generation(node),
        agents=agents,
        added=added,
        changed=changed,
        removed=removed,
    )


def plan(
    sets: Sequence[SetDefinition], nodes: Sequence[NodeState], *, focus: str | None = None
) -> Plan:
    """Each node's new desired state under ``sets``.

    A node gets a new generation only when its agent list differs from its stored one
    (or its daemon holds a newer generation than the store knows). A conflict that
    involves the set named ``focus`` (or any conflict, when ``focus`` is None) raises
    ``AgentConflict``; other conflicts leave their node unchanged and are listed.
    """
    planned: list[NodePlan] = []
    conflicts: list[str] = []
    for node in sorted(nodes, key=lambda n: n.node_id):
        try:
            agents = desired_agents(node.node_id, node.labels, sets)
        except AgentConflict as conflict:
            if focus is None or focus in conflict.sets:
                raise
            conflicts.append(str(conflict))
            continue
        node_plan = _node_plan(node, agents)
        if node_plan is not None:
            planned.append(node_plan)
    return Plan(nodes=tuple(planned), conflicts=tuple(conflicts))
