"""The pure decision layer: ``reconcile`` and the record updates it relies on.

It imports only ``reconciler.model`` (checked by import-linter) and reads no clock.
"""

from reconciler.reconcile.decide import (
    Action,
    Decision,
    EnterBackoff,
    Forget,
    ResetFailures,
    SetPhase,
    Start,
    Stop,
    reconcile,
)
from reconciler.reconcile.policy import Policy

__all__ = [
    "Action",
    "Decision",
    "EnterBackoff",
    "Forget",
    "Policy",
    "ResetFailures",
    "SetPhase",
    "Start",
    "Stop",
    "reconcile",
]
