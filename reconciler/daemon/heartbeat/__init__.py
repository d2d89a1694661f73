"""The daemon's heartbeat receivers: a Unix socket (JSON lines) and HTTP, one decoder.

Modules, in reading order:

- ``contract``: the Protocols the controller implements (``AgentDirectory``,
  ``HeartbeatSink``), ``AgentIdentity``, rejection reasons, and fakes for tests;
- ``codec``: ``decode_heartbeat``, the single validating decoder of both transports;
- ``identity``: SO_PEERCRED, the process-tree check and token comparison;
- ``stats``: counters shared by the receivers, snapshots, and rows for Prometheus;
- ``unix`` and ``http``: the receivers, each with ``async start()`` / ``async stop()``.

The sink decides what a heartbeat means (liveness, unmanaged agents); the receivers
only validate, authenticate, count and hand over. The wire contract is
``api/heartbeat.md``.
"""

from __future__ import annotations

from reconciler.daemon.heartbeat.codec import DecodedHeartbeat, HeartbeatError, decode_heartbeat
from reconciler.daemon.heartbeat.contract import (
    MAX_FRAME_BYTES,
    AgentDirectory,
    AgentIdentity,
    FakeAgentDirectory,
    HeartbeatSink,
    RecordedHeartbeat,
    RecordingSink,
    RejectReason,
    Transport,
)
from reconciler.daemon.heartbeat.http import HttpHeartbeatReceiver, HttpReceiverConfig, parse_listen
from reconciler.daemon.heartbeat.identity import PeerChecker, is_same_or_descendant, tokens_match
from reconciler.daemon.heartbeat.stats import HeartbeatStats, Sample, StatsSnapshot
from reconciler.daemon.heartbeat.unix import (
    SocketPathError,
    UnixHeartbeatReceiver,
    UnixReceiverConfig,
)

__all__ = [
    "MAX_FRAME_BYTES",
    "AgentDirectory",
    "AgentIdentity",
    "DecodedHeartbeat",
    "FakeAgentDirectory",
    "HeartbeatError",
    "HeartbeatSink",
    "HeartbeatStats",
    "HttpHeartbeatReceiver",
    "HttpReceiverConfig",
    "PeerChecker",
    "RecordedHeartbeat",
    "RecordingSink",
    "RejectReason",
    "Sample",
    "SocketPathError",
    "StatsSnapshot",
    "Transport",
    "UnixHeartbeatReceiver",
    "UnixReceiverConfig",
    "decode_heartbeat",
    "is_same_or_descendant",
    "parse_listen",
    "tokens_match",
]
