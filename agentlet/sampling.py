"""CPU and memory samples for the heartbeat: of this process, or of a process tree.

What: the ``Sampler`` Protocol, ``ProcessSampler`` (one process, by default this one)
and ``TreeSampler`` (a root pid and all its descendants, for the shim). CPU is percent
of one core since the previous sample (psutil semantics: the first sample is 0).
``FixedSampler`` is the fake for tests.

What not: no scheduling; the heartbeater decides when to sample and whether to do it
off the event loop (``Sampler.blocking``: a tree walk costs ~70 µs per process).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import psutil

from agentlet.heartbeat import clamp_cpu, clamp_memory

__all__ = ["FixedSampler", "ProcessSampler", "Sample", "Sampler", "TreeSampler"]


@dataclass(frozen=True, slots=True)
class Sample:
    """One reading: cpu percent of one core, resident bytes."""

    cpu_percent: float
    memory_bytes: int


class Sampler(Protocol):
    """Reads resource use; never raises (a vanished process reads as zero)."""

    @property
    def blocking(self) -> bool:
        """True when ``sample`` may take long enough to belong on a worker thread."""
        ...

    def sample(self) -> Sample:
        """Take one reading now."""
        ...


class ProcessSampler:
    """One process (this one unless ``pid`` is given)."""

    blocking = False

    def __init__(self, pid: int | None = None) -> None:
        self._process = psutil.Process(pid)
        self._read(self._process)  # prime cpu_percent so the next call has a baseline

    def sample(self) -> Sample:
        cpu, rss = self._read(self._process)
        return Sample(cpu_percent=clamp_cpu(cpu), memory_bytes=clamp_memory(rss))

    @staticmethod
    def _read(process: psutil.Process) -> tuple[float, int]:
        try:
            with process.oneshot():
                return process.cpu_percent(None), process.memory_info().rss
        except psutil.Error:
            return 0.0, 0


class TreeSampler:
    """A root process and all its descendants, summed (cpu may exceed 100)."""

    blocking = True

    def __init__(self, root_pid: int) -> None:
        self._root_pid = root_pid
        self._known: dict[int, psutil.Process] = {}

    def sample(self) -> Sample:
        live = self._current_tree()
        cpu = 0.0
        rss = 0
        for pid, process in live.items():
            known = self._known.get(pid)
            reading = ProcessSampler._read(known if known is not None else process)
            cpu += reading[0] if known is not None else 0.0
            rss += reading[1]
        self._known = {pid: self._known.get(pid, process) for pid, process in live.items()}
        return Sample(cpu_percent=clamp_cpu(cpu), memory_bytes=clamp_memory(rss))

    def _current_tree(self) -> dict[int, psutil.Process]:
        try:
            root = self._known.get(self._root_pid) or psutil.Process(self._root_pid)
            tree = [root, *root.children(recursive=True)]
        except psutil.Error:
            return {}
        return {process.pid: process for process in tree}


class FixedSampler:
    """A sampler that returns the same reading every time (for tests)."""

    blocking = False

    def __init__(self, cpu_percent: float = 0.0, memory_bytes: int = 0) -> None:
        self.reading = Sample(cpu_percent=cpu_percent, memory_bytes=memory_bytes)

    def sample(self) -> Sample:
        return self.reading
