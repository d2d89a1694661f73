"""Run one fuzz target under atheris: ``python -m fuzz TARGET [libFuzzer options] [DIRS]``.

The reconciler modules are imported under atheris's instrumentation, so libFuzzer
sees the Python branches they take. The remaining arguments go to libFuzzer as they
are (``-max_total_time=600``, a work directory first, then the committed corpus; or
``-merge=1 OUT IN...`` to minimise a corpus, which runs this module again through a
small wrapper script). Needs the ``fuzz`` extra.

What not: the targets themselves (``fuzz.targets``).
"""

from __future__ import annotations

import atexit
import shlex
import shutil
import sys
import tempfile
from pathlib import Path

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
    atheris.Setup([_self_command(name), *argv[2:]], target)
    atheris.Fuzz()


def _self_command(name: str) -> str:
    """An executable that runs this target again: libFuzzer's ``-merge=1`` and
    ``-fork`` start argv[0] as a program, which ``python -m fuzz`` is not."""
    directory = Path(tempfile.mkdtemp(prefix="reconciler-fuzz-"))
    atexit.register(shutil.rmtree, directory, ignore_errors=True)
    root = Path(__file__).resolve().parent.parent
    script = directory / name
    script.write_text(
        f"#!/bin/sh\ncd {shlex.quote(str(root))} && "
        f'exec {shlex.quote(sys.executable)} -m fuzz {shlex.quote(name)} "$@"\n'
    )
    script.chmod(0o700)
    return str(script)


if __name__ == "__main__":
    main(sys.argv)
