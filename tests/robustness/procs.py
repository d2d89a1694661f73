"""A read-only view of the process table, independent of the daemon's own /proc code.

The invariants judge the daemon by what the kernel shows, so this module does not
reuse ``reconciler.daemon.procfs``: a bug there must not hide itself here. A process
belongs to a node when its environment holds ``RECONCILER_NODE_ID=<node>``; its agent
is ``RECONCILER_AGENT_ID``. Every agent instance the daemon starts leads a session of
its own (``start_new_session``), so an instance is a process whose pid is its session
id; what an instance forks carries the same ids without leading a session (unless it
calls setsid itself; the forking test agent marks its children).

What it does not do: signal anything or wait (``faults`` and ``runner`` do).
"""

from __future__ import annotations

import os
from dataclasses import dataclass

__all__ = ["Proc", "node_processes", "read_proc", "signals_caught", "zombie_children"]

_PROC = "/proc"


@dataclass(frozen=True, slots=True)
class Proc:
    """One live process of a node, as /proc showed it."""

    pid: int
    ppid: int
    sid: int
    state: str
    agent_id: str
    grandchild: bool = False
    """Marked ``ROBUSTNESS_GRANDCHILD=1`` by the forking test agent."""

    @property
    def instance(self) -> bool:
        """True for an agent instance (the daemon starts each in a session of its own)."""
        return self.pid == self.sid and not self.grandchild


def _stat_fields(pid: int) -> list[str] | None:
    try:
        with open(f"{_PROC}/{pid}/stat", "rb") as stat:
            text = stat.read().decode(errors="replace")
    except OSError:
        return None
    end = text.rfind(")")
    return text[end + 2 :].split() if end >= 0 else None


def _environ(pid: int) -> dict[bytes, bytes]:
    try:
        with open(f"{_PROC}/{pid}/environ", "rb") as env:
            raw = env.read()
    except OSError:
        return {}
    pairs = (entry.partition(b"=") for entry in raw.split(b"\0") if entry)
    return {name: value for name, _, value in pairs}


def read_proc(pid: int, node_id: str) -> Proc | None:
    """``pid`` as a process of ``node_id``; None when it is not one (or is gone)."""
    fields = _stat_fields(pid)
    if fields is None or fields[0] in ("Z", "X"):
        return None
    env = _environ(pid)
    if env.get(b"RECONCILER_NODE_ID") != node_id.encode():
        return None
    agent_id = env.get(b"RECONCILER_AGENT_ID", b"").decode(errors="replace")
    return Proc(
        pid=pid,
        ppid=int(fields[1]),
        sid=int(fields[3]),
        state=fields[0],
        agent_id=agent_id,
        grandchild=env.get(b"ROBUSTNESS_GRANDCHILD") == b"1",
    )


def node_processes(node_id: str) -> list[Proc]:
    """Every live (not zombie) process whose environment names ``node_id``."""
    found = []
    for name in os.listdir(_PROC):
        if name.isdigit():
            proc = read_proc(int(name), node_id)
            if proc is not None:
                found.append(proc)
    return found


def zombie_children(parent_pid: int) -> list[int]:
    """Exited, unreaped children of ``parent_pid``."""
    zombies = []
    for name in os.listdir(_PROC):
        if not name.isdigit():
            continue
        fields = _stat_fields(int(name))
        if fields is not None and fields[0] == "Z" and int(fields[1]) == parent_pid:
            zombies.append(int(name))
    return zombies


def signals_caught(pid: int) -> int:
    """The SigCgt mask of ``pid`` (bit n-1 set: signal n has a handler); 0 when gone."""
    try:
        with open(f"{_PROC}/{pid}/status") as status:
            for line in status:
                if line.startswith("SigCgt:"):
                    return int(line.split()[1], 16)
    except OSError:
        pass
    return 0
