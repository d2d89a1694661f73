"""reconciler: keep agent processes alive and correct across a fleet of hosts.

The package is layered (checked by import-linter, see pyproject.toml):
``model`` (pure data) <- ``reconcile`` (pure decisions) <- ``daemon`` / ``manager``
(I/O) <- ``cli``. ``api`` holds the generated protobuf code.
"""

__all__ = ["__version__"]

__version__ = "0.1.0"
