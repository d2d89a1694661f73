"""Which programs this daemon may run: argv[0] resolution and the local allow-list.

A spec's command is an argv list, executed without a shell, so spaces, quotes, ``;``
or ``$(...)`` in arguments are just bytes handed to the program. What must be checked
is the program itself, and that check is local: ``CommandPolicy`` is built from the
daemon's own ``agents.allowed_commands``, which nothing sent over the network can
widen (DESIGN.md section 5).

``resolve`` runs when a desired state is validated, before anything changes:

1. a bare name (``python3``) is looked up in the daemon's PATH (absolute PATH entries
   only, so a ``.`` in PATH cannot make a relative result); a relative path with a
   slash (``bin/agent``) is refused;
2. the path is normalised (``/opt/a/../../bin/sh`` becomes ``/bin/sh``) and both it
   and its real path (symlinks followed) must match a pattern, so a symlink inside an
   allowed directory cannot point outside it;
3. the file must exist, be a regular file and be executable.

An empty allow-list allows nothing, and says so; ``allow_any`` (``reconciler dev``)
skips step 2 only. Errors are ``InvalidArgument`` naming ``<field>[0]``.

What it does not do: start anything (``reconciler.daemon.supervisor``), or check the
shape of a spec (``reconciler.model.spec.validate_spec``).
"""

from __future__ import annotations

import fnmatch
import os
import shutil
import stat
from collections.abc import Sequence

from reconciler.model.errors import InvalidArgument

__all__ = ["CommandPolicy"]


class CommandPolicy:
    """The daemon's local rule for which executables an agent may be."""

    def __init__(
        self,
        allowed_patterns: Sequence[str],
        allow_any: bool = False,
        *,
        search_path: str | None = None,
    ) -> None:
        """``search_path`` is the PATH used for bare names (default: the daemon's own)."""
        for pattern in allowed_patterns:
            if not isinstance(pattern, str) or not pattern.startswith("/"):
                raise ValueError(
                    f"agents.allowed_commands: {pattern!r} is not an absolute path pattern"
                )
        self.allowed_patterns: tuple[str, ...] = tuple(allowed_patterns)
        self.allow_any = allow_any
        raw_path = os.environ.get("PATH", os.defpath) if search_path is None else search_path
        self.search_path = os.pathsep.join(
            entry for entry in raw_path.split(os.pathsep) if entry.startswith("/")
        )

    def describe(self) -> str:
        """One line for the daemon's start-up log."""
        if self.allow_any:
            return "any executable may run as an agent (development mode)"
        if not self.allowed_patterns:
            return "agents.allowed_commands is empty: no agent command may run"
        return "agent commands must match: " + ", ".join(self.allowed_patterns)

    def resolve(self, command: Sequence[str], *, field: str) -> tuple[str, ...]:
        """Return ``command`` with an absolute, allowed, executable argv[0].

        ``field`` is the path of the command list in the request (for example
        ``agents[3].command``); errors about the program name ``<field>[0]``.
        """
        if not command:
            raise InvalidArgument(field, "must not be empty (an argv list: [program, args...])")
        program_field = f"{field}[0]"
        path = self._locate(command[0], field=program_field)
        real = os.path.realpath(path)
        self._check_allowed(path, real, field=program_field)
        _check_executable(path, real, field=program_field)
        return (path, *command[1:])

    def check_allowed(self, path: str, *, field: str) -> None:
        """Raise ``InvalidArgument`` unless the absolute ``path`` is allowed now.

        The allow-list half of ``resolve``, for a program resolved earlier (under
        settings that may have changed since). It does not ask for the file to exist:
        a program missing for a moment fails its start, and is retried, instead.
        """
        normal = _normalise(path)
        self._check_allowed(normal, os.path.realpath(normal), field=field)

    def _locate(self, program: str, *, field: str) -> str:
        if not isinstance(program, str) or not program:
            raise InvalidArgument(field, "the program must be a non-empty string")
        if "\x00" in program:
            raise InvalidArgument(field, "contains a NUL byte")
        if program.startswith("/"):
            return _normalise(program)
        if "/" in program:
            raise InvalidArgument(
                field, f"{program!r} is a relative path; use an absolute path or a bare name"
            )
        found = shutil.which(program, path=self.search_path)
        if found is None:
            raise InvalidArgument(
                field, f"{program!r} was not found on the daemon's PATH ({self.search_path})"
            )
        return _normalise(found)

    def _check_allowed(self, path: str, real: str, *, field: str) -> None:
        if self.allow_any:
            return
        if not self.allowed_patterns:
            raise InvalidArgument(
                field,
                f"{path} is not allowed: this daemon's agents.allowed_commands is empty, "
                "so no command may run (add a pattern such as '/usr/bin/*' to its config)",
            )
        if not self._matches(path):
            raise InvalidArgument(
                field, f"{path} matches no pattern in the daemon's agents.allowed_commands"
            )
        if real != path and not self._matches(real):
            raise InvalidArgument(
                field,
                f"{path} resolves to {real} through symbolic links, which matches no "
                "pattern in the daemon's agents.allowed_commands",
            )

    def _matches(self, path: str) -> bool:
        return any(fnmatch.fnmatchcase(path, pattern) for pattern in self.allowed_patterns)


def _normalise(path: str) -> str:
    normal = os.path.normpath(path)
    # normpath keeps a leading '//' (POSIX leaves its meaning open); Linux does not care.
    return "/" + normal.lstrip("/")


def _check_executable(path: str, real: str, *, field: str) -> None:
    try:
        info = os.stat(real)
    except FileNotFoundError:
        raise InvalidArgument(field, f"{path} does not exist") from None
    except OSError as error:
        raise InvalidArgument(field, f"{path} cannot be read: {error.strerror}") from None
    if not stat.S_ISREG(info.st_mode):
        raise InvalidArgument(field, f"{path} is not a regular file")
    if not os.access(real, os.X_OK) or not info.st_mode & 0o111:
        raise InvalidArgument(field, f"{path} is not executable")
