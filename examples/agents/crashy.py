"""crashy: heartbeats for PERIOD_S seconds (argv[1], default 3.0), then exits with code 1.

Run: python3 examples/agents/crashy.py [PERIOD_S]
"""

import asyncio
import logging
import sys
from pathlib import Path

try:
    import agentlet
except ImportError:  # run from a source checkout without installing
    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
    import agentlet


async def main(period_s: float) -> int:
    async with agentlet.Agentlet.from_env():
        await asyncio.sleep(period_s)
    logging.error("crashy: crashing after %.1f s", period_s)
    return 1


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, format="%(name)s %(levelname)s %(message)s")
    sys.exit(asyncio.run(main(float(sys.argv[1]) if len(sys.argv) > 1 else 3.0)))
