"""The shim: run any command as a child and heartbeat on its behalf.

What: ``run_shim(argv, config)`` starts ``argv`` (no shell), heartbeats with the shim's
own pid (the daemon started the shim, so the shim's pid is the agent's pid) and the cpu
and memory of the child's whole process tree, forwards SIGTERM, SIGINT, SIGHUP,
SIGQUIT, SIGUSR1 and SIGUSR2 to the child, maps ``POST /reload`` to SIGHUP, and returns
the child's exit code (128 + n when the child was killed by signal n).

The child gets ``PR_SET_PDEATHSIG(SIGKILL)``: when the shim itself is killed (the
daemon's last resort), the child dies with it instead of running on unsupervised.
The exit is noticed through a pidfd on the event loop (no thread, no polling).

What not: argument parsing (``agentlet.cli``); no restart policy (the daemon's job).
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import ctypes.util
import logging
import os
import signal
import subprocess
from collections.abc import Callable, Sequence

from agentlet.agent import Agentlet
from agentlet.config import ENV_HTTP_LISTEN, AgentletConfig
from agentlet.sampling import TreeSampler

__all__ = ["FORWARDED_SIGNALS", "ShimError", "exit_code_of", "run_shim"]

log = logging.getLogger("agentlet.shim")

FORWARDED_SIGNALS = (
    signal.SIGTERM,
    signal.SIGINT,
    signal.SIGHUP,
    signal.SIGQUIT,
    signal.SIGUSR1,
    signal.SIGUSR2,
)
_PR_SET_PDEATHSIG = 1


class ShimError(Exception):
    """The command could not be started; ``exit_code`` follows the shell's convention."""

    def __init__(self, message: str, exit_code: int) -> None:
        super().__init__(message)
        self.exit_code = exit_code


def exit_code_of(returncode: int) -> int:
    """A Popen return code as a shell reports it: 128 + n for death by signal n."""
    return 128 - returncode if returncode < 0 else returncode


class _Forwarder:
    """Holds signals that arrive before the child exists, then forwards them."""

    def __init__(self) -> None:
        self.child: subprocess.Popen[bytes] | None = None
        self.pending: list[signal.Signals] = []

    def __call__(self, sig: signal.Signals) -> None:
        if self.child is None:
            self.pending.append(sig)
            return
        if self.child.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                self.child.send_signal(sig)

    def attach(self, child: subprocess.Popen[bytes]) -> None:
        self.child = child
        for sig in self.pending:
            self(sig)
        self.pending.clear()


async def run_shim(argv: Sequence[str], config: AgentletConfig) -> int:
    """Run ``argv`` under heartbeats; return the exit code the shim should exit with."""
    loop = asyncio.get_running_loop()
    forward = _Forwarder()
    for sig in FORWARDED_SIGNALS:
        loop.add_signal_handler(sig, forward, sig)
    try:
        child = _spawn(argv)
        forward.attach(child)
        return await _supervise(child, config, forward)
    finally:
        for sig in FORWARDED_SIGNALS:
            loop.remove_signal_handler(sig)


async def _supervise(
    child: subprocess.Popen[bytes], config: AgentletConfig, forward: _Forwarder
) -> int:
    agentlet = Agentlet(
        config,
        sampler=TreeSampler(child.pid),
        pid=os.getpid(),
        reload=lambda: forward(signal.SIGHUP),
    )
    await agentlet.start()
    try:
        returncode = await _wait_for_exit(child)
    finally:
        await agentlet.stop()
    log.info("child %d exited with %d", child.pid, returncode)
    return exit_code_of(returncode)


def _spawn(argv: Sequence[str]) -> subprocess.Popen[bytes]:
    env = {name: value for name, value in os.environ.items() if name != ENV_HTTP_LISTEN}
    try:
        return subprocess.Popen(  # the shim owns the HTTP port, not the child
            list(argv), env=env, preexec_fn=_die_with_parent_hook()
        )
    except FileNotFoundError:
        raise ShimError(f"command not found: {argv[0]}", 127) from None
    except PermissionError:
        raise ShimError(f"permission denied: {argv[0]}", 126) from None
    except OSError as exc:
        raise ShimError(f"cannot run {argv[0]}: {exc.strerror}", 126) from None


def _die_with_parent_hook() -> Callable[[], None] | None:
    """A pre-exec hook setting PR_SET_PDEATHSIG(SIGKILL); None where prctl is missing."""
    name = ctypes.util.find_library("c")
    if name is None:
        return None
    prctl = ctypes.CDLL(name, use_errno=True).prctl
    parent_pid = os.getpid()

    def hook() -> None:
        prctl(_PR_SET_PDEATHSIG, int(signal.SIGKILL), 0, 0, 0)
        if os.getppid() != parent_pid:  # the shim died before prctl took effect
            os._exit(1)

    return hook


async def _wait_for_exit(child: subprocess.Popen[bytes]) -> int:
    """Wait for the child through a pidfd readable on the loop; a thread as fallback."""
    try:
        pidfd = os.pidfd_open(child.pid)
    except (AttributeError, OSError):
        return await asyncio.to_thread(child.wait)
    loop = asyncio.get_running_loop()
    exited = loop.create_future()

    def readable() -> None:
        if not exited.done():
            exited.set_result(None)

    loop.add_reader(pidfd, readable)
    try:
        await exited
    finally:
        loop.remove_reader(pidfd)
        os.close(pidfd)
    return child.wait()
