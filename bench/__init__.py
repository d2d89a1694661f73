"""Benchmarks of reconciler against the tools it replaces, measured in one run.

What: ``python -m bench`` runs every benchmark (``bench.__main__``), prints the figures
and rewrites ``docs/benchmarks.md``. Each benchmark measures reconciler and its
comparison (supervisord, a bare asyncio Protocol, a bare aiohttp handler, a bare
grpc.aio server) on the same machine in the same run, so the ratios mean something.

What not: no timing thresholds for tests (the smoke test only checks that a quick run
writes a well-formed document). Where next: ``bench.report`` for the document,
``bench.agents`` for the node daemon against supervisord, ``bench.heartbeats`` for
heartbeat ingestion.
"""

__all__: list[str] = []
