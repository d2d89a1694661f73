"""forking: waits for SIGUSR1, then forks two children that run /bin/sleep, and exits 3.

One child stays in the agent's session, the other starts a session of its own, so a
supervisor that cleans up by process group or session alone misses one of them. Both
keep the agent's environment (``RECONCILER_AGENT_ID`` and ``RECONCILER_NODE_ID``),
which is how the robustness invariants find them, plus ``ROBUSTNESS_GRANDCHILD=1``
so a session-leading grandchild is not mistaken for a second instance of the agent.
SIGTERM before SIGUSR1 exits 0. Standard library only, so it starts fast.

Run: python3 tests/robustness/agents/forking.py
"""

import os
import signal
import sys


def sleep_forever(new_session: bool) -> None:
    if new_session:
        os.setsid()
    env = {**os.environ, "ROBUSTNESS_GRANDCHILD": "1"}
    os.execve("/bin/sleep", ["/bin/sleep", "3600"], env)


def main() -> int:
    asked: list[int] = []
    signal.signal(signal.SIGUSR1, lambda signum, _frame: asked.append(signum))
    signal.signal(signal.SIGTERM, lambda _signum, _frame: sys.exit(0))
    while not asked:
        signal.pause()
    for new_session in (False, True):
        if os.fork() == 0:
            sleep_forever(new_session)
    os._exit(3)


if __name__ == "__main__":
    sys.exit(main())
