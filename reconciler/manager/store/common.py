"""Checks and encodings every store backend shares, so they fail the same way.

What this module does not do: I/O. The backends call these before touching their data
so a bad argument changes nothing.
"""

from __future__ import annotations

import json
from collections.abc import Sequence

from reconciler.manager.records import ApplyChange, HeartbeatRecord, ObservedAgentRecord
from reconciler.model.errors import Conflict, InvalidArgument, PermanentError

__all__ = [
    "SchemaTooNew",
    "check_desired_generation",
    "check_events_args",
    "check_heartbeats",
    "check_limit",
    "check_observed",
    "check_revision",
    "decode_capabilities",
    "decode_labels",
    "encode_capabilities",
    "encode_labels",
]


class SchemaTooNew(PermanentError):
    """The database was migrated by a newer Manager; this one must not write to it."""

    def __init__(self, *, found: int, known: int) -> None:
        super().__init__(
            f"the database schema is at version {found}, newer than this Manager's {known}"
        )
        self.found = found
        self.known = known


def encode_labels(labels: dict[str, str]) -> str:
    """Labels as canonical JSON text (sorted keys)."""
    return json.dumps(labels, sort_keys=True, separators=(",", ":"))


def decode_labels(text: str) -> dict[str, str]:
    value = json.loads(text)
    return {str(k): str(v) for k, v in value.items()}


def encode_capabilities(capabilities: tuple[str, ...]) -> str:
    return json.dumps(list(capabilities), separators=(",", ":"))


def decode_capabilities(text: str) -> tuple[str, ...]:
    return tuple(str(c) for c in json.loads(text))


def check_revision(change: ApplyChange, stored: int | None) -> None:
    """``Conflict`` unless the AgentSet's stored revision is the one the caller read."""
    if change.target_name is not None and stored != change.expected_revision:
        raise Conflict(
            f"AgentSet {change.target_name!r} is at revision {stored}, "
            f"not the expected {change.expected_revision}"
        )


def check_desired_generation(node_id: str, *, offered: int, stored: int | None) -> None:
    """``Conflict`` unless ``offered`` is newer than the node's stored generation."""
    if offered <= (stored or 0):
        raise Conflict(
            f"desired generation {offered} of node {node_id!r} is not newer than {stored or 0}"
        )


def check_observed(node_id: str, agents: Sequence[ObservedAgentRecord]) -> None:
    """Every record belongs to ``node_id`` and names a distinct agent."""
    for index, agent in enumerate(agents):
        if agent.node_id != node_id:
            raise InvalidArgument(
                f"agents[{index}].node_id", f"{agent.node_id!r} is not {node_id!r}"
            )
    ids = [agent.agent_id for agent in agents]
    if len(set(ids)) != len(ids):
        raise InvalidArgument("agents", "an agent id appears more than once")


def check_heartbeats(beats: Sequence[HeartbeatRecord]) -> None:
    """Every beat names a distinct node (so a batch has one answer per node)."""
    ids = [beat.node_id for beat in beats]
    if len(set(ids)) != len(ids):
        raise InvalidArgument("beats", "a node id appears more than once")


def check_events_args(*, keep_last: int) -> None:
    if keep_last < 0:
        raise InvalidArgument("keep_last", f"{keep_last} is negative")


def check_limit(limit: int) -> None:
    if limit < 1:
        raise InvalidArgument("limit", f"{limit} is less than 1")
