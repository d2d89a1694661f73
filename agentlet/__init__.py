"""agentlet: the agent-side SDK and shim for reconciler.

Use ``Agentlet`` (asyncio) or ``ThreadedAgentlet`` (synchronous programs) to heartbeat
to the node daemon and serve /health, /reload and /metrics; use the ``agentlet run --
CMD`` shim to give any program the same without changing it. Settings come from the
``RECONCILER_*`` environment the daemon sets (``AgentletConfig.from_env``).

agentlet imports neither the ``reconciler`` package nor grpc; aiohttp is imported only
when the HTTP API or HTTP heartbeats are used, OpenTelemetry only when a trace context
is present.
"""

from agentlet.agent import Agentlet, ThreadedAgentlet
from agentlet.config import AgentletConfig, ConfigError, ListenAddress, load_agent_config
from agentlet.heartbeat import Heartbeat, HeartbeatStatus
from agentlet.heartbeater import BackoffPolicy, Heartbeater
from agentlet.transport import HeartbeatRejected, ReceiverBusy, ReceiverUnavailable, TransportError

__all__ = [
    "Agentlet",
    "AgentletConfig",
    "BackoffPolicy",
    "ConfigError",
    "Heartbeat",
    "HeartbeatRejected",
    "HeartbeatStatus",
    "Heartbeater",
    "ListenAddress",
    "ReceiverBusy",
    "ReceiverUnavailable",
    "ThreadedAgentlet",
    "TransportError",
    "__version__",
    "load_agent_config",
]

__version__ = "0.1.0"
