"""Running a long-lived process until it is told to stop.

``run_until_signalled`` starts an app, waits for SIGTERM or SIGINT, and stops it: what
``reconciler daemon`` and ``reconciler manager`` do around their apps.
"""

from __future__ import annotations

import asyncio
import logging
import signal
from typing import Protocol

__all__ = ["App", "run_until_signalled"]

log = logging.getLogger(__name__)


class App(Protocol):
    """Something with an asynchronous start and stop."""

    async def start(self) -> None: ...

    async def stop(self) -> None: ...


async def run_until_signalled(app: App, *, name: str) -> None:
    """Start ``app``, wait for SIGTERM or SIGINT, then stop it."""
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)
    await app.start()
    try:
        await stop.wait()
    finally:
        log.info("stopping the %s", name)
        await app.stop()
