"""Fast, read-only views of /proc: process identity, parentage and command lines.

The supervisor needs three facts about a pid, often and cheaply: is it the process we
think it is (start time in clock ticks since boot, /proc/PID/stat field 22, plus its
command line), who its parent, process group and session are, and which processes
descend from it. Reading /proc directly is about three times cheaper than psutil
(DESIGN.md section 9), and every function here returns ``None`` or skips the entry
when the process vanished while being read: processes come and go under our feet.

What it does not do: signal, wait or decide anything (``reconciler.daemon.supervisor``
does), or sample cpu and memory (the resource monitor does, with psutil).
"""

from __future__ import annotations

import os
import time
from collections.abc import Collection, Iterable, Sequence
from dataclasses import dataclass

__all__ = [
    "ProcStat",
    "boot_clock_ns",
    "boot_id",
    "children_of",
    "cmdline_matches",
    "descendants",
    "read_cmdline",
    "read_environ",
    "read_environ_value",
    "read_start_ticks",
    "read_stat",
    "scan",
    "start_ticks_between",
]

_PROC = "/proc"
_TICK_NS = 1_000_000_000 // os.sysconf("SC_CLK_TCK")


@dataclass(frozen=True, slots=True)
class ProcStat:
    """The few fields of /proc/PID/stat the supervisor uses."""

    pid: int
    state: str
    """One letter: R running, S sleeping, D disk wait, Z zombie, T stopped..."""
    ppid: int
    pgid: int
    sid: int
    start_ticks: int
    """Field 22, ``starttime``: clock ticks after boot when the process started."""

    @property
    def zombie(self) -> bool:
        """True when the process has exited and waits to be reaped."""
        return self.state in ("Z", "X")


def _parse_stat(pid: int, text: str) -> ProcStat | None:
    # The command name (field 2) is in parentheses and may itself hold spaces and
    # parentheses, so split after the last ')'.
    end = text.rfind(")")
    if end < 0:
        return None
    fields = text[end + 2 :].split()
    if len(fields) < 20:
        return None
    try:
        return ProcStat(
            pid=pid,
            state=fields[0],
            ppid=int(fields[1]),
            pgid=int(fields[2]),
            sid=int(fields[3]),
            start_ticks=int(fields[19]),
        )
    except ValueError:
        return None


def read_stat(pid: int) -> ProcStat | None:
    """The stat fields of ``pid``, or ``None`` when there is no such process."""
    try:
        with open(f"{_PROC}/{pid}/stat", "rb") as handle:
            text = handle.read().decode("utf-8", "replace")
    except (FileNotFoundError, ProcessLookupError, PermissionError):
        return None
    return _parse_stat(pid, text)


def read_start_ticks(pid: int) -> int | None:
    """``pid``'s start time in clock ticks since boot, or ``None`` when it is gone."""
    stat = read_stat(pid)
    return None if stat is None else stat.start_ticks


def boot_clock_ns() -> int:
    """Now on the clock /proc counts start times on (CLOCK_BOOTTIME), in nanoseconds."""
    return time.clock_gettime_ns(time.CLOCK_BOOTTIME)


def start_ticks_between(before_ns: int, after_ns: int) -> int | None:
    """The start time /proc shows for a process forked between two ``boot_clock_ns()``.

    The kernel stamps a new process with the boot clock and shows it (field 22) cut
    down to whole clock ticks (10 ms). A spawn takes well under a tick, so when both
    readings fall in the same tick, that tick is the child's start time, and /proc
    need not be read: a read right after a spawn waits until the child's exec is done
    (~0.3 ms here). ``None`` when the readings straddle a tick boundary (about one
    spawn in a hundred): read /proc then.
    """
    first = before_ns // _TICK_NS
    return first if after_ns // _TICK_NS == first else None


