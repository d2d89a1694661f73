"""The node under test: a daemon process wrapped in the tools that break its world.

- ``PrivateTmpfs``: a mount namespace held by a sleeping process, with a small tmpfs
  over the daemon's state directory. Every daemon incarnation is started inside it
  (``nsenter``), so the state survives daemon restarts, and filling the tmpfs is a
  real ENOSPC for the daemon only. The runner reaches the files through
  ``/proc/<holder>/root``; ``copy_out`` keeps them for inspection.
- ``FakeWallClock``: libfaketime preloaded into the daemon, reading its offset from a
  file on every call (``FAKETIME_NO_CACHE``), with the monotonic clock left alone
  (``FAKETIME_DONT_FAKE_MONOTONIC``): writing the file jumps the daemon's wall clock.
  Agents do not inherit it (the daemon gives them a small environment of their own).
- ``FsyncFailure``: strace attached to every thread of the daemon, answering each
  fsync and fdatasync with EIO until it detaches.
- ``NodeDaemon`` and ``NodeManager``: the support helpers' processes, started with a
  command prefix and environment (failpoints included) of the runner's choosing.

The tools come from Debian packages (util-linux, strace, faketime); ``ensure_tools``
installs the missing ones with apt-get when running as root, like the PostgreSQL the
other tests use, and otherwise fails saying what to install.

What it does not do: choose or judge faults (``faults``, ``runner``).
"""

from __future__ import annotations

import contextlib
import errno
import glob
import os
import shutil
import signal
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

from tests.support.daemon import DaemonProcess, wait_for
from tests.support.manager import ManagerProcess

__all__ = [
    "FakeWallClock",
    "FsyncFailure",
    "NodeDaemon",
    "NodeManager",
    "PrivateTmpfs",
    "ToolsMissing",
    "ensure_tools",
]

#: Debian package -> a file it installs that the runner needs.
_PACKAGES = {"util-linux": "/usr/bin/nsenter", "strace": "/usr/bin/strace", "faketime": ""}


class ToolsMissing(RuntimeError):
    """A fault tool is missing and cannot be installed here."""


def _libfaketime() -> str:
    found = sorted(glob.glob("/usr/lib/*/faketime/libfaketime.so.1"))
    return found[0] if found else ""


def _missing() -> list[str]:
    missing = [pkg for pkg, path in _PACKAGES.items() if path and not os.path.exists(path)]
    if not _libfaketime():
        missing.append("faketime")
    return missing


def ensure_tools() -> None:
    """Install util-linux, strace and faketime when missing (root only)."""
    missing = _missing()
    if not missing:
        return
    if os.geteuid() != 0 or shutil.which("apt-get") is None:
        raise ToolsMissing(f"the robustness suite needs: apt-get install {' '.join(missing)}")
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    for argv in (["apt-get", "update", "-qq"], ["apt-get", "install", "-y", "-qq", *missing]):
        done = subprocess.run(argv, env=env, capture_output=True, check=False)
        if done.returncode != 0:
            raise ToolsMissing(f"{' '.join(argv)} failed:\n{done.stderr.decode()[-2000:]}")
    if _missing():
        raise ToolsMissing(f"still missing after apt-get: {_missing()}")


@dataclass
class PrivateTmpfs:
    """A tmpfs of ``size_bytes`` over ``mountpoint``, seen only inside a private namespace."""

    mountpoint: Path
    size_bytes: int = 1024 * 1024
    holder: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        self.mountpoint.mkdir(parents=True, exist_ok=True)
        self.holder = subprocess.Popen(
            ["unshare", "--mount", "--propagation", "private", "sleep", "infinity"]
        )
        ours = os.readlink("/proc/self/ns/mnt")
        wait_for(
            lambda: _readlink(f"/proc/{self.pid}/ns/mnt") not in ("", ours),
            what="the private mount namespace",
        )
        options = f"size={self.size_bytes},mode=0700"
        subprocess.run(
            [*self.prefix(), "mount", "-t", "tmpfs", "-o", options, "tmpfs", str(self.mountpoint)],
            check=True,
            capture_output=True,
        )

    @property
    def pid(self) -> int:
        assert self.holder is not None
        return self.holder.pid

    def prefix(self) -> list[str]:
        """The command prefix that runs a program inside the namespace."""
        return ["nsenter", "-t", str(self.pid), "-m", "--"]

    def inside(self, path: Path) -> Path:
        """``path`` as the namespace sees it, reachable from outside."""
        return Path(f"/proc/{self.pid}/root") / path.relative_to("/")

    def fill(self) -> int:
        """Fill the tmpfs until ENOSPC; the bytes written."""
        written, size = 0, 65536
        with open(self.inside(self.mountpoint / "filler"), "ab", buffering=0) as out:
            while size:
                try:
                    written += out.write(b"\0" * size)
                except OSError as error:
                    if error.errno != errno.ENOSPC:
                        raise
                    size //= 2
        return written

    def free(self) -> None:
        with contextlib.suppress(FileNotFoundError):
            self.inside(self.mountpoint / "filler").unlink()

    def copy_out(self, dest: Path) -> None:
        """Copy the tmpfs's files to ``dest`` (for inspection after the run)."""
        if self.holder is not None and self.holder.poll() is None:
            shutil.copytree(self.inside(self.mountpoint), dest, dirs_exist_ok=True)

    def stop(self) -> None:
        if self.holder is not None and self.holder.poll() is None:
            self.holder.kill()
            self.holder.wait(timeout=10)


