"""forker: forks N children (argv[1], default 2) that sleep, then heartbeats. On SIGTERM it
exits 0 and leaves the children behind, so the supervisor must clean up the tree.
Prints "forker: children PID PID ..." on stdout once they exist.

Run: python3 examples/agents/forker.py [N]
"""

import asyncio
import logging
import os
import signal
import sys
import time
from pathlib import Path

try:
    import agentlet
except ImportError:  # run from a source checkout without installing
    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
    import agentlet


def fork_sleepers(count: int) -> list[int]:
    """Fork before any thread or event loop exists; each child only sleeps."""
    pids = []
    for _ in range(count):
        pid = os.fork()
        if pid == 0:
            signal.signal(signal.SIGTERM, signal.SIG_DFL)
            while True:
                time.sleep(3600)
        pids.append(pid)
    return pids


async def main() -> int:
    stop = asyncio.Event()
    asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, stop.set)
    async with agentlet.Agentlet.from_env():
        await stop.wait()
    return 0


if __name__ == "__main__":
    children = fork_sleepers(int(sys.argv[1]) if len(sys.argv) > 1 else 2)
    print("forker: children", *children, flush=True)
    logging.basicConfig(level=logging.INFO, format="%(name)s %(levelname)s %(message)s")
    sys.exit(asyncio.run(main()))
