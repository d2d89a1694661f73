"""Typed names for the things reconciler talks about.

Plain ``str`` and ``int`` would let a node id slip where an agent id belongs; these
``NewType`` aliases make mypy catch it at no run-time cost. Validation of their text
lives here too, so every edge (gRPC, heartbeats, YAML) applies the same rule.
"""

from __future__ import annotations

import re
from typing import NewType

__all__ = [
    "AGENT_ID_PATTERN",
    "NODE_ID_PATTERN",
    "AgentId",
    "Generation",
    "NodeId",
    "OperationId",
    "is_valid_agent_id",
    "is_valid_node_id",
]

AgentId = NewType("AgentId", str)
NodeId = NewType("NodeId", str)
OperationId = NewType("OperationId", str)
Generation = NewType("Generation", int)

#: An agent id is unique on a node: 1 to 63 characters, letters, digits, ``.``, ``_``
#: and ``-``, starting with a letter or digit (safe as a file name and a metric label).
AGENT_ID_PATTERN = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,62}")

#: A node id: like a DNS name, 1 to 253 characters.
NODE_ID_PATTERN = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,252}")


def is_valid_agent_id(text: str) -> bool:
    """True when ``text`` may name an agent."""
    return AGENT_ID_PATTERN.fullmatch(text) is not None


def is_valid_node_id(text: str) -> bool:
    """True when ``text`` may name a node."""
    return NODE_ID_PATTERN.fullmatch(text) is not None
