"""The values the Manager's store reads and writes: frozen records, no protobuf.

Documents (an AgentSet, a node's agent specs, an agent's observed info) travel as JSON
text in protobuf's canonical JSON mapping; the store keeps them opaque and never parses
them, so the wire contract has one owner (``reconciler.convert``). Times are wall-clock
Unix seconds as ``float``.

What this module does not do: talk to a database (``reconciler.manager.store``) or
decide anything (``reconciler.manager.plan``). ``ApplyChange`` checks only its own
shape; whether it fits the stored state is the store's question.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from reconciler.model.errors import InvalidArgument

__all__ = [
    "AgentSetRecord",
    "ApplyChange",
    "DesiredRecord",
    "EventRecord",
    "HeartbeatRecord",
    "MetricPointRecord",
    "NodeLivenessRecord",
    "NodeRecord",
    "ObservedAgentRecord",
]


@dataclass(frozen=True, slots=True)
class NodeRecord:
    """A registered node.

    ``desired_generation`` is derived from the node's ``DesiredRecord`` (0 when it has
    none): the store ignores it on ``upsert_node`` and fills it on every read, so it is
    never stored twice. ``current_generation`` is the generation the daemon holds,
    ``observed_generation`` the newest one it has fully acted on.
    """

    node_id: str
    hostname: str
    ip: str
    labels: dict[str, str]
    version: str
    daemon_address: str
    capabilities: tuple[str, ...]
    registered_at: float
    last_heartbeat_at: float
    desired_generation: int = 0
    observed_generation: int = 0
    current_generation: int = 0


@dataclass(frozen=True, slots=True)
class HeartbeatRecord:
    """One heartbeat of a node: when, and the generations its daemon reported."""

    node_id: str
    at: float
    current_generation: int
    observed_generation: int


@dataclass(frozen=True, slots=True)
class NodeLivenessRecord:
    """The lean view of a node that heartbeat answers and readiness need."""

    node_id: str
    last_heartbeat_at: float
    desired_generation: int


@dataclass(frozen=True, slots=True)
class AgentSetRecord:
    """An applied AgentSet; ``document`` is the JSON of a ``fleet.v1.AgentSet``.

    ``revision`` grows by at least one on every change and is what ``apply`` compares
    for optimistic concurrency.
    """

    name: str
    revision: int
    document: str
    created_at: float
    updated_at: float


@dataclass(frozen=True, slots=True)
class DesiredRecord:
    """A node's desired agents: ``agents`` is a JSON array of ``agent.v1.AgentSpec``."""

    node_id: str
    generation: int
    agents: str
    updated_at: float


@dataclass(frozen=True, slots=True)
class ObservedAgentRecord:
    """One agent as its daemon last reported it: ``info`` is a ``agent.v1.AgentInfo``."""

    node_id: str
    agent_id: str
    info: str
    updated_at: float


@dataclass(frozen=True, slots=True)
class MetricPointRecord:
    """One sample of an agent's resource use."""

    node_id: str
    agent_id: str
    time: float
    cpu_percent: float
    memory_bytes: int


@dataclass(frozen=True, slots=True)
class EventRecord:
    """Something that happened to a node or an agent.

    ``sequence`` is assigned by the store (pass 0 when adding); it grows with every
    event added, so a reader can follow the stream with ``after_sequence``.
    """

    sequence: int
    time: float
    node_id: str
    agent_id: str | None
    type: str
    reason: str
    message: str


@dataclass(frozen=True, slots=True)
class ApplyChange:
    """One atomic change: put or delete an AgentSet, and the nodes' new desired states.

    ``expected_revision`` is the revision of the AgentSet the caller read, ``None``
    when it read none: a put or delete succeeds only while the stored revision (``None``
    when absent) still equals it. A change with neither ``agent_set`` nor
    ``delete_name`` only writes ``desired`` (a node's labels changed, say) and must
    leave ``expected_revision`` as ``None``. Every ``DesiredRecord`` must carry a
    generation greater than the node's stored one.
    """

    agent_set: AgentSetRecord | None = None
    delete_name: str | None = None
    expected_revision: int | None = None
    desired: tuple[DesiredRecord, ...] = field(default_factory=tuple)

    def __post_init__(self) -> None:
        if self.agent_set is not None and self.delete_name is not None:
            raise InvalidArgument("delete_name", "cannot put and delete in one change")
        if self.target_name is None and self.expected_revision is not None:
            raise InvalidArgument("expected_revision", "needs an agent_set or delete_name")
        if self.agent_set is not None and self.agent_set.revision <= (self.expected_revision or 0):
            raise InvalidArgument(
                "agent_set.revision",
                f"{self.agent_set.revision} must be greater than "
                f"expected_revision {self.expected_revision}",
            )
        node_ids = [d.node_id for d in self.desired]
        if len(set(node_ids)) != len(node_ids):
            raise InvalidArgument("desired", "a node appears more than once")

    @property
    def target_name(self) -> str | None:
        """The AgentSet this change puts or deletes, if any."""
        return self.agent_set.name if self.agent_set is not None else self.delete_name
