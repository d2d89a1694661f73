"""ignores_sigterm: a synchronous program that ignores SIGTERM and heartbeats forever
(through ThreadedAgentlet); only SIGKILL (or SIGINT) ends it.

Run: python3 examples/agents/ignores_sigterm.py
"""

import logging
import signal
import sys
import time
from pathlib import Path

try:
    import agentlet
except ImportError:  # run from a source checkout without installing
    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
    import agentlet


def main() -> int:
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    with agentlet.ThreadedAgentlet.from_env():
        logging.info("ignores_sigterm: SIGTERM is ignored; SIGKILL me")
        try:
            while True:
                time.sleep(3600)
        except KeyboardInterrupt:
            return 0


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, format="%(name)s %(levelname)s %(message)s")
    sys.exit(main())
