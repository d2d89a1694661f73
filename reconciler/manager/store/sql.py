"""The SQL both database backends share: statements with ``?`` placeholders and the
row <-> record mapping.

Values always travel as parameters, never inside the text. ``postgres.py`` turns the
``?`` into psycopg's ``%s`` once, at import (no statement here contains a literal
``?``). Each backend keeps its own schema (the column types and the events sequence
differ) and its own way of serialising ``apply``.

What this module does not do: open connections or transactions.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Final

from reconciler.manager.records import (
    AgentSetRecord,
    DesiredRecord,
    EventRecord,
    HeartbeatRecord,
    MetricPointRecord,
    NodeLivenessRecord,
    NodeRecord,
    ObservedAgentRecord,
)
from reconciler.manager.store.common import (
    decode_capabilities,
    decode_labels,
    encode_capabilities,
    encode_labels,
)

__all__ = [
    "CLAIM_READINESS_MARK",
    "DELETE_AGENT_SET",
    "DELETE_NODE",
    "DELETE_OBSERVED_OF_NODE",
    "DELETE_READINESS_MARK",
    "EVENTS_AFTER",
    "EVENTS_OF_AGENT",
    "EVENTS_OF_AGENT_ANY_NODE",
    "EVENTS_OF_NODE",
    "GET_AGENT_SET",
    "GET_DESIRED",
    "GET_NODE",
    "INSERT_EVENT",
    "INSERT_METRIC",
    "INSERT_OBSERVED",
    "LIST_AGENT_SETS",
    "LIST_DESIRED",
    "LIST_LIVENESS",
    "LIST_NODES",
    "LIST_OBSERVED",
    "LIST_OBSERVED_OF_NODE",
    "PRUNE_EVENTS",
    "PRUNE_METRICS",
    "PUT_AGENT_SET",
    "PUT_DESIRED",
    "QUERY_METRICS",
    "RECORD_HEARTBEAT",
    "RECORD_HEARTBEAT_IF_NEWER",
    "SCHEMA_VERSION_CREATE",
    "SCHEMA_VERSION_INSERT",
    "SCHEMA_VERSION_SELECT",
    "UPSERT_NODE",
    "agent_set_from_row",
    "agent_set_params",
    "desired_from_row",
    "desired_params",
    "event_from_row",
    "event_params",
    "events_query",
    "heartbeat_params",
    "liveness_from_row",
    "metric_from_row",
    "metric_params",
    "node_from_row",
    "node_params",
    "observed_from_row",
    "observed_params",
]

Row = Sequence[Any]

SCHEMA_VERSION_CREATE: Final = (
    "CREATE TABLE IF NOT EXISTS schema_version ("
    " version INTEGER PRIMARY KEY, applied_at DOUBLE PRECISION NOT NULL)"
)
SCHEMA_VERSION_SELECT: Final = "SELECT COALESCE(MAX(version), 0) FROM schema_version"
SCHEMA_VERSION_INSERT: Final = "INSERT INTO schema_version (version, applied_at) VALUES (?, ?)"

# --------------------------------------------------------------------------------- nodes

GET_NODE: Final = (
    "SELECT n.node_id, n.hostname, n.ip, n.labels, n.version, n.daemon_address,"
    " n.capabilities, n.registered_at, n.last_heartbeat_at, COALESCE(d.generation, 0),"
    " n.observed_generation, n.current_generation"
    " FROM nodes AS n LEFT JOIN desired AS d ON d.node_id = n.node_id"
    " WHERE n.node_id = ?"
)
LIST_NODES: Final = (
    "SELECT n.node_id, n.hostname, n.ip, n.labels, n.version, n.daemon_address,"
    " n.capabilities, n.registered_at, n.last_heartbeat_at, COALESCE(d.generation, 0),"
    " n.observed_generation, n.current_generation"
    " FROM nodes AS n LEFT JOIN desired AS d ON d.node_id = n.node_id"
    " ORDER BY n.node_id"
)
UPSERT_NODE: Final = (
    "INSERT INTO nodes (node_id, hostname, ip, labels, version, daemon_address,"
    " capabilities, registered_at, last_heartbeat_at, observed_generation,"
    " current_generation) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)"
    " ON CONFLICT (node_id) DO UPDATE SET hostname = excluded.hostname,"
    " ip = excluded.ip, labels = excluded.labels, version = excluded.version,"
    " daemon_address = excluded.daemon_address, capabilities = excluded.capabilities,"
    " last_heartbeat_at = excluded.last_heartbeat_at,"
    " observed_generation = excluded.observed_generation,"
    " current_generation = excluded.current_generation"
    " RETURNING node_id, hostname, ip, labels, version, daemon_address, capabilities,"
    " registered_at, last_heartbeat_at,"
    " COALESCE((SELECT d.generation FROM desired AS d WHERE d.node_id = nodes.node_id), 0),"
    " observed_generation, current_generation"
)
RECORD_HEARTBEAT: Final = (
    "UPDATE nodes SET last_heartbeat_at = ?, current_generation = ?,"
    " observed_generation = ? WHERE node_id = ?"
    " RETURNING node_id, hostname, ip, labels, version, daemon_address, capabilities,"
    " registered_at, last_heartbeat_at,"
    " COALESCE((SELECT d.generation FROM desired AS d WHERE d.node_id = nodes.node_id), 0),"
    " observed_generation, current_generation"
)
RECORD_HEARTBEAT_IF_NEWER: Final = (
    "UPDATE nodes SET last_heartbeat_at = ?, current_generation = ?,"
    " observed_generation = ? WHERE node_id = ? AND last_heartbeat_at <= ?"
)
LIST_LIVENESS: Final = (
    "SELECT n.node_id, n.last_heartbeat_at, COALESCE(d.generation, 0)"
    " FROM nodes AS n LEFT JOIN desired AS d ON d.node_id = n.node_id"
    " ORDER BY n.node_id"
)
DELETE_NODE: Final = "DELETE FROM nodes WHERE node_id = ?"

# ---------------------------------------------------------------------------- AgentSets

GET_AGENT_SET: Final = (
    "SELECT name, revision, document, created_at, updated_at FROM agent_sets WHERE name = ?"
)
LIST_AGENT_SETS: Final = (
    "SELECT name, revision, document, created_at, updated_at FROM agent_sets ORDER BY name"
)
PUT_AGENT_SET: Final = (
    "INSERT INTO agent_sets (name, revision, document, created_at, updated_at)"
    " VALUES (?, ?, ?, ?, ?) ON CONFLICT (name) DO UPDATE SET"
    " revision = excluded.revision, document = excluded.document,"
    " updated_at = excluded.updated_at"
)
DELETE_AGENT_SET: Final = "DELETE FROM agent_sets WHERE name = ?"

# ------------------------------------------------------------------------------ desired

GET_DESIRED: Final = "SELECT node_id, generation, agents, updated_at FROM desired WHERE node_id = ?"
LIST_DESIRED: Final = "SELECT node_id, generation, agents, updated_at FROM desired ORDER BY node_id"
PUT_DESIRED: Final = (
    "INSERT INTO desired (node_id, generation, agents, updated_at) VALUES (?, ?, ?, ?)"
    " ON CONFLICT (node_id) DO UPDATE SET generation = excluded.generation,"
    " agents = excluded.agents, updated_at = excluded.updated_at"
)

# ----------------------------------------------------------------------------- observed

LIST_OBSERVED: Final = (
    "SELECT node_id, agent_id, info, updated_at FROM observed ORDER BY node_id, agent_id"
)
LIST_OBSERVED_OF_NODE: Final = (
    "SELECT node_id, agent_id, info, updated_at FROM observed WHERE node_id = ? ORDER BY agent_id"
)
DELETE_OBSERVED_OF_NODE: Final = "DELETE FROM observed WHERE node_id = ?"

# ------------------------------------------------------------------- readiness marks

#: Records a node's readiness change once across Manager replicas: changes a row (and
#: so counts 1) only for the first replica to record that mark.
CLAIM_READINESS_MARK: Final = (
    "INSERT INTO readiness_marks (node_id, mark) VALUES (?, ?)"
    " ON CONFLICT (node_id) DO UPDATE SET mark = excluded.mark"
    " WHERE readiness_marks.mark <> excluded.mark"
)
DELETE_READINESS_MARK: Final = "DELETE FROM readiness_marks WHERE node_id = ?"
INSERT_OBSERVED: Final = (
    "INSERT INTO observed (node_id, agent_id, info, updated_at) VALUES (?, ?, ?, ?)"
)

# ------------------------------------------------------------------------------ metrics

INSERT_METRIC: Final = (
    "INSERT INTO metrics (node_id, agent_id, time, cpu_percent, memory_bytes)"
    " VALUES (?, ?, ?, ?, ?) ON CONFLICT DO NOTHING"
)
PRUNE_METRICS: Final = "DELETE FROM metrics WHERE time < ?"
QUERY_METRICS: Final = (
    "SELECT node_id, agent_id, time, cpu_percent, memory_bytes FROM metrics"
    " WHERE node_id = ? AND agent_id = ? AND time >= ? ORDER BY time"
)

# ------------------------------------------------------------------------------- events

INSERT_EVENT: Final = (
    "INSERT INTO events (time, node_id, agent_id, type, reason, message)"
    " VALUES (?, ?, ?, ?, ?, ?) RETURNING sequence"
)
PRUNE_EVENTS: Final = "DELETE FROM events WHERE sequence <= ?"
EVENTS_AFTER: Final = (
    "SELECT sequence, time, node_id, agent_id, type, reason, message FROM events"
    " WHERE sequence > ? ORDER BY sequence LIMIT ?"
)
EVENTS_OF_NODE: Final = (
    "SELECT sequence, time, node_id, agent_id, type, reason, message FROM events"
    " WHERE node_id = ? AND sequence > ? ORDER BY sequence LIMIT ?"
)
EVENTS_OF_AGENT: Final = (
    "SELECT sequence, time, node_id, agent_id, type, reason, message FROM events"
    " WHERE node_id = ? AND agent_id = ? AND sequence > ? ORDER BY sequence LIMIT ?"
)
EVENTS_OF_AGENT_ANY_NODE: Final = (
    "SELECT sequence, time, node_id, agent_id, type, reason, message FROM events"
    " WHERE agent_id = ? AND sequence > ? ORDER BY sequence LIMIT ?"
)


def events_query(
    *, after_sequence: int, node_id: str | None, agent_id: str | None, limit: int
) -> tuple[str, tuple[object, ...]]:
    """The one fixed statement (so its index is used) and parameters for a filter."""
    if node_id is not None and agent_id is not None:
        return EVENTS_OF_AGENT, (node_id, agent_id, after_sequence, limit)
    if node_id is not None:
        return EVENTS_OF_NODE, (node_id, after_sequence, limit)
    if agent_id is not None:
        return EVENTS_OF_AGENT_ANY_NODE, (agent_id, after_sequence, limit)
    return EVENTS_AFTER, (after_sequence, limit)


# ----------------------------------------------------------------------- row <-> record


def node_params(node: NodeRecord) -> tuple[object, ...]:
    return (
        node.node_id,
        node.hostname,
        node.ip,
        encode_labels(node.labels),
        node.version,
        node.daemon_address,
        encode_capabilities(node.capabilities),
        node.registered_at,
        node.last_heartbeat_at,
        node.observed_generation,
        node.current_generation,
    )


def node_from_row(row: Row) -> NodeRecord:
    return NodeRecord(
        node_id=row[0],
        hostname=row[1],
        ip=row[2],
        labels=decode_labels(row[3]),
        version=row[4],
        daemon_address=row[5],
        capabilities=decode_capabilities(row[6]),
        registered_at=float(row[7]),
        last_heartbeat_at=float(row[8]),
        desired_generation=int(row[9]),
        observed_generation=int(row[10]),
        current_generation=int(row[11]),
    )


def heartbeat_params(beat: HeartbeatRecord) -> tuple[object, ...]:
    """Parameters of ``RECORD_HEARTBEAT_IF_NEWER``."""
    return (beat.at, beat.current_generation, beat.observed_generation, beat.node_id, beat.at)


def liveness_from_row(row: Row) -> NodeLivenessRecord:
    return NodeLivenessRecord(
        node_id=row[0], last_heartbeat_at=float(row[1]), desired_generation=int(row[2])
    )


def agent_set_params(record: AgentSetRecord) -> tuple[object, ...]:
    return (record.name, record.revision, record.document, record.created_at, record.updated_at)


def agent_set_from_row(row: Row) -> AgentSetRecord:
    return AgentSetRecord(
        name=row[0],
        revision=int(row[1]),
        document=row[2],
        created_at=float(row[3]),
        updated_at=float(row[4]),
    )


def desired_params(record: DesiredRecord) -> tuple[object, ...]:
    return (record.node_id, record.generation, record.agents, record.updated_at)


def desired_from_row(row: Row) -> DesiredRecord:
    return DesiredRecord(
        node_id=row[0], generation=int(row[1]), agents=row[2], updated_at=float(row[3])
    )


def observed_params(record: ObservedAgentRecord) -> tuple[object, ...]:
    return (record.node_id, record.agent_id, record.info, record.updated_at)


def observed_from_row(row: Row) -> ObservedAgentRecord:
    return ObservedAgentRecord(
        node_id=row[0], agent_id=row[1], info=row[2], updated_at=float(row[3])
    )


def metric_params(point: MetricPointRecord) -> tuple[object, ...]:
    return (point.node_id, point.agent_id, point.time, point.cpu_percent, point.memory_bytes)


def metric_from_row(row: Row) -> MetricPointRecord:
    return MetricPointRecord(
        node_id=row[0],
        agent_id=row[1],
        time=float(row[2]),
        cpu_percent=float(row[3]),
        memory_bytes=int(row[4]),
    )


def event_params(event: EventRecord) -> tuple[object, ...]:
    return (event.time, event.node_id, event.agent_id, event.type, event.reason, event.message)


def event_from_row(row: Row) -> EventRecord:
    return EventRecord(
        sequence=int(row[0]),
        time=float(row[1]),
        node_id=row[2],
        agent_id=row[3],
        type=row[4],
        reason=row[5],
        message=row[6],
    )
