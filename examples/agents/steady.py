"""steady: heartbeats every interval and does nothing else; exits 0 on SIGTERM or SIGINT.

Run: python3 examples/agents/steady.py   (with the RECONCILER_* environment, or standalone)
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


async def main() -> int:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    async with agentlet.Agentlet.from_env():
        logging.info("steady: running until SIGTERM")
        await stop.wait()
    logging.info("steady: stopping")
    return 0


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, format="%(name)s %(levelname)s %(message)s")
    sys.exit(asyncio.run(main()))
