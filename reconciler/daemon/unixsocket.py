"""Unix socket paths the daemon serves on: taken at start only when no one serves them,
removed at stop only when they are still the daemon's own.

A socket file outlives a daemon that was killed, so a path socket left at start is
usually stale and must go before the bind. It may also be a live one: another daemon
started with the same ``heartbeat.socket_path`` or ``grpc.unix_socket`` (a second
instance of the same unit, a trial run on a node). Unlinking it would cut that
daemon off from its agents and clients without a word, so ``claim`` first connects:
a socket someone accepts on is refused, one that refuses the connection is stale
and removed. ``remove_own`` removes the path at stop only if it is still the socket
this daemon bound (same device and inode), never a successor's.

What not: binding and serving (the heartbeat receiver and the gRPC server do that).
"""

from __future__ import annotations

import contextlib
import os
import socket
import stat

__all__ = ["SocketPathError", "claim", "identity", "remove_own"]

Identity = tuple[int, int]


class SocketPathError(RuntimeError):
    """The socket path is unusable: served by another process, or not a socket."""


def claim(path: str | os.PathLike[str]) -> None:
    """Make ``path`` free for a bind: remove a stale socket; raise ``SocketPathError``
    when something that is not a socket is there, or a process still serves it."""
    try:
        info = os.lstat(path)
    except FileNotFoundError:
        return
    if not stat.S_ISSOCK(info.st_mode):
        raise SocketPathError(
            f"{os.fspath(path)} exists and is not a socket; refusing to replace it"
        )
    why = _in_use(path)
    if why:
        raise SocketPathError(
            f"{os.fspath(path)} is served by another process ({why}); refusing to take it "
            "over: is another daemon running with this socket path?"
        )
    with contextlib.suppress(FileNotFoundError):
        os.unlink(path)


def identity(path: str | os.PathLike[str]) -> Identity | None:
    """The device and inode of the socket at ``path``; None when there is none."""
    try:
        info = os.lstat(path)
    except FileNotFoundError:
        return None
    return (info.st_dev, info.st_ino) if stat.S_ISSOCK(info.st_mode) else None


def remove_own(path: str | os.PathLike[str], own: Identity | None) -> None:
    """Remove ``path`` if it is still the socket ``own`` identifies."""
    if own is not None and identity(path) == own:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(path)


def _in_use(path: str | os.PathLike[str]) -> str:
    """Why the socket at ``path`` counts as served ("" when it is stale)."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as probe:
        probe.setblocking(False)
        try:
            probe.connect(os.fspath(path))
        except (ConnectionRefusedError, FileNotFoundError):
            return ""
        except BlockingIOError:
            return "it accepts connections"  # its backlog is full: it listens
        except OSError as error:
            return f"cannot tell: {error.strerror}"
    return "it accepts connections"
