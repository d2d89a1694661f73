"""Per-agent log files: where an agent's stdout and stderr go, and their rotation.

Each agent writes to ``<log_dir>/<agent_id>.log``, opened by the daemon with
``O_APPEND`` and handed to the agent as its stdout and stderr. A file, not a pipe:
an agent must outlive the daemon (to be adopted when it comes back), and a pipe
whose reader died would kill the agent with SIGPIPE on its next write.

Rotation is copytruncate style, because the agent holds the only descriptor: the
live file is copied to ``.1`` (older copies shift to ``.2`` ... ``.N``), then
truncated to zero. Writers opened with ``O_APPEND`` continue at the new end, so no
agent needs a signal to reopen its log. The known price of copytruncate is that
lines written between the copy and the truncate are lost; the window is one
``copy_file_range`` of at most ``max_bytes`` plus a little.

What it does not do: run on a timer (the controller calls ``rotate_all`` every few
seconds, from a thread when files are large), or ship logs anywhere.
"""

from __future__ import annotations

import contextlib
import logging
import os
from pathlib import Path

from reconciler.model.ids import AgentId, is_valid_agent_id

__all__ = ["AgentLogs"]

_log = logging.getLogger(__name__)

_DIR_MODE = 0o700
_FILE_MODE = 0o640
_COPY_CHUNK_BYTES = 1 << 20


class AgentLogs:
    """The log files of the agents of one daemon."""

    def __init__(self, log_dir: str | os.PathLike[str], *, max_bytes: int, backups: int) -> None:
        if max_bytes <= 0:
            raise ValueError(f"agents.log_max_bytes must be positive, got {max_bytes}")
        if backups < 0:
            raise ValueError(f"agents.log_backups must not be negative, got {backups}")
        self.log_dir = Path(log_dir)
        self.max_bytes = max_bytes
        self.backups = backups

    def path_for(self, agent_id: AgentId) -> Path:
        """The live log file of ``agent_id``."""
        if not is_valid_agent_id(agent_id):
            raise ValueError(f"{agent_id!r} is not a valid agent id")
        return self.log_dir / f"{agent_id}.log"

    def backup_path(self, agent_id: AgentId, index: int) -> Path:
        """The ``index``-th rotated copy (1 is the newest)."""
        return self.log_dir / f"{agent_id}.log.{index}"

    def open_for_append(self, agent_id: AgentId) -> int:
        """A new descriptor on the live file (``O_APPEND``, close-on-exec); caller closes it."""
        flags = os.O_WRONLY | os.O_CREAT | os.O_APPEND | os.O_CLOEXEC | os.O_NOFOLLOW
        path = self.path_for(agent_id)
        try:
            return os.open(path, flags, _FILE_MODE)
        except FileNotFoundError:  # the directory is made on first use
            self.log_dir.mkdir(mode=_DIR_MODE, parents=True, exist_ok=True)
            return os.open(path, flags, _FILE_MODE)

    def open_for_start(self, agent_id: AgentId) -> int:
        """``open_for_append``, rotating first when the live file reached ``max_bytes``.

        One open and one ``fstat`` on an agent's start (a separate ``stat`` of a file
        that does not exist yet costs an exception each time).
        """
        fd = self.open_for_append(agent_id)
        try:
            if os.fstat(fd).st_size >= self.max_bytes:
                self.rotate(agent_id)  # the O_APPEND descriptor writes at the new end
        except BaseException:
            os.close(fd)
            raise
        return fd

    def size_bytes(self, agent_id: AgentId) -> int:
        """The live file's size; 0 when it does not exist."""
        try:
            return self.path_for(agent_id).stat().st_size
        except FileNotFoundError:
            return 0

    def rotate_if_needed(self, agent_id: AgentId) -> bool:
        """Rotate when the live file reached ``max_bytes``; True when it did."""
        if self.size_bytes(agent_id) < self.max_bytes:
            return False
        self.rotate(agent_id)
        return True

    def rotate_all(self) -> list[AgentId]:
        """Rotate every live file that reached ``max_bytes``; return whose were rotated."""
        rotated: list[AgentId] = []
        for agent_id in self.agent_ids():
            try:
                if self.rotate_if_needed(agent_id):
                    rotated.append(agent_id)
            except OSError as error:
                _log.warning(
                    "rotating the log of %s failed: %s",
                    agent_id,
                    error,
                    extra={"agent_id": agent_id},
                )
        return rotated

    def agent_ids(self) -> list[AgentId]:
        """The agents that have a live log file here."""
        try:
            names = os.listdir(self.log_dir)
        except FileNotFoundError:
            return []
        ids = (name.removesuffix(".log") for name in names if name.endswith(".log"))
        return sorted(AgentId(name) for name in ids if is_valid_agent_id(name))

    def rotate(self, agent_id: AgentId) -> None:
        """Copy the live file to ``.1`` (shifting older copies) and truncate it."""
        live = self.path_for(agent_id)
        if self.backups > 0:
            self._shift_backups(agent_id)
            self._copy(live, self.backup_path(agent_id, 1))
        with contextlib.suppress(FileNotFoundError):
            os.truncate(live, 0)

    def read_tail(self, agent_id: AgentId, *, max_bytes: int) -> bytes:
        """The last ``max_bytes`` of the live file (for showing an agent's recent output)."""
        try:
            with open(self.path_for(agent_id), "rb") as handle:
                size = os.fstat(handle.fileno()).st_size
                handle.seek(max(0, size - max_bytes))
                return handle.read(max_bytes)
        except FileNotFoundError:
            return b""

    def _shift_backups(self, agent_id: AgentId) -> None:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.backup_path(agent_id, self.backups))
        for index in range(self.backups - 1, 0, -1):
            with contextlib.suppress(FileNotFoundError):
                os.replace(self.backup_path(agent_id, index), self.backup_path(agent_id, index + 1))

    def _copy(self, source: Path, target: Path) -> None:
        partial = target.with_name(target.name + ".partial")
        flags = os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC | os.O_NOFOLLOW
        try:
            src = os.open(source, os.O_RDONLY | os.O_CLOEXEC | os.O_NOFOLLOW)
        except FileNotFoundError:
            return
        try:
            dst = os.open(partial, flags, _FILE_MODE)
            try:
                _copy_fd(src, dst)
            finally:
                os.close(dst)
        finally:
            os.close(src)
        os.replace(partial, target)


def _copy_fd(src: int, dst: int) -> None:
    """Copy ``src`` to ``dst`` in the kernel where it can (copy_file_range), else by reads."""
    while True:
        try:
            copied = os.copy_file_range(src, dst, _COPY_CHUNK_BYTES)
        except OSError:
            break
        if copied == 0:
            return
    while chunk := os.read(src, _COPY_CHUNK_BYTES):
        view = memoryview(chunk)
        while view:
            view = view[os.write(dst, view) :]
