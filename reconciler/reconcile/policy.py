"""The rules' numbers: crash-loop backoff, start-burst guard and heartbeat slack.

A ``Policy`` is data, built once from the daemon's settings and handed to every
``reconcile`` call, so tests can state the numbers they mean and no decision hides a
literal.
"""

from __future__ import annotations

from dataclasses import dataclass

__all__ = ["Policy"]

_MAX_DOUBLINGS = 62


@dataclass(frozen=True, slots=True)
class Policy:
    """How patient the control loop is with crashing and hanging agents."""

    backoff_initial_s: float = 1.0
    """Delay before the second restart in a row; the first restart is immediate."""
    backoff_max_s: float = 60.0
    """The delay stops doubling here."""
    backoff_reset_after_s: float = 600.0
    """Healthy for this long, an agent's crash count goes back to zero."""
    burst_starts: int = 5
    """More starts than this within ``burst_window_s`` put the agent into Backoff."""
    burst_window_s: float = 10.0
    heartbeat_late_fraction: float = 0.5
    """A heartbeat is late (Degraded) once ``interval * (1 + this)`` has passed without one,
    so ordinary scheduling jitter does not flap the phase."""

    def crash_delay_s(self, consecutive_failures: int) -> float:
        """The wait before restarting after the n-th crash in a row (n >= 1)."""
        if consecutive_failures <= 1:
            return 0.0
        doublings = min(consecutive_failures - 2, _MAX_DOUBLINGS)
        return min(self.backoff_max_s, self.backoff_initial_s * 2.0**doublings)
