"""Shared parts of agentlet's integration tests: a Unix-socket daemon stand-in.

It holds no tests; the other tests/integration/test_agentlet_*.py modules import it.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

__all__ = ["Line", "SocketReceiver", "clean_env", "until"]

MAX_LINE_BYTES = 65_536
WIRE_FIELDS = {"agent_id", "pid", "timestamp", "version", "status", "cpu", "memory", "seq", "token"}


async def until(condition: Callable[[], bool], *, deadline_s: float = 20.0) -> None:
    """Poll ``condition`` until true; fail the test at the deadline."""
    end = time.monotonic() + deadline_s
    while not condition():
        assert time.monotonic() < end, "condition not met before the deadline"
        await asyncio.sleep(0.01)


def clean_env(**extra: str) -> dict[str, str]:
    """This process's environment without any agent settings, plus ``extra``."""
    prefixes = ("RECONCILER_", "AGENTLET_", "TRACEPARENT")
    env = {k: v for k, v in os.environ.items() if not k.startswith(prefixes)}
    env.update(extra)
    return env


@dataclass
class Line:
    """One heartbeat as received: the object, its connection number and arrival time."""

    body: dict[str, Any]
    connection: int
    arrived_s: float


@dataclass
class SocketReceiver:
    """Accepts connections on a path socket and reads heartbeat lines, as the daemon does.

    ``reject_next`` makes it answer the next line with ``{"error": ..., "field": null}``
    and close that connection. Every line is checked for the framing basics.
    """

    path: Path
    lines: list[Line] = field(default_factory=list)
    connections: int = 0
    reject_next: str | None = None
    problems: list[str] = field(default_factory=list)
    _server: asyncio.AbstractServer | None = None
    _writers: list[asyncio.StreamWriter] = field(default_factory=list)

    async def start(self) -> None:
        self._server = await asyncio.start_unix_server(
            self._serve, str(self.path), limit=MAX_LINE_BYTES
        )

    async def stop(self) -> None:
        """Go away completely: stop listening, drop connections, remove the path."""
        if self._server is not None:
            self._server.close()
            for writer in self._writers:
                writer.close()
            self._writers.clear()
            await self._server.wait_closed()
            self._server = None
        with contextlib.suppress(FileNotFoundError):
            self.path.unlink()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        number = self.connections
        self._writers.append(writer)
        try:
            while raw := await reader.readline():
                if not self._accept(raw, number, writer):
                    break
        except (ConnectionError, ValueError):
            pass
        finally:
            writer.close()

    def _accept(self, raw: bytes, number: int, writer: asyncio.StreamWriter) -> bool:
        self._check(raw)
        if self.reject_next is not None:
            answer = {"error": self.reject_next, "field": None}
            self.reject_next = None
            writer.write(json.dumps(answer).encode() + b"\n")
            return False
        self.lines.append(Line(json.loads(raw), number, time.monotonic()))
        return True

    def _check(self, raw: bytes) -> None:
        if not raw.endswith(b"\n") or len(raw) > MAX_LINE_BYTES:
            self.problems.append(f"bad framing: {raw[:80]!r}")
        body = json.loads(raw)
        if not isinstance(body, dict) or set(body) - WIRE_FIELDS:
            self.problems.append(f"unexpected fields: {body!r}")
        elif any(isinstance(value, dict | list) for value in body.values()):
            self.problems.append(f"nesting: {body!r}")
