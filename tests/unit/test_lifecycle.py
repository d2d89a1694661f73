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


class SignalSequenceApp:
    """Sends each of ``signals`` to its own process, 20 ms apart, once started."""

    def __init__(self, *signals: signal.Signals) -> None:
        self.signals = list(signals)
        self.calls: list[str] = []

    async def start(self) -> None:
        self.calls.append("start")
        loop = asyncio.get_running_loop()
        for index, signum in enumerate(self.signals, start=1):
            loop.call_later(0.02 * index, os.kill, os.getpid(), signum)

    async def stop(self) -> None:
        self.calls.append("stop")


async def test_a_sighup_never_ends_the_process_without_settings_that_load(
    unfrozen: None, caplog: pytest.LogCaptureFixture
) -> None:
    app = SignalSequenceApp(signal.SIGHUP, signal.SIGHUP, signal.SIGTERM)
    restarted = await run_until_signalled(app, name="test app")  # no reload at all
    assert (restarted, app.calls) == (False, ["start", "stop"])
    assert "SIGHUP: not restarting" in caplog.text

    app = SignalSequenceApp(signal.SIGHUP, signal.SIGTERM)
    restarted = await run_until_signalled(
        app, name="test app", reload=lambda: "bad.yaml: bogus: unknown setting"
    )
    assert (restarted, app.calls) == (False, ["start", "stop"])
    assert "the running settings stay: bad.yaml: bogus: unknown setting" in caplog.text

    app = SignalSequenceApp(signal.SIGHUP)
    restarted = await run_until_signalled(
        app,
        name="test app",
        reload=lambda: "",
        before_restart=lambda: app.calls.append("before restart"),
    )
    assert (restarted, app.calls) == (True, ["start", "before restart", "stop"])
