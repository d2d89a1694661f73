"""An adopted agent's heartbeat deadline starts when the restarted daemon starts judging.

A daemon starting on a busy host can take longer than an agent's heartbeat timeout
between adopting the agent and reading its socket; the agent, healthy all along, must
not be restarted for that. ``DaemonApp`` starts the controller with ``run=False`` and
calls ``run`` once its servers are up; the deadlines start there.
"""

from __future__ import annotations

import asyncio
from pathlib import Path

from reconciler.daemon.supervisor import FakeSupervisor
from reconciler.model.status import Phase
from tests.unit.test_controller import HB, Node, agent, node_test


def test_a_slow_start_does_not_restart_the_heartbeating_agents_it_adopted(
    tmp_path: Path,
) -> None:
    async def body(node: Node) -> None:
        await node.apply(1, agent("steady", heartbeat=HB))
        node.heartbeat("steady")
        await node.settle()
        await node.controller.stop()
        survivor = node.supervisor.handle_of(agent("steady").id)
        assert survivor is not None
        successor = FakeSupervisor(clock=node.clock, first_pid=survivor.pid + 1000)
        successor.add_survivor(
            survivor.agent_id,
            pid=survivor.pid,
            start_ticks=survivor.start_ticks,
            cmdline=survivor.cmdline,
        )
        node.build(successor)
        await node.controller.start(run=False)
        node.clock.advance(HB.timeout_s * 2)  # the rest of the daemon takes its time
        await asyncio.sleep(0)
        node.controller.run()
        await node.settle()
        await node.advance(HB.interval_s)
        node.heartbeat("steady")
        await node.advance(HB.interval_s)
        assert node.phase("steady") is Phase.RUNNING
        assert node.starts_of("steady") == 0, "adopted, not restarted"

    node_test(body, tmp_path)
