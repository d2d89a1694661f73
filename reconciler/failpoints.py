"""Named failpoints: places where fault-injection tests can kill, fail or stall a process.

Code marks a risky step with ``failpoint("store.after_tmp_fsync")``. Normally that is
a no-op costing one dict lookup. When the environment variable ``RECONCILER_FAILPOINTS``
names the point with an action, the action runs there::

    RECONCILER_FAILPOINTS="store.after_tmp_fsync=kill;reconcile.mid_pass=sleep(0.5)"

Actions:

- ``kill``        SIGKILL this process (what a power cut or OOM kill looks like to it)
- ``raise``       raise ``FailpointError`` (an I/O error the caller must survive)
- ``sleep(S)``    block the calling thread for S seconds (a stalled disk or lock)
- ``off``         do nothing (handy to switch one point off in a list)

The variable is parsed once, at import; a malformed entry raises ``ValueError`` naming
it, because a silently ignored failpoint would make a crash test pass for nothing.
Unit tests switch points in-process with ``with failpoints.set(name, "raise"): ...``.

Failpoint names (add new ones here, next to where they are hit):

- ``store.before_write``, ``store.after_tmp_write``, ``store.after_tmp_fsync``,
  ``store.after_rename``, ``store.after_dir_fsync``: the steps of saving the desired
  state (``reconciler.daemon.store``). The same steps of the store's other files are
  ``store.overrides.*``, ``store.processes.*`` and ``store.operations.*``.
- ``controller.after_persist``: a new generation is on disk, not yet acknowledged.
- ``supervisor.after_spawn_before_record``: a child was spawned, its pid not yet saved.
- ``reconcile.mid_pass``: part way through one reconcile pass over the agents.
- ``manager.mid_push``: the Manager has pushed a generation to some nodes, not all.

What this module does not do: decide where failpoints go, or count anything while
they are off. The robustness suite (``tests/robustness``) drives them.
"""

from __future__ import annotations

import os
import re
import signal
import time
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass

__all__ = [
    "ENV_VAR",
    "Action",
    "FailpointError",
    "active",
    "failpoint",
    "hits",
    "parse",
    "set",
]

ENV_VAR = "RECONCILER_FAILPOINTS"

_NAME = re.compile(r"[a-z0-9_]+(\.[a-z0-9_]+)+")
_SLEEP = re.compile(r"sleep\((\d+(\.\d+)?)\)")
_MAX_SLEEP_S = 3600.0


class FailpointError(RuntimeError):
    """Raised at a failpoint whose action is ``raise``."""

    def __init__(self, name: str) -> None:
        super().__init__(f"failpoint {name} fired")
        self.name = name


@dataclass(frozen=True, slots=True)
class Action:
    """What a failpoint does: ``kind`` is kill, raise, sleep or off."""

    kind: str
    sleep_s: float = 0.0

    @classmethod
    def parse(cls, text: str) -> Action:
        """Parse ``kill``, ``raise``, ``off`` or ``sleep(S)``; raise ``ValueError`` otherwise."""
        text = text.strip()
        if text in ("kill", "raise", "off"):
            return cls(text)
        match = _SLEEP.fullmatch(text)
        if match is None:
            raise ValueError(f"unknown failpoint action {text!r} (kill | raise | sleep(S) | off)")
        seconds = float(match.group(1))
        if seconds > _MAX_SLEEP_S:
            raise ValueError(f"failpoint sleep {seconds} s is longer than {_MAX_SLEEP_S} s")
        return cls("sleep", seconds)


def parse(spec: str) -> dict[str, Action]:
    """Parse ``name=action;name=action``; raise ``ValueError`` naming a bad entry."""
    table: dict[str, Action] = {}
    for entry in spec.split(";"):
        entry = entry.strip()
        if not entry:
            continue
        name, sep, action = entry.partition("=")
        name = name.strip()
        if not sep or _NAME.fullmatch(name) is None:
            raise ValueError(f"{ENV_VAR}: bad entry {entry!r} (expected name=action)")
        try:
            table[name] = Action.parse(action)
        except ValueError as exc:
            raise ValueError(f"{ENV_VAR}: entry {entry!r}: {exc}") from None
    return table


_active: dict[str, Action] = parse(os.environ.get(ENV_VAR, ""))
_hits: dict[str, int] = {}


def failpoint(name: str) -> None:
    """Run the action configured for ``name``; a no-op (one dict lookup) when none is."""
    action = _active.get(name)
    if action is not None:
        _fire(name, action)


def _fire(name: str, action: Action) -> None:
    _hits[name] = _hits.get(name, 0) + 1
    if action.kind == "kill":
        os.kill(os.getpid(), signal.SIGKILL)
    elif action.kind == "raise":
        raise FailpointError(name)
    elif action.kind == "sleep":
        time.sleep(action.sleep_s)


def active() -> Mapping[str, Action]:
    """The failpoints switched on now (a copy)."""
    return dict(_active)


def hits(name: str) -> int:
    """How many times ``name`` fired while it had an action (for tests)."""
    return _hits.get(name, 0)


@contextmanager
def set(name: str, action: str | Action) -> Iterator[None]:
    """Switch ``name`` to ``action`` inside the block; restore what was there after."""
    if _NAME.fullmatch(name) is None:
        raise ValueError(f"bad failpoint name {name!r}")
    parsed = action if isinstance(action, Action) else Action.parse(action)
    previous = _active.get(name)
    _active[name] = parsed
    try:
        yield
    finally:
        if previous is None:
            _active.pop(name, None)
        else:
            _active[name] = previous
