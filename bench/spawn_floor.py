"""The floor of bringing agents up from Python: a bare loop of ``subprocess.Popen``.

What: a child process that, told ``go`` on stdin, spawns ``count`` agents one after
the other through the daemon's own ``spawn_process`` (argv list, own session, stdin
from /dev/null, stdout and stderr appended to a new per-agent log file, an
environment naming the agent, a working directory), and nothing else: no desired
state, no validation, no records, no events, no RPC. The benchmark times it with the
same /proc scan it uses for the daemon and supervisord, so the figure says how much of
a start is the kernel's fork and exec on this machine and how much is the daemon's.
It kills its agents when stdin closes.

Run by ``bench.agents`` as ``python -m bench.spawn_floor --count N --dir DIR``.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import signal
import sys

from reconciler.daemon.supervisor import spawn_process

__all__ = ["MARKER", "main"]

MARKER = "BENCH_FLOOR_AGENT"


def _spawn(index: int, argv: list[str], log_dir: str) -> int:
    name = f"agent-{index:04d}"
    flags = os.O_WRONLY | os.O_CREAT | os.O_APPEND | os.O_CLOEXEC | os.O_NOFOLLOW
    log_fd = os.open(os.path.join(log_dir, f"{name}.log"), flags, 0o600)
    try:  # the daemon's own spawn: the same Popen call, nothing around it
        env = {"PATH": os.defpath, MARKER: name}
        return spawn_process(tuple(argv), cwd=log_dir, env=env, user=None, log_fd=log_fd)
    finally:
        os.close(log_fd)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--count", type=int, required=True)
    parser.add_argument("--dir", required=True, help="where the agents' log files go")
    parser.add_argument("argv", nargs="*", default=["/bin/sleep", "3600"])
    args = parser.parse_args()
    os.makedirs(args.dir, mode=0o700, exist_ok=True)
    print("ready", flush=True)
    if sys.stdin.readline().strip() != "go":
        return
    pids = [_spawn(index, args.argv, args.dir) for index in range(args.count)]
    print("done", flush=True)
    sys.stdin.read()  # until the benchmark closes stdin
    for pid in pids:
        with contextlib.suppress(OSError):
            os.killpg(pid, signal.SIGKILL)
    for pid in pids:
        with contextlib.suppress(ChildProcessError):
            os.waitpid(pid, 0)


if __name__ == "__main__":
    main()
