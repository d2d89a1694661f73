"""Run one fuzz target under atheris: ``python -m fuzz TARGET [libFuzzer options] [DIRS]``.

The reconciler modules are imported under atheris's instrumentation, so libFuzzer
sees the Python branches they take. The remaining arguments go to libFuzzer as they
are (``-max_total_time=600``, a work directory first, then the committed corpus; or
``-merge=1 OUT IN...`` to minimise a corpus). Needs the ``fuzz`` extra.

What not: the targets themselves (``fuzz.targets``).
"""

from __future__ import annotations

import sys

import atheris  # type: ignore[import-untyped]

__all__ = ["main"]


def main(argv: list[str]) -> None:
    """Fuzz ``argv[1]`` with the libFuzzer options that follow it."""
    if len(argv) < 2:
        sys.exit("usage: python -m fuzz TARGET [libFuzzer options] [corpus dirs]")
    with atheris.instrument_imports(include=["reconciler", "fuzz", "yaml"]):
        from fuzz.targets import TARGETS
    name = argv[1]
    if name not in TARGETS:
        sys.exit(f"unknown target {name!r}; one of: {', '.join(TARGETS)}")
    target = TARGETS[name]
    atheris.Setup([argv[0], *argv[2:]], target)
    atheris.Fuzz()


if __name__ == "__main__":
    main(sys.argv)
