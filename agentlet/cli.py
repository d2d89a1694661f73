"""The ``agentlet`` command: ``agentlet run [options] -- CMD ARGS...``.

What: argument parsing (argparse: nothing to import at start-up), overriding the
environment's settings with flags, logging set-up, and the exit code.

What not: the supervision itself (``agentlet.shim``).
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import sys
from collections.abc import Sequence

from agentlet import __version__
from agentlet.config import (
    AGENT_ID_PATTERN,
    ENV_AGENT_ID,
    ENV_HTTP_LISTEN,
    ENV_INTERVAL,
    AgentletConfig,
    ConfigError,
    parse_interval,
    parse_listen,
)
from agentlet.shim import ShimError, run_shim

__all__ = ["build_parser", "main"]

_USAGE_ERROR = 2


def build_parser() -> argparse.ArgumentParser:
    """The top-level parser with its ``run`` sub-command."""
    parser = argparse.ArgumentParser(
        prog="agentlet",
        description="Give any program reconciler heartbeats and an agent HTTP API.",
    )
    parser.add_argument("--version", action="version", version=f"agentlet {__version__}")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    run = commands.add_parser(
        "run",
        help="run CMD as a child and heartbeat on its behalf",
        description=(
            "Run CMD (argv, no shell) as a child, heartbeat with the cpu and memory of its "
            "process tree, pass signals through, map POST /reload to SIGHUP, and exit with "
            "the child's exit code (128+N when killed by signal N). Settings come from the "
            "RECONCILER_* environment; flags override them."
        ),
        usage="agentlet run [--id ID] [--interval S] [--http-listen ADDR] -- CMD [ARGS...]",
    )
    run.add_argument("--id", dest="agent_id", help="agent id (default $RECONCILER_AGENT_ID)")
    run.add_argument(
        "--interval",
        metavar="S",
        help="seconds between heartbeats (default $RECONCILER_HEARTBEAT_INTERVAL_S or 5)",
    )
    run.add_argument(
        "--http-listen",
        metavar="ADDR",
        help="host:port or port for /health /reload /metrics (default $AGENTLET_HTTP_LISTEN)",
    )
    run.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error"])
    run.add_argument("argv", nargs=argparse.REMAINDER, metavar="CMD [ARGS...]")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the console script; returns (and exits with) the exit code."""
    parser = build_parser()
    args = parser.parse_args(argv)
    command = list(args.argv)
    if command and command[0] == "--":
        command = command[1:]
    if not command:
        parser.error("run: give the command after --, e.g. agentlet run -- /bin/sleep 60")
    logging.basicConfig(
        level=args.log_level.upper(), format="agentlet[%(process)d] %(levelname)s %(message)s"
    )
    try:
        config = _config_from(args)
    except ConfigError as exc:
        print(f"agentlet: error: {exc}", file=sys.stderr)
        return _USAGE_ERROR
    try:
        code = asyncio.run(run_shim(command, config))
    except ShimError as exc:
        print(f"agentlet: {exc}", file=sys.stderr)
        code = exc.exit_code
    return code


def _config_from(args: argparse.Namespace) -> AgentletConfig:
    """Flags are checked under their own names, then stand in for their variables."""
    env = dict(os.environ)
    if args.agent_id is not None:
        if AGENT_ID_PATTERN.fullmatch(args.agent_id) is None:
            raise ConfigError("--id", "must be 1-63 characters [A-Za-z0-9._-]")
        env[ENV_AGENT_ID] = args.agent_id
    if args.interval is not None:
        env[ENV_INTERVAL] = str(parse_interval(args.interval, variable="--interval"))
    if args.http_listen is not None:
        env[ENV_HTTP_LISTEN] = str(parse_listen(args.http_listen, variable="--http-listen"))
    return AgentletConfig.from_env(env)
