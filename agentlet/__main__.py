"""``python -m agentlet`` is the ``agentlet`` command."""

from agentlet.cli import main

__all__: list[str] = []

raise SystemExit(main())