def read_cmdline(pid: int) -> tuple[str, ...] | None:
    """``pid``'s argv as the kernel shows it; ``None`` when gone, ``()`` for zombies."""
    try:
        with open(f"{_PROC}/{pid}/cmdline", "rb") as handle:
            raw = handle.read()
    except (FileNotFoundError, ProcessLookupError, PermissionError):
        return None
    if raw.endswith(b"\x00"):
        raw = raw[:-1]
    if not raw:
        return ()
    return tuple(os.fsdecode(part) for part in raw.split(b"\x00"))


def read_environ_value(pid: int, name: str) -> str | None:
    """The value ``name`` had in ``pid``'s environment at exec, or ``None``."""
    return read_environ(pid, (name,)).get(name)


def read_environ(pid: int, names: Collection[str]) -> dict[str, str]:
    """The values the ``names`` that were set had in ``pid``'s environment at exec
    (one read of /proc/PID/environ; {} when it cannot be read)."""
    prefixes = {os.fsencode(name) + b"=": name for name in names}
    try:
        with open(f"{_PROC}/{pid}/environ", "rb") as handle:
            raw = handle.read()
    except (FileNotFoundError, ProcessLookupError, PermissionError):
        return {}
    found: dict[str, str] = {}
    for entry in raw.split(b"\x00"):
        prefix, equals, _ = entry.partition(b"=")
        name = prefixes.get(prefix + equals)
        if name is not None and name not in found:
            found[name] = os.fsdecode(entry[len(prefix) + 1 :])
    return found


def cmdline_matches(recorded: Sequence[str], actual: Sequence[str] | None) -> bool:
    """True when ``actual`` (from /proc) is the process started with argv ``recorded``.

    Equal argv match. So does a script started through its ``#!`` line: the kernel
    shows ``[interpreter, (optional argument), script, args...]``, which ends with the
    argv the supervisor executed, so a longer ``actual`` ending with ``recorded``
    matches too.
    """
    if not recorded or not actual:
        return False
    want = tuple(recorded)
    have = tuple(actual)
    if have == want:
        return True
    extra = len(have) - len(want)
    return 0 < extra <= 2 and have[extra:] == want


def _pids() -> Iterable[int]:
    try:
        names = os.listdir(_PROC)
    except OSError:
        return ()
    return (int(name) for name in names if name.isdigit())


def scan() -> list[ProcStat]:
    """Every process's stat fields (one pass over /proc; vanished ones skipped)."""
    table: list[ProcStat] = []
    for pid in _pids():
        stat = read_stat(pid)
        if stat is not None:
            table.append(stat)
    return table


def children_of(pid: int) -> list[int]:
    """The pids whose parent is ``pid``.

    Reads /proc/PID/task/*/children (one small file per thread) when the kernel has
    it, and falls back to a full scan otherwise.
    """
    try:
        tids = os.listdir(f"{_PROC}/{pid}/task")
    except OSError:
        return []
    found: list[int] = []
    for tid in tids:
        try:
            with open(f"{_PROC}/{pid}/task/{tid}/children", "rb") as handle:
                found.extend(int(part) for part in handle.read().split())
        except FileNotFoundError:
            if not os.path.exists(f"{_PROC}/{pid}/task/{tid}"):
                continue
            return [stat.pid for stat in scan() if stat.ppid == pid]
        except (ProcessLookupError, PermissionError):
            continue
    return sorted(set(found))


def descendants(root: int, table: Sequence[ProcStat]) -> list[ProcStat]:
    """Every process below ``root`` in ``table``'s parent links (not ``root`` itself)."""
    by_parent: dict[int, list[ProcStat]] = {}
    for stat in table:
        by_parent.setdefault(stat.ppid, []).append(stat)
    found: list[ProcStat] = []
    seen = {root}
    stack = [root]
    while stack:
        for child in by_parent.get(stack.pop(), ()):
            if child.pid not in seen:
                seen.add(child.pid)
                found.append(child)
                stack.append(child.pid)
    return found


def boot_id() -> str:
    """This boot's random id: start ticks only identify a process within one boot."""
    try:
        with open(f"{_PROC}/sys/kernel/random/boot_id", encoding="ascii") as handle:
            return handle.read().strip()
    except OSError:
        return ""
