"""A cheap heartbeat sender for the soak test: one process, many agent ids.

Run as ``python sender.py AGENTS_JSON SOCKET PERIOD_S``. ``AGENTS_JSON`` maps agent id
to pid and is replaced (renamed over) by the test as agents churn; the sender re-reads
it when it changes. Each agent's token is read once from its ``/proc/<pid>/environ``
(``RECONCILER_AGENT_TOKEN``), and every ``PERIOD_S`` one line per agent goes over one
Unix connection, carrying the token (the sender is not the agents' process). A
refusal (an agent that churned away) closes the connection; the sender reconnects.
Counts go to stdout as one JSON line per period.
"""

from __future__ import annotations

import json
import socket
import sys
import time
from pathlib import Path

__all__ = ["main"]


def token_of(pid: int) -> str | None:
    try:
        with open(f"/proc/{pid}/environ", "rb") as environ:
            for entry in environ.read().split(b"\0"):
                if entry.startswith(b"RECONCILER_AGENT_TOKEN="):
                    return entry.split(b"=", 1)[1].decode()
    except OSError:
        return None
    return None


def line(agent_id: str, pid: int, token: str, seq: int) -> bytes:
    body = {
        "agent_id": agent_id,
        "pid": pid,
        "timestamp": time.time(),
        "version": "soak",
        "status": "healthy",
        "cpu": 0.0,
        "memory": 0,
        "seq": seq,
        "token": token,
    }
    return json.dumps(body, separators=(",", ":")).encode() + b"\n"


def connect(path: str) -> socket.socket:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.connect(path)
    sock.setblocking(False)
    return sock


def main(agents_file: str, socket_path: str, period_s: float) -> None:
    agents: dict[str, int] = {}
    tokens: dict[tuple[str, int], str] = {}
    stamp = 0
    sock = connect(socket_path)
    seq = 0
    while True:
        started = time.monotonic()
        mtime = Path(agents_file).stat().st_mtime_ns
        if mtime != stamp:
            stamp = mtime
            agents = json.loads(Path(agents_file).read_text())
        sent = reconnects = 0
        seq += 1
        batch = bytearray()
        for agent_id, pid in agents.items():
            token = tokens.get((agent_id, pid)) or token_of(pid)
            if token is None:
                continue
            tokens[(agent_id, pid)] = token
            batch += line(agent_id, pid, token, seq)
            sent += 1
        try:
            sock.setblocking(True)
            sock.sendall(bytes(batch))
            sock.setblocking(False)
            try:
                if sock.recv(4096):  # a refusal: the daemon closes after it
                    raise ConnectionResetError
            except BlockingIOError:
                pass
        except OSError:
            sock.close()
            sock = connect(socket_path)
            reconnects += 1
        print(json.dumps({"sent": sent, "reconnects": reconnects}), flush=True)
        time.sleep(max(0.0, period_s - (time.monotonic() - started)))


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2], float(sys.argv[3]))
