"""``python -m bench``: run the benchmarks, print the figures, rewrite docs/benchmarks.md.

What: runs every benchmark in ``BENCHMARKS`` (or those named by ``--only``; sizes are
tiny with ``--quick``), each one isolated so one failing benchmark is reported as not
run instead of losing the rest, then renders ``bench.report`` into ``--output``
(default ``docs/benchmarks.md``), keeping the intro written above its marker line.
Exits 1 when a benchmark could not run; a missed target is reported, not an error.

What not: no measuring here (the benchmark modules), no thresholds.
"""

from __future__ import annotations

import argparse
import datetime
import shlex
import sys
import time
import traceback
from collections.abc import Callable, Sequence
from pathlib import Path

from bench import agents, heartbeats, manager, tracing
from bench.machine import describe
from bench.procs import raise_nofile_limit
from bench.report import Figure, Section, keep_intro, render

__all__ = ["BENCHMARKS", "main"]

Benchmark = Callable[..., Section]

BENCHMARKS: dict[str, Benchmark] = {
    "agents": agents.run,
    "heartbeats": heartbeats.run,
    "manager": manager.run,
    "tracing": tracing.run,
}

DEFAULT_OUTPUT = Path(__file__).resolve().parent.parent / "docs" / "benchmarks.md"


def _parse(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m bench", description=__doc__.splitlines()[0])
    parser.add_argument(
        "--only", action="append", choices=sorted(BENCHMARKS), help="run only this (repeatable)"
    )
    parser.add_argument("--quick", action="store_true", help="tiny sizes: checks it runs")
    parser.add_argument("--output", type=Path, default=DEFAULT_OUTPUT, help="document to write")
    return parser.parse_args(argv)


def _run_one(name: str, benchmark: Benchmark, *, quick: bool) -> Section:
    print(f"== {name}", flush=True)
    started = time.monotonic()
    try:
        section = benchmark(quick=quick)
    except Exception as error:
        traceback.print_exc()
        section = Section(
            key=name, title=name, issue="", comparison="", method="", error=repr(error)
        )
    elapsed = time.monotonic() - started
    _print(section)
    return Section(
        key=section.key,
        title=section.title,
        issue=section.issue,
        comparison=section.comparison,
        method=section.method,
        figures=section.figures,
        details=section.details,
        error=section.error,
        duration_s=elapsed,
    )


def _print(section: Section) -> None:
    if section.error:
        print(f"   not run: {section.error}")
    for figure in section.figures:
        print(f"   {_line(figure)}")


def _line(figure: Figure) -> str:
    ours = "—" if figure.ours is None else f"{figure.ours:.4g}"
    theirs = "" if figure.theirs is None else f" vs {figure.theirs:.4g}"
    verdict = ""
    if figure.target is not None:
        verdict = f"  [{figure.target.text}: {'pass' if figure.met else 'FAIL'}]"
    return f"{figure.name}: {ours}{theirs} {figure.unit}{verdict}"


def main(argv: Sequence[str] | None = None) -> int:
    args = _parse(argv)
    raise_nofile_limit()
    names = args.only or list(BENCHMARKS)
    started = time.monotonic()
    date = datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M UTC")
    sections = [_run_one(name, BENCHMARKS[name], quick=args.quick) for name in names]
    output: Path = args.output
    existing = output.read_text() if output.exists() else None
    command = "python -m bench " + shlex.join(sys.argv[1:] if argv is None else list(argv))
    document = render(
        sections,
        intro=keep_intro(existing),
        command=command.strip(),
        date=date,
        machine=describe(),
        duration_s=time.monotonic() - started,
    )
    output.parent.mkdir(parents=True, exist_ok=True)
    output.write_text(document)
    print(f"wrote {output}")
    return 1 if any(section.error for section in sections) else 0


if __name__ == "__main__":
    sys.exit(main())
