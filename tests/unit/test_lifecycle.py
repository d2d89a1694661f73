"""run_until_signalled: start, wait for a signal, stop; startup objects frozen for the GC."""

from __future__ import annotations

import asyncio
import gc
import os
import signal
from collections.abc import Iterator

import pytest

from reconciler.lifecycle import run_until_signalled


class RecordingApp:
    """Sends ``signum`` to its own process shortly after starting."""

    def __init__(self, signum: signal.Signals) -> None:
        self.signum = signum
        self.calls: list[str] = []
        self.frozen_while_running = 0

    async def start(self) -> None:
        self.calls.append("start")
        asyncio.get_running_loop().call_later(0.05, self._signal)

    def _signal(self) -> None:
        self.frozen_while_running = gc.get_freeze_count()
        os.kill(os.getpid(), self.signum)

    async def stop(self) -> None:
        self.calls.append("stop")


@pytest.fixture
def unfrozen() -> Iterator[None]:
    gc.unfreeze()
    yield
    gc.unfreeze()


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT])
async def test_the_app_runs_until_a_signal_then_stops_with_startup_objects_frozen(
    unfrozen: None, signum: signal.Signals
) -> None:
    app = RecordingApp(signum)
    await run_until_signalled(app, name="test app")
    assert app.calls == ["start", "stop"]
    assert app.frozen_while_running > 1000  # the imported modules at least
