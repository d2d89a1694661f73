"""Pure data: ids, specs, observed records and phases, heartbeats, events, errors.

Nothing here does I/O or imports grpc, protobuf, psutil, yaml or aiohttp (checked by
import-linter). The rest of the package converts to and from these types at its edges.
"""

from reconciler.model.errors import (
    Conflict,
    InvalidArgument,
    NotFound,
    PermanentError,
    PermissionDenied,
    ReconcilerError,
    StaleGeneration,
    TemporaryError,
    Unavailable,
)
from reconciler.model.events import Event, EventType
from reconciler.model.heartbeat import Heartbeat, ReportedStatus
from reconciler.model.ids import AgentId, Generation, NodeId, OperationId
from reconciler.model.spec import (
    AgentSpec,
    DesiredState,
    HeartbeatSpec,
    NodeDesiredState,
    RestartPolicy,
    validate_node_state,
    validate_spec,
)
from reconciler.model.status import (
    AgentRecord,
    Backoff,
    ExitInfo,
    IllegalTransition,
    Override,
    Phase,
    StopRequest,
    transition,
)

__all__ = [
    "AgentId",
    "AgentRecord",
    "AgentSpec",
    "Backoff",
    "Conflict",
    "DesiredState",
    "Event",
    "EventType",
    "ExitInfo",
    "Generation",
    "Heartbeat",
    "HeartbeatSpec",
    "IllegalTransition",
    "InvalidArgument",
    "NodeDesiredState",
    "NodeId",
    "NotFound",
    "OperationId",
    "Override",
    "PermanentError",
    "PermissionDenied",
    "Phase",
    "ReconcilerError",
    "ReportedStatus",
    "RestartPolicy",
    "StaleGeneration",
    "StopRequest",
    "TemporaryError",
    "Unavailable",
    "transition",
    "validate_node_state",
    "validate_spec",
]
