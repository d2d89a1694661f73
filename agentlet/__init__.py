"""agentlet: the agent-side SDK and shim for reconciler."""

__all__ = ["__version__"]

__version__ = "0.1.0"
