"""The failpoints the robustness runner relies on are where their names say.

``manager.mid_push`` must fire after a daemon accepted a generation and before the
Manager recorded the answer: that is the moment the runner kills the Manager at.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from reconciler import failpoints
from reconciler.manager.store.memory import MemoryStore
from tests.integration.test_manager_support import (
    Manager,
    agent_set,
    fake_daemon,
    manager_settings,
    running_manager,
    until,
)


@pytest.fixture
async def manager(tmp_path: Path) -> AsyncIterator[Manager]:
    async with running_manager(manager_settings(tmp_path), store=MemoryStore()) as running:
        yield running


async def test_the_mid_push_failpoint_fires_after_the_daemon_accepted_and_before_it_is_recorded(
    manager: Manager,
) -> None:
    async with fake_daemon("edge-1") as daemon:
        await manager.register("edge-1", daemon=daemon)
        before = failpoints.hits("manager.mid_push")
        with failpoints.set("manager.mid_push", "raise"):
            await manager.apply(agent_set("all", "a"))
            await until(lambda: daemon.seen.accepted == [1])
            await manager.app.pusher.idle()
        assert failpoints.hits("manager.mid_push") == before + 1
        node = await manager.node("edge-1")
        assert node.desired_generation == 1
        assert node.observed_generation == 0, "the daemon's answer was not recorded"
