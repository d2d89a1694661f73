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

``last_line`` reads back what a process printed last, for the message of a failed
exit ("exited with code 2: error: no such file /etc/shipper.yaml"), as Kubernetes'
``FallbackToLogsOnError`` does for a container's termination message.

What it does not do: run on a timer (the controller calls ``rotate_all`` every few
seconds, from a thread when files are large), or ship logs anywhere.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import re
import stat
from pathlib import Path

from reconciler.model.ids import AgentId, is_valid_agent_id

__all__ = ["LAST_LINE_MAX_CHARS", "AgentLogs", "printable_line"]

_log = logging.getLogger(__name__)

_DIR_MODE = 0o700
_FILE_MODE = 0o640
_COPY_CHUNK_BYTES = 1 << 20
_LAST_LINE_READ_BYTES = 4096
"""How far back from the end ``last_line`` reads."""
LAST_LINE_MAX_CHARS = 200
_TERMINAL_SEQUENCE = re.compile(
    r"\x1b(\[[0-?]*[ -/]*[@-~]|\][^\x07\x1b]*(\x07|\x1b\\)?|[ -/]*[0-~])"
)
"""CSI (colours, cursor moves), OSC (titles, links) and the other escape sequences."""


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
        self._output_start: dict[AgentId, int] = {}
        """Per agent, the offset where its newest process's output begins."""

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
        return self._open_live(agent_id)[0]

    def open_for_start(self, agent_id: AgentId) -> int:
        """``open_for_append``, rotating first when the live file reached ``max_bytes``,
        for a new process of ``agent_id``: where its output begins is kept for
        ``last_line``.

        One open, one ``fstat`` and one ``fcntl`` on an agent's start (a separate
        ``stat`` of a file that does not exist yet costs an exception each time).
        """
        fd, info = self._open_live(agent_id)
        size = info.st_size
        try:
            if size >= self.max_bytes:
                self.rotate(agent_id)  # the O_APPEND descriptor writes at the new end
                size = 0
        except BaseException:
            os.close(fd)
            raise
        self._output_start[agent_id] = size
        return fd

    def _open_live(self, agent_id: AgentId) -> tuple[int, os.stat_result]:
        """The live file opened for appending, and its status. Opened without blocking
        and refused unless it is a regular file: an agent running as the daemon's user
        could put a FIFO in its place, whose open would wait for a reader forever."""
        flags = os.O_WRONLY | os.O_CREAT | os.O_APPEND | os.O_CLOEXEC | os.O_NOFOLLOW
        flags |= os.O_NONBLOCK
        path = self.path_for(agent_id)
        not_regular = OSError(errno.EINVAL, f"{path} is not a regular file")
        try:
            try:
                fd = os.open(path, flags, _FILE_MODE)
            except FileNotFoundError:  # the directory is made on first use
                self.log_dir.mkdir(mode=_DIR_MODE, parents=True, exist_ok=True)
                fd = os.open(path, flags, _FILE_MODE)
        except OSError as error:
            if error.errno == errno.ENXIO:  # a FIFO (or a device) no one reads
                raise not_regular from None
            raise
        try:
            info = os.fstat(fd)
            if not stat.S_ISREG(info.st_mode):
                raise not_regular
            os.set_blocking(fd, True)  # the agent gets ordinary stdout and stderr
        except BaseException:
            os.close(fd)
            raise
        return fd, info

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
        if agent_id in self._output_start:
            self._output_start[agent_id] = 0

    def last_line(self, agent_id: AgentId) -> str:
        """The last non-blank line the newest process of ``agent_id`` (started through
        ``open_for_start``) wrote, made safe to show (``printable_line``); "" when it
        wrote none, it was not started here, or the file cannot be read.

        Only what follows the process's start is read, so an earlier process's output
        is never taken for this one's; a rotation moves that start to the beginning of
        the truncated file. Reads at most the last 4 KiB.
        """
        since = self._output_start.get(agent_id)
        if since is None:
            return ""
        flags = os.O_RDONLY | os.O_CLOEXEC | os.O_NOFOLLOW | os.O_NONBLOCK
        try:
            fd = os.open(self.path_for(agent_id), flags)
        except OSError:
            return ""
        try:
            info = os.fstat(fd)
            if not stat.S_ISREG(info.st_mode):
                return ""
            size = info.st_size
            # Shorter than its start: truncated by a rotation this object did not make.
            start = max(since if size >= since else 0, size - _LAST_LINE_READ_BYTES)
            data = os.pread(fd, size - start, start)
        except OSError:
            return ""
        finally:
            os.close(fd)
        for line in reversed(data.decode("utf-8", errors="replace").split("\n")):
            if shown := printable_line(line):
                return shown
        return ""

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


def printable_line(text: str) -> str:
    """``text`` as one line safe for a terminal and a status message: terminal escape
    sequences dropped, other unprintable characters (controls, bidi overrides) and
    runs of white space made one space, cut to ``LAST_LINE_MAX_CHARS``."""
    text = _TERMINAL_SEQUENCE.sub("", text)
    shown = " ".join("".join(c if c.isprintable() else " " for c in text).split())
    if len(shown) > LAST_LINE_MAX_CHARS:
        shown = shown[: LAST_LINE_MAX_CHARS - 1] + "…"
    return shown


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
