"""The agent's own HTTP API: GET /health, POST /reload, GET /metrics (aiohttp).

- ``GET /health``: 200 when the last heartbeat was delivered within ``health_timeout_s``,
  else 503; JSON body ``{"healthy", "last_delivery_age_s", "heartbeats_sent",
  "heartbeats_failed", "status"}``. With heartbeats off it answers 200 and says so.
- ``POST /reload``: needs ``Authorization: Bearer <RECONCILER_AGENT_TOKEN>`` (401
  ``{"error": "unauthorized"}`` otherwise, also when the agent has no token); calls the
  reload callback: 200 ``{"reloaded": true}``, 500 ``{"error": "reload_failed"}`` when it
  raises, 501 ``{"error": "not_supported"}`` when there is none.
- ``GET /metrics``: Prometheus text (``agentlet.metrics``).

What not: no TLS; it listens on loopback unless told otherwise. The heartbeat loop is
``agentlet.heartbeater``; this module only reads it.
"""

from __future__ import annotations

import hmac
import inspect
import logging
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING

from agentlet.config import ListenAddress
from agentlet.metrics import CONTENT_TYPE, MetricsSnapshot, format_metrics
from agentlet.sampling import Sampler

if TYPE_CHECKING:
    from aiohttp import web

    from agentlet.heartbeater import Heartbeater

__all__ = ["AgentHttpApi", "ReloadCallback"]

log = logging.getLogger("agentlet.http")

ReloadCallback = Callable[[], Awaitable[None] | None]
_MAX_REQUEST_BYTES = 4096


class AgentHttpApi:
    """Serves /health, /reload and /metrics for one agent until ``stop()``."""

    def __init__(
        self,
        listen: ListenAddress,
        *,
        agent_id: str | None,
        token: str | None,
        heartbeater: Heartbeater | None,
        sampler: Sampler | None = None,
        reload: ReloadCallback | None = None,
        health_timeout_s: float | None = None,
    ) -> None:
        self._listen = listen
        self._agent_id = agent_id or ""
        self._token = token
        self._heartbeater = heartbeater
        self._sampler = sampler
        self._reload = reload
        interval_s = heartbeater.interval_s if heartbeater is not None else 5.0
        self._health_timeout_s = health_timeout_s or 3 * interval_s
        self._runner: web.AppRunner | None = None
        self.reloads = 0
        self.unauthorized = 0

    @property
    def port(self) -> int:
        """The bound port (useful after listening on port 0)."""
        if self._runner is None or not self._runner.addresses:
            raise RuntimeError("the HTTP API is not listening")
        return int(self._runner.addresses[0][1])

    @property
    def url(self) -> str:
        """Base URL of the API, e.g. http://127.0.0.1:8080."""
        return f"http://{ListenAddress(self._listen.host, self.port)}"

    async def start(self) -> None:
        """Bind and serve (raise OSError when the address is taken)."""
        from aiohttp import web

        app = web.Application(client_max_size=_MAX_REQUEST_BYTES)
        app.router.add_get("/health", self._health)
        app.router.add_post("/reload", self._reload_handler)
        app.router.add_get("/metrics", self._metrics)
        self._runner = web.AppRunner(app, access_log=None, handle_signals=False)
        await self._runner.setup()
        site = web.TCPSite(self._runner, self._listen.host, self._listen.port)
        await site.start()
        log.info("agentlet HTTP API on %s", self.url)

    async def stop(self) -> None:
        """Stop serving; safe to call twice."""
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None

    async def _health(self, _request: web.Request) -> web.Response:
        from aiohttp import web

        beats = self._heartbeater
        if beats is None:
            return web.json_response({"healthy": True, "heartbeats": "off"})
        age_s = beats.last_delivery_age_s()
        healthy = age_s is not None and age_s <= self._health_timeout_s
        body = {
            "healthy": healthy,
            "last_delivery_age_s": None if age_s is None else round(age_s, 3),
            "timeout_s": self._health_timeout_s,
            "heartbeats_sent": beats.sent,
            "heartbeats_failed": beats.failed,
            "status": beats.status.value,
        }
        return web.json_response(body, status=200 if healthy else 503)

    async def _reload_handler(self, request: web.Request) -> web.Response:
        from aiohttp import web

        if not self._authorized(request.headers.get("Authorization", "")):
            self.unauthorized += 1
            return web.json_response({"error": "unauthorized"}, status=401)
        if self._reload is None:
            return web.json_response({"error": "not_supported"}, status=501)
        try:
            result = self._reload()
            if inspect.isawaitable(result):
                await result
        except Exception as exc:
            log.exception("reload callback failed")
            body = {"error": "reload_failed", "detail": type(exc).__name__}
            return web.json_response(body, status=500)
        self.reloads += 1
        return web.json_response({"reloaded": True})

    def _authorized(self, header: str) -> bool:
        scheme, _, presented = header.partition(" ")
        if self._token is None or scheme.lower() != "bearer":
            return False
        return hmac.compare_digest(presented.strip().encode(), self._token.encode())

    async def _metrics(self, _request: web.Request) -> web.Response:
        from aiohttp import web

        text = format_metrics(self._snapshot())
        return web.Response(body=text.encode(), headers={"Content-Type": CONTENT_TYPE})

    def _snapshot(self) -> MetricsSnapshot:
        beats = self._heartbeater
        if beats is not None:
            sample = beats.last_sample
        elif self._sampler is not None:
            sample = self._sampler.sample()
        else:
            return MetricsSnapshot(self._agent_id, 0.0, 0, 0, 0, None)
        return MetricsSnapshot(
            agent_id=self._agent_id,
            cpu_percent=sample.cpu_percent,
            memory_bytes=sample.memory_bytes,
            heartbeats_sent=0 if beats is None else beats.sent,
            heartbeats_failed=0 if beats is None else beats.failed,
            last_delivery_age_s=None if beats is None else beats.last_delivery_age_s(),
        )
