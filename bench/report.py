"""Benchmark results as data, and ``docs/benchmarks.md`` rendered from them.

What: a benchmark returns a ``Section``: a title, the issue it answers, how it was
measured, and ``Figure`` rows (reconciler's figure beside its comparison measured in
the same run, and an optional ``Target`` that says pass or fail). ``render`` writes
the document: the intro (kept from the existing file, above the marker line), the
command, the date, the machine, a summary table of every target, then each section.

What not: no measuring, no machine probing (``bench.machine``).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field

__all__ = [
    "DEFAULT_INTRO",
    "GENERATED_MARKER",
    "Figure",
    "Section",
    "Target",
    "at_least_ratio",
    "at_most_plus",
    "at_most_ratio",
    "below",
    "keep_intro",
    "render",
]

GENERATED_MARKER = (
    "<!-- Everything below is written by `python -m bench`; edit only the text above. -->"
)

DEFAULT_INTRO = """\
# Benchmarks

These figures come from `make bench` (`python -m bench`) on the machine described
below. Every figure stands beside its comparison measured in the same run on the same
machine: supervisord 4 for the node daemon, a bare asyncio Protocol and a bare aiohttp
handler for heartbeat ingestion, a bare grpc.aio server for the Manager, tracing off
for tracing on. A ratio is reconciler's figure divided by the comparison's; the target
column says what the project promises and whether this run kept the promise. Each
section says exactly what was measured on each side.

On a 2-core machine that other work may share while the benchmark runs, the figures
bound by CPU (bring-up times, tail latencies, request rates) move by tens of percent
from one run to the next; restart medians and idle costs are steadier. Rerun
`make bench` on your own hardware before relying on an absolute number.
"""


@dataclass(frozen=True, slots=True)
class Target:
    """A promise about one figure: its wording and the check (ours, comparison) -> met."""

    text: str
    check: Callable[[float, float | None], bool]


def at_most_ratio(ratio: float, text: str) -> Target:
    """Ours no more than ``ratio`` times the comparison (lower is better)."""
    return Target(text, lambda ours, theirs: theirs is not None and ours <= ratio * theirs)


def at_least_ratio(ratio: float, text: str) -> Target:
    """Ours at least ``ratio`` times the comparison (higher is better)."""
    return Target(text, lambda ours, theirs: theirs is not None and ours >= ratio * theirs)


def at_most_plus(margin: float, text: str) -> Target:
    """Ours no more than the comparison plus ``margin``."""
    return Target(text, lambda ours, theirs: theirs is not None and ours <= theirs + margin)


def below(limit: float, text: str) -> Target:
    """Ours under an absolute ``limit``."""
    return Target(text, lambda ours, _theirs: ours < limit)


@dataclass(frozen=True, slots=True)
class Figure:
    """One measured figure of reconciler, beside its comparison."""

    name: str
    unit: str
    ours: float | None
    theirs: float | None = None
    target: Target | None = None
    note: str = ""

    @property
    def ratio(self) -> float | None:
        if self.ours is None or not self.theirs:
            return None
        return self.ours / self.theirs

    @property
    def met(self) -> bool | None:
        if self.target is None or self.ours is None:
            return None
        return self.target.check(self.ours, self.theirs)


@dataclass(frozen=True, slots=True)
class Section:
    """The results of one benchmark."""

    key: str
    title: str
    issue: str
    comparison: str
    method: str
    figures: Sequence[Figure] = ()
    details: Mapping[str, str] = field(default_factory=dict)
    error: str = ""
    duration_s: float = 0.0


def _number(value: float | None, unit: str = "") -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "—"
    magnitude = abs(value)
    if magnitude >= 1000:
        text = f"{value:,.0f}"
    elif magnitude >= 100:
        text = f"{value:.0f}"
    elif magnitude >= 10:
        text = f"{value:.1f}"
    elif magnitude >= 1:
        text = f"{value:.2f}"
    else:
        text = f"{value:.3f}"
    return f"{text} {unit}".strip()


def _verdict(figure: Figure) -> str:
    met = figure.met
    if figure.target is None:
        return ""
    if met is None:
        return f"{figure.target.text}: not measured"
    return f"{figure.target.text}: **{'pass' if met else 'FAIL'}**"


def _ratio(figure: Figure) -> str:
    ratio = figure.ratio
    return "—" if ratio is None else f"{ratio:.3f}"


def _figure_rows(section: Section) -> list[str]:
    rows = [
        f"| Figure | reconciler | {section.comparison or 'comparison'} | ratio | target |",
        "| --- | ---: | ---: | ---: | --- |",
    ]
    for figure in section.figures:
        name = figure.name + (f" ({figure.note})" if figure.note else "")
        rows.append(
            f"| {name} | {_number(figure.ours, figure.unit)} | "
            f"{_number(figure.theirs, figure.unit)} | {_ratio(figure)} | {_verdict(figure)} |"
        )
    return rows


def _summary(sections: Sequence[Section]) -> list[str]:
    rows = ["| Benchmark | Figure | Target | Result |", "| --- | --- | --- | --- |"]
    for section in sections:
        if section.error:
            rows.append(f"| {section.title} | — | — | not run: {section.error} |")
        for figure in section.figures:
            if figure.target is None:
                continue
            met = figure.met
            result = "not measured" if met is None else ("pass" if met else "**FAIL**")
            rows.append(f"| {section.title} | {figure.name} | {figure.target.text} | {result} |")
    return rows


def _section(section: Section) -> list[str]:
    lines = [f"## {section.title}", "", f"Issue: {section.issue}. {section.method}", ""]
    if section.error:
        lines += [f"Not run: {section.error}", ""]
    if section.figures:
        lines += [*_figure_rows(section), ""]
    if section.details:
        lines += [f"- {key}: {value}" for key, value in section.details.items()]
        lines.append("")
    if section.duration_s:
        lines += [f"Took {section.duration_s:.0f} s.", ""]
    return lines


def keep_intro(existing: str | None) -> str:
    """The hand-written intro of an existing document (above the marker), or the default."""
    if existing and GENERATED_MARKER in existing:
        intro = existing.split(GENERATED_MARKER, 1)[0].rstrip()
        if intro:
            return intro + "\n"
    return DEFAULT_INTRO


def render(
    sections: Sequence[Section],
    *,
    intro: str,
    command: str,
    date: str,
    machine: Mapping[str, str],
    duration_s: float,
) -> str:
    """The whole document."""
    lines = [intro.rstrip(), "", GENERATED_MARKER, ""]
    lines += [f"- Command: `{command}`", f"- Date: {date}", f"- Duration: {duration_s:.0f} s", ""]
    lines += ["## Machine", "", "| | |", "| --- | --- |"]
    lines += [f"| {key} | {value} |" for key, value in machine.items()]
    lines += ["", "## Summary", "", *_summary(sections), ""]
    for section in sections:
        lines += _section(section)
    return "\n".join(lines).rstrip() + "\n"
