"""A supervisord 4 instance for comparisons: its own temp dir, Unix socket, programs.

What: ``Supervisord`` writes a configuration with one ``[program:NAME]`` per agent
(``autostart=false``, ``autorestart=true``, ``startsecs=0``, output captured to log
files as supervisord does by default, each program in its own process group as
supervisord always does), starts ``supervisord -n`` and talks XML-RPC to it over its
Unix socket (no TCP). ``close`` SIGKILLs it (its orderly shutdown stops programs one
by one, minutes for 1,000) and then every program left carrying its
``SUPERVISOR_SERVER_URL``, so nothing outlives a benchmark.

What not: no measuring (``bench.agents`` does that).
"""

from __future__ import annotations

import contextlib
import shutil
import subprocess
import sys
import time
import xmlrpc.client
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from bench.procs import kill_marked

__all__ = ["Supervisord", "supervisord_version"]

MARKER = "SUPERVISOR_PROCESS_NAME"


def supervisord_version() -> str:
    from supervisor.options import VERSION  # type: ignore[import-untyped]

    return str(VERSION)


def _executable() -> str:
    beside = Path(sys.executable).parent / "supervisord"
    found = str(beside) if beside.exists() else shutil.which("supervisord")
    if found is None:
        raise RuntimeError("supervisord is not installed: pip install -e '.[bench]'")
    return found


class Supervisord:
    """One supervisord process managing ``programs`` (name -> argv)."""

    def __init__(self, root: Path, programs: Sequence[tuple[str, Sequence[str]]]) -> None:
        self.root = root
        self.programs = list(programs)
        self.socket_path = root / "supervisor.sock"
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def server_url(self) -> str:
        return f"unix://{self.socket_path}"

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def _config(self) -> str:
        logs = self.root / "logs"
        logs.mkdir(parents=True, exist_ok=True)
        lines = [
            "[unix_http_server]",
            f"file={self.socket_path}",
            "chmod=0700",
            "[supervisord]",
            "nodaemon=true",
            f"logfile={self.root / 'supervisord.log'}",
            f"pidfile={self.root / 'supervisord.pid'}",
            f"childlogdir={logs}",
            "loglevel=warn",
            f"minfds={max(1024, 8 * len(self.programs))}",
            "[rpcinterface:supervisor]",
            "supervisor.rpcinterface_factory = supervisor.rpcinterface:make_main_rpcinterface",
            "[supervisorctl]",
            f"serverurl={self.server_url}",
        ]
        for name, argv in self.programs:
            lines += [
                f"[program:{name}]",
                f"command={' '.join(argv)}",
                "autostart=false",
                "autorestart=true",
                "startsecs=0",
                "startretries=3",
                "redirect_stderr=true",
                "stopsignal=KILL",
                "stopasgroup=true",
                "killasgroup=true",
            ]
        return "\n".join(lines) + "\n"

    def start(self, *, timeout_s: float = 60.0) -> None:
        """Start supervisord (no program yet) and wait until it answers."""
        self.root.mkdir(parents=True, exist_ok=True)
        conf = self.root / "supervisord.conf"
        conf.write_text(self._config())
        out = (self.root / "supervisord.out").open("ab")
        self.proc = subprocess.Popen(
            [_executable(), "-n", "-c", str(conf)],
            stdout=out,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            cwd=self.root,
        )
        out.close()
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"supervisord exited: {self._tail()}")
            with contextlib.suppress(OSError, xmlrpc.client.Error):
                if self.rpc().supervisor.getState()["statename"] == "RUNNING":
                    return
            time.sleep(0.05)
        raise RuntimeError(f"supervisord did not answer within {timeout_s}s: {self._tail()}")

    def rpc(self) -> Any:
        from supervisor.xmlrpc import SupervisorTransport  # type: ignore[import-untyped]

        transport = SupervisorTransport(None, None, serverurl=self.server_url)
        return xmlrpc.client.ServerProxy("http://127.0.0.1", transport=transport)

    def start_all(self) -> None:
        """Ask for every program to start, not waiting for each (its fastest way)."""
        self.rpc().supervisor.startAllProcesses(False)

    def states(self) -> dict[str, str]:
        return {
            info["name"]: info["statename"] for info in self.rpc().supervisor.getAllProcessInfo()
        }

    def close(self) -> None:
        """SIGKILL supervisord first (so nothing restarts), then every program it left."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(timeout=30)
        kill_marked(f"SUPERVISOR_SERVER_URL={self.server_url}")

    def _tail(self) -> str:
        path = self.root / "supervisord.out"
        return path.read_text(errors="replace")[-2000:] if path.exists() else ""
