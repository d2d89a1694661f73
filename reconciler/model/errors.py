"""The errors reconciler raises across layers, and whether to retry them.

::

    ReconcilerError
    ├── PermanentError            retrying the same call gives the same answer
    │   ├── InvalidArgument       bad input; ``field`` names it (gRPC INVALID_ARGUMENT)
    │   ├── NotFound              no such agent, node or AgentSet (NOT_FOUND)
    │   ├── StaleGeneration       an older desired state than the one held
    │   │                         (FAILED_PRECONDITION; carries ``current``)
    │   ├── Conflict              two AgentSets claim one agent id on a node
    │   │                         (FAILED_PRECONDITION / ALREADY_EXISTS)
    │   └── PermissionDenied      the caller may not do this (PERMISSION_DENIED)
    └── TemporaryError            may succeed later; ``retry_after_s`` when known
        └── Unavailable           a dependency is away (UNAVAILABLE)

The one table that maps these to gRPC status codes lives in
``reconciler.daemon.grpc_errors``-style modules at the edge; this module knows no gRPC.
"""

from __future__ import annotations

__all__ = [
    "Conflict",
    "InvalidArgument",
    "NotFound",
    "PermanentError",
    "PermissionDenied",
    "ReconcilerError",
    "StaleGeneration",
    "TemporaryError",
    "Unavailable",
]


class ReconcilerError(Exception):
    """Base of every error reconciler raises on purpose."""


class PermanentError(ReconcilerError):
    """Retrying the same request will fail the same way."""


class TemporaryError(ReconcilerError):
    """The request may succeed later."""

    def __init__(self, message: str, *, retry_after_s: float | None = None) -> None:
        super().__init__(message)
        self.retry_after_s = retry_after_s


class Unavailable(TemporaryError):
    """A dependency (the Manager, a node, the store) cannot be reached now."""


class InvalidArgument(PermanentError):
    """Input failed validation; ``field`` is a dotted path to the bad part."""

    def __init__(self, field: str, reason: str) -> None:
        super().__init__(f"{field}: {reason}")
        self.field = field
        self.reason = reason


class NotFound(PermanentError):
    """The named thing does not exist."""

    def __init__(self, kind: str, name: str) -> None:
        super().__init__(f"{kind} {name!r} not found")
        self.kind = kind
        self.name = name


class StaleGeneration(PermanentError):
    """A desired state older than the one already held was offered."""

    def __init__(self, *, offered: int, current: int) -> None:
        super().__init__(f"generation {offered} is older than the current generation {current}")
        self.offered = offered
        self.current = current


class Conflict(PermanentError):
    """Two definitions collide (for example one agent id in two AgentSets on a node)."""


class PermissionDenied(PermanentError):
    """The caller is not allowed to do this."""
