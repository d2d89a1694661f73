"""A keyed work queue for the control loop (the controller-runtime kind).

Events only ``add`` an agent id; workers ``get`` ids and reconcile the current
snapshot. The queue guarantees:

- an id is never handed to two workers at once;
- an id added while a worker holds it is handed out once more after ``done``;
- an id added many times before a worker takes it is handed out once;
- ``add_after`` keeps only the earliest pending timer per id;
- ``add_rate_limited`` retries a failing id with per-id exponential backoff and
  jitter, and ``forget`` resets it after a success.

It never grows beyond the number of distinct ids.
"""

from __future__ import annotations

import asyncio
import random
from collections import deque
from collections.abc import Hashable
from dataclasses import dataclass
from typing import Generic, TypeVar

__all__ = ["RetryPolicy", "WorkQueue"]

K = TypeVar("K", bound=Hashable)


@dataclass(frozen=True, slots=True)
class RetryPolicy:
    """Per-id backoff for ids whose reconcile raised."""

    initial_s: float = 0.05
    max_s: float = 30.0
    jitter: float = 0.2
    """Each delay is stretched by up to this fraction, so retries do not align."""

    def delay_s(self, failures: int, rand: random.Random) -> float:
        base = min(self.max_s, self.initial_s * 2.0 ** min(failures - 1, 60))
        return base * (1.0 + self.jitter * rand.random())


class WorkQueue(Generic[K]):
    """Deduplicating, in-flight-aware queue of keys."""

    def __init__(self, *, retry: RetryPolicy | None = None, seed: int | None = None) -> None:
        self._ready: deque[K] = deque()
        self._queued: set[K] = set()
        self._processing: set[K] = set()
        self._dirty: set[K] = set()
        self._timers: dict[K, tuple[float, asyncio.TimerHandle]] = {}
        self._failures: dict[K, int] = {}
        self._retry = retry or RetryPolicy()
        self._rand = random.Random(seed)  # noqa: S311 - jitter, not security
        self._wakeup = asyncio.Event()
        self._closed = False

    def __len__(self) -> int:
        """Ids waiting to be handed out (the queue depth)."""
        return len(self._ready)

    @property
    def in_flight(self) -> int:
        """Ids handed out and not yet done."""
        return len(self._processing)

    def add(self, key: K) -> None:
        """Ask for ``key`` to be reconciled soon."""
        if self._closed:
            return
        if key in self._processing:
            self._dirty.add(key)
            return
        if key in self._queued:
            return
        self._queued.add(key)
        self._ready.append(key)
        self._wakeup.set()

    def add_after(self, key: K, delay_s: float) -> None:
        """Ask for ``key`` after ``delay_s``; an earlier pending request wins."""
        if delay_s <= 0:
            self.add(key)
            return
        loop = asyncio.get_running_loop()
        due = loop.time() + delay_s
        pending = self._timers.get(key)
        if pending is not None:
            if pending[0] <= due:
                return
            pending[1].cancel()
        self._timers[key] = (due, loop.call_at(due, self._fire, key))

    def add_rate_limited(self, key: K) -> float:
        """Retry ``key`` after a growing, jittered delay; return the delay."""
        failures = self._failures.get(key, 0) + 1
        self._failures[key] = failures
        delay = self._retry.delay_s(failures, self._rand)
        self.add_after(key, delay)
        return delay

    def forget(self, key: K) -> None:
        """``key`` succeeded: its next failure starts the backoff afresh."""
        self._failures.pop(key, None)

    async def get(self) -> K:
        """Wait for the next key and mark it in flight. Raises CancelledError when closed."""
        while not self._ready:
            if self._closed:
                raise asyncio.CancelledError
            self._wakeup.clear()
            await self._wakeup.wait()
        key = self._ready.popleft()
        self._queued.discard(key)
        self._processing.add(key)
        return key

    def done(self, key: K) -> None:
        """The worker finished ``key``; hand it out again if it was added meanwhile."""
        self._processing.discard(key)
        if key in self._dirty:
            self._dirty.discard(key)
            self.add(key)

    def close(self) -> None:
        """Stop handing out work; waiting ``get`` calls end."""
        self._closed = True
        for _, handle in self._timers.values():
            handle.cancel()
        self._timers.clear()
        self._wakeup.set()

    def _fire(self, key: K) -> None:
        self._timers.pop(key, None)
        self.add(key)
