"""The one object an agent program holds: heartbeats plus the HTTP API, started together.

What: ``Agentlet`` (asyncio: ``async with Agentlet.from_env() as agent: ...``) and
``ThreadedAgentlet`` (sync programs: ``with ThreadedAgentlet.from_env() as agent: ...``
runs the same thing on its own thread and event loop).

Without the ``RECONCILER_*`` environment the agent runs standalone: it logs once that
heartbeats are off and serves the HTTP API only if ``AGENTLET_HTTP_LISTEN`` is set.
Nothing here raises into the host program after ``start()``; a port that cannot be
bound is logged and skipped.

What not: the heartbeat loop itself (``agentlet.heartbeater``), the shim
(``agentlet.shim``).
"""

from __future__ import annotations

import asyncio
import logging
import threading
from types import TracebackType
from typing import Any

from agentlet.config import AgentletConfig
from agentlet.heartbeat import HeartbeatStatus
from agentlet.heartbeater import BackoffPolicy, FailureCallback, Heartbeater, SuccessCallback
from agentlet.http_api import AgentHttpApi, ReloadCallback
from agentlet.sampling import ProcessSampler, Sampler

__all__ = ["Agentlet", "ThreadedAgentlet"]

log = logging.getLogger("agentlet")


class Agentlet:
    """Heartbeats and the agent HTTP API for one agent, on the running event loop."""

    def __init__(
        self,
        config: AgentletConfig,
        *,
        reload: ReloadCallback | None = None,
        sampler: Sampler | None = None,
        pid: int | None = None,
        on_success: SuccessCallback | None = None,
        on_failure: FailureCallback | None = None,
        backoff: BackoffPolicy = BackoffPolicy(),  # noqa: B008 - frozen, shared safely
        health_timeout_s: float | None = None,
    ) -> None:
        self.config = config
        self._reload = reload
        self._sampler = sampler
        self._pid = pid
        self._on_success = on_success
        self._on_failure = on_failure
        self._backoff = backoff
        self._health_timeout_s = health_timeout_s
        self._status: HeartbeatStatus | None = None
        self.heartbeater: Heartbeater | None = None
        self.http_api: AgentHttpApi | None = None
        self._task: asyncio.Task[None] | None = None

    @classmethod
    def from_env(cls, **kwargs: Any) -> Agentlet:
        """``Agentlet(AgentletConfig.from_env(), **kwargs)``; ConfigError on a bad variable."""
        return cls(AgentletConfig.from_env(), **kwargs)

    def set_status(self, status: HeartbeatStatus | str) -> None:
        """Report ``status`` from the next heartbeat on (ValueError for an unknown word)."""
        self._status = HeartbeatStatus(status)
        if self.heartbeater is not None:
            self.heartbeater.set_status(self._status)

    async def start(self) -> None:
        """Start heartbeating (first heartbeat at once) and serve the HTTP API if asked."""
        sampler = self._sampler if self._sampler is not None else ProcessSampler(self._pid)
        self._start_heartbeats(sampler)
        if self.config.http_listen is not None:
            await self._start_http(sampler)

    def _start_heartbeats(self, sampler: Sampler) -> None:
        if not self.config.heartbeats_enabled:
            log.warning("heartbeats are off: RECONCILER_AGENT_ID and a receiver are not set")
            return
        self.heartbeater = Heartbeater.from_config(
            self.config,
            sampler=sampler,
            pid=self._pid,
            backoff=self._backoff,
            on_success=self._on_success,
            on_failure=self._on_failure,
        )
        if self._status is not None:
            self.heartbeater.set_status(self._status)
        self._task = asyncio.create_task(self.heartbeater.run(), name="agentlet-heartbeat")

    async def _start_http(self, sampler: Sampler) -> None:
        assert self.config.http_listen is not None
        api = AgentHttpApi(
            self.config.http_listen,
            agent_id=self.config.agent_id,
            token=self.config.token,
            heartbeater=self.heartbeater,
            sampler=sampler,
            reload=self._reload,
            health_timeout_s=self._health_timeout_s,
        )
        try:
            await api.start()
        except OSError as exc:
            log.error("agentlet HTTP API not started on %s: %s", self.config.http_listen, exc)
            await api.stop()
            return
        self.http_api = api

    async def stop(self) -> None:
        """Stop heartbeating and serving; safe to call twice."""
        if self.heartbeater is not None:
            self.heartbeater.stop()
        if self._task is not None:
            await asyncio.gather(self._task, return_exceptions=True)
            self._task = None
        if self.http_api is not None:
            await self.http_api.stop()
            self.http_api = None

    async def __aenter__(self) -> Agentlet:
        await self.start()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        await self.stop()


class ThreadedAgentlet:
    """``Agentlet`` on a daemon thread with its own event loop, for synchronous programs.

    Callbacks (success, failure, reload) run on that thread.
    """

    def __init__(self, config: AgentletConfig, **kwargs: Any) -> None:
        self._agentlet = Agentlet(config, **kwargs)
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stop_requested: asyncio.Event | None = None
        self._started = threading.Event()
        self._thread = threading.Thread(target=self._main, name="agentlet", daemon=True)

    @classmethod
    def from_env(cls, **kwargs: Any) -> ThreadedAgentlet:
        """``ThreadedAgentlet(AgentletConfig.from_env(), **kwargs)``."""
        return cls(AgentletConfig.from_env(), **kwargs)

    @property
    def agentlet(self) -> Agentlet:
        """The asyncio object underneath (read its counters; do not await it here)."""
        return self._agentlet

    def start(self, *, timeout_s: float = 10.0) -> None:
        """Start the thread and wait until heartbeats and the API have started."""
        self._thread.start()
        self._started.wait(timeout_s)

    def set_status(self, status: HeartbeatStatus | str) -> None:
        """Thread-safe ``Agentlet.set_status``."""
        checked = HeartbeatStatus(status)
        loop = self._loop
        if loop is None or loop.is_closed():
            self._agentlet.set_status(checked)
            return
        loop.call_soon_threadsafe(self._agentlet.set_status, checked)

    def stop(self, *, timeout_s: float = 10.0) -> None:
        """Stop heartbeating and wait for the thread to end."""
        loop, stop_requested = self._loop, self._stop_requested
        if loop is not None and stop_requested is not None and not loop.is_closed():
            loop.call_soon_threadsafe(stop_requested.set)
        if self._thread.is_alive():
            self._thread.join(timeout_s)

    def _main(self) -> None:
        try:
            asyncio.run(self._serve())
        except Exception:
            log.exception("agentlet thread ended with an error")
        finally:
            self._started.set()

    async def _serve(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._stop_requested = asyncio.Event()
        try:
            await self._agentlet.start()
        finally:
            self._started.set()
        await self._stop_requested.wait()
        await self._agentlet.stop()

    def __enter__(self) -> ThreadedAgentlet:
        self.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.stop()