def _readlink(path: str) -> str:
    try:
        return os.readlink(path)
    except OSError:
        return ""


@dataclass
class FakeWallClock:
    """The daemon's wall-clock offset, changed by writing one file."""

    path: Path
    offset_s: int = 0

    def __post_init__(self) -> None:
        self.set(0)

    def env(self) -> dict[str, str]:
        return {
            "LD_PRELOAD": _libfaketime(),
            "FAKETIME_TIMESTAMP_FILE": str(self.path),
            "FAKETIME_NO_CACHE": "1",
            "FAKETIME_DONT_FAKE_MONOTONIC": "1",
        }

    def set(self, offset_s: int) -> None:
        """Jump the daemon's wall clock to ``offset_s`` from the real one."""
        tmp = self.path.with_suffix(".tmp")
        tmp.write_text(f"{offset_s:+d}\n")
        tmp.replace(self.path)
        self.offset_s = offset_s


@dataclass
class FsyncFailure:
    """strace on every thread of ``pid``: fsync and fdatasync fail with EIO until ``stop``."""

    pid: int
    log: Path
    proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        with self.log.open("ab") as log:
            self.proc = subprocess.Popen(
                [
                    "strace", "-f", "-qq", "-o", "/dev/null", "-p", str(self.pid),
                    "-e", "trace=fsync,fdatasync",
                    "-e", "inject=fsync,fdatasync:error=EIO",
                ],
                stdout=log,
                stderr=log,
            )  # fmt: skip
        wait_for(self._attached, timeout_s=10.0, what=f"strace attached to {self.pid}")

    def _attached(self) -> bool:
        assert self.proc is not None
        if self.proc.poll() is not None:
            raise AssertionError(f"strace exited with {self.proc.returncode}")
        tasks = glob.glob(f"/proc/{self.pid}/task/*/status")
        return bool(tasks) and all(_tracer(path) == self.proc.pid for path in tasks)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGINT)
            self.proc.wait(timeout=10)


def _tracer(status_path: str) -> int:
    try:
        with open(status_path) as status:
            for line in status:
                if line.startswith("TracerPid:"):
                    return int(line.split()[1])
    except OSError:
        pass
    return -1


@dataclass
class NodeDaemon(DaemonProcess):
    """A DaemonProcess started through ``prefix`` with ``extra_env`` (per start)."""

    prefix: list[str] = field(default_factory=list)
    base_env: dict[str, str] = field(default_factory=dict)

    def start(self, *, timeout_s: float = 30.0) -> None:
        self.write_config()
        argv = [sys.executable, "-m", "reconciler", "daemon", "--config", str(self.config_path)]
        with (self.root / "daemon.log").open("ab") as log:
            self.proc = subprocess.Popen(
                [*self.prefix, *argv],
                stdout=log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                env={**os.environ, **self.base_env, **self.env},
            )
        wait_for(self._serving, timeout_s=timeout_s, what=f"daemon {self.node_id} to serve")

    @property
    def pid(self) -> int:
        return self.proc.pid if self.proc is not None else 0

    @property
    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None


@dataclass
class NodeManager(ManagerProcess):
    """A ManagerProcess whose next start carries ``failpoints`` (RECONCILER_FAILPOINTS)."""

    failpoints: str = ""

    def start(self, *, timeout_s: float = 30.0) -> None:
        self.write_config()
        env = {k: v for k, v in os.environ.items() if not k.startswith("RECONCILER_")}
        if self.failpoints:
            env["RECONCILER_FAILPOINTS"] = self.failpoints
        with self.log_path.open("ab") as log:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "reconciler", "manager", "--config", str(self.config_path)],
                stdout=log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                env=env,
            )
        wait_for(self._serving, timeout_s=timeout_s, what="the manager to serve")

    def wait_exit(self, *, timeout_s: float = 30.0) -> int:
        assert self.proc is not None
        return self.proc.wait(timeout=timeout_s)
