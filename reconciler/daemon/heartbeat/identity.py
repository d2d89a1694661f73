"""Who may speak for an agent: kernel peer credentials, the process tree, the token.

What: ``peer_credentials(sock)`` reads SO_PEERCRED; ``is_same_or_descendant`` walks
the parent chain of a pid through ``/proc/<pid>/stat`` (bounded depth);
``PeerChecker`` caches those answers briefly (a connection's peer does not move, and
an agent restarted under a new pid is a new cache key); ``tokens_match`` compares
secrets in constant time.

What not: no policy about unknown agents or error answers (the receivers), no
process supervision. A pid that exits and is reused within the cache lifetime is the
known limit of pid-based identity; the token path does not have it.
"""

from __future__ import annotations

import hmac
import socket
import struct
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Final

__all__ = [
    "MAX_TREE_DEPTH",
    "PeerChecker",
    "PeerCredentials",
    "is_same_or_descendant",
    "parent_pid",
    "peer_credentials",
    "tokens_match",
]

#: How many parent links are followed before giving up (agents do not nest this deep).
MAX_TREE_DEPTH: Final = 32
_UCRED: Final = struct.Struct("3i")

ParentReader = Callable[[int], int | None]


@dataclass(frozen=True, slots=True)
class PeerCredentials:
    """The process on the other end of a Unix socket, as the kernel saw it at connect."""

    pid: int
    uid: int
    gid: int


def peer_credentials(sock: socket.socket | None) -> PeerCredentials | None:
    """SO_PEERCRED of a connected Unix socket (None when the kernel gives none)."""
    if sock is None:
        return None
    try:
        raw = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, _UCRED.size)
    except OSError:
        return None
    pid, uid, gid = _UCRED.unpack(raw)
    return PeerCredentials(pid, uid, gid) if pid > 0 else None


def parent_pid(pid: int) -> int | None:
    """The parent of ``pid`` from ``/proc/<pid>/stat`` (None when it is gone)."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as stat:
            data = stat.read()
    except OSError:
        return None
    # The command name sits in parentheses and may hold ')' and spaces: split after the last.
    fields = data.rpartition(b")")[2].split()
    try:
        return int(fields[1])
    except (IndexError, ValueError):
        return None


def is_same_or_descendant(
    peer_pid: int, agent_pid: int, *, read_parent: ParentReader = parent_pid
) -> bool:
    """True when ``peer_pid`` is ``agent_pid`` or below it in the process tree."""
    pid: int | None = peer_pid
    for _ in range(MAX_TREE_DEPTH + 1):
        if pid == agent_pid:
            return True
        if pid is None or pid <= 1:
            return False
        pid = read_parent(pid)
    return False


def tokens_match(given: str, expected: str) -> bool:
    """Constant-time comparison; an empty expected token never matches."""
    if not expected:
        return False
    return hmac.compare_digest(given.encode(), expected.encode())


class PeerChecker:
    """``is_same_or_descendant`` with a small time-bounded cache."""

    def __init__(
        self,
        *,
        ttl_s: float = 5.0,
        max_entries: int = 4096,
        read_parent: ParentReader = parent_pid,
        monotonic: Callable[[], float] = time.monotonic,
    ) -> None:
        self._ttl_s = ttl_s
        self._max_entries = max_entries
        self._read_parent = read_parent
        self._monotonic = monotonic
        self._cache: dict[tuple[int, int], tuple[bool, float]] = {}

    def is_same_or_descendant(self, peer_pid: int, agent_pid: int) -> bool:
        """As the module function, answered from the cache while fresh."""
        key = (peer_pid, agent_pid)
        now = self._monotonic()
        cached = self._cache.get(key)
        if cached is not None and cached[1] > now:
            return cached[0]
        answer = is_same_or_descendant(peer_pid, agent_pid, read_parent=self._read_parent)
        if len(self._cache) >= self._max_entries:
            self._cache.clear()
        self._cache[key] = (answer, now + self._ttl_s)
        return answer
