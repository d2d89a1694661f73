"""The machine a benchmark ran on, read at run time.

What: ``describe()`` returns ordered (name, value) facts: cores, memory, CPU model,
kernel, Python, and the versions of the tools compared against.

What not: no measuring.
"""

from __future__ import annotations

import os
import platform
import resource
import shutil
import subprocess

__all__ = ["describe"]


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as info:
            for line in info:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def _memory() -> str:
    try:
        with open("/proc/meminfo") as info:
            for line in info:
                if line.startswith("MemTotal:"):
                    return f"{int(line.split()[1]) / 1024 / 1024:.1f} GiB"
    except OSError:
        pass
    return "unknown"


def _cores() -> str:
    usable = len(os.sched_getaffinity(0))
    return f"{usable} usable ({os.cpu_count()} online)"


def _tool_version(name: str, argv: list[str]) -> str:
    path = shutil.which(name)
    if path is None:
        return "not installed"
    try:
        out = subprocess.run(argv, capture_output=True, text=True, timeout=10, check=False)
    except (OSError, subprocess.TimeoutExpired):
        return "unknown"
    text = (out.stdout or out.stderr).strip().splitlines()
    return text[0] if text else "unknown"


def _package_version(name: str) -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(name)
    except PackageNotFoundError:
        return "not installed"


def describe() -> dict[str, str]:
    """Facts about this machine, in display order."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    return {
        "CPU cores": _cores(),
        "CPU model": _cpu_model(),
        "Memory": _memory(),
        "Kernel": f"{platform.system()} {platform.release()}",
        "Python": f"{platform.python_implementation()} {platform.python_version()}",
        "Open files limit (soft/hard)": f"{soft}/{hard}",
        "supervisord": _package_version("supervisor"),
        "aiohttp": _package_version("aiohttp"),
        "grpcio": _package_version("grpcio"),
        "wrk": _tool_version("wrk", ["wrk", "--version"]),
    }
