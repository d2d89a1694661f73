"""hanging: delivers BEATS heartbeats (argv[1], default 3), then stops heartbeating but
stays alive (a hung agent: the process is there, the heartbeats are not). SIGTERM ends it.

Run: python3 examples/agents/hanging.py [BEATS]
"""

import asyncio
import logging
import signal
import sys
from pathlib import Path

try:
    import agentlet
except ImportError:  # run from a source checkout without installing
    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
    import agentlet


async def main(beats: int) -> int:
    enough = asyncio.Event()
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    loop.add_signal_handler(signal.SIGTERM, stop.set)

    def delivered(_heartbeat: agentlet.Heartbeat) -> None:
        if agent.heartbeater is not None and agent.heartbeater.sent >= beats:
            enough.set()

    agent = agentlet.Agentlet.from_env(on_success=delivered)
    await agent.start()
    if agent.heartbeater is not None:
        await enough.wait()
    await agent.stop()
    logging.warning("hanging: stopped heartbeating; staying alive until SIGTERM")
    await stop.wait()
    return 0


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, format="%(name)s %(levelname)s %(message)s")
    sys.exit(asyncio.run(main(int(sys.argv[1]) if len(sys.argv) > 1 else 3)))
