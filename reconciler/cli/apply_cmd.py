"""``reconciler apply -f FILE``: send AgentSets to the Manager (FleetService).

Every file is read and checked locally first (``reconciler.manager.agentset``, the
same rules the Manager applies again), so a typo fails before anything is sent. Each
AgentSet is then applied in turn and its result printed: created, configured or
unchanged, with the changes per node. ``--dry-run`` asks the Manager what would
change and changes nothing.

``--wait`` then polls the Manager until the applied sets have converged (every node
they touch has acted on its desired generation, and every agent of theirs that should
run is Running), showing a progress bar of nodes and agents on stderr. It exits 1
with the reasons when an agent fails for good or the timeout passes. Agents that will
not run (done after exiting 0, or held stopped by an operator) are not waited for;
the wait names them on stderr when it ends.

``--daemon ADDR`` applies to one standalone daemon instead, with no Manager: the
agents of the sets that select that node (by its id and labels, as the Manager would
place them) become its whole desired state, sent as the next generation with
SyncAgentStates; agents of earlier applies that no set places any more are stopped. A
daemon that takes its desired state from a Manager is refused, since the Manager would
replace what was sent.
"""

from __future__ import annotations

import asyncio
import json
import re
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field, replace
from typing import Any, Final

import click
import grpc
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from reconciler.api.agent.v1 import agent_pb2, node_pb2
from reconciler.api.daemon.v1 import daemon_pb2
from reconciler.api.fleet.v1 import fleet_pb2
from reconciler.cli.client import DaemonClient, FleetClient, run
from reconciler.cli.connection import ManagerConnection, manager_options
from reconciler.cli.get_cmd import enum_word
from reconciler.cli.options import DURATION, CliError
from reconciler.cli.output import OutputFormat, output_option, print_records
from reconciler.convert import message_to_dict, spec_from_proto, spec_to_proto
from reconciler.manager.agentset import AgentSetFileError, check_agent_set, load_agent_set_file
from reconciler.manager.fleet import node_change
from reconciler.manager.plan import AgentConflict, NodePlan, NodeState, SetDefinition, plan
from reconciler.model.errors import InvalidArgument
from reconciler.model.spec import AgentSpec

__all__ = ["Convergence", "apply", "convergence", "describe_change"]

#: Seconds between two polls of --wait.
POLL_INTERVAL_S: Final = 0.5


@click.command()
@click.option(
    "-f",
    "--file",
    "files",
    type=click.Path(exists=True, dir_okay=False),
    multiple=True,
    required=True,
    help="AgentSet YAML file. Repeatable.",
)
@click.option("--dry-run", is_flag=True, help="Validate on the Manager, change nothing.")
@click.option("--wait", is_flag=True, help="Wait until every selected node has converged.")
@click.option(
    "--timeout",
    type=DURATION,
    default="120s",
    show_default=True,
    help="How long --wait waits (e.g. 90s, 5m).",
)
@click.option(
    "--daemon",
    "daemon_address",
    metavar="ADDR",
    help="Apply to this standalone daemon (host:port or unix:PATH) instead of the Manager: "
    "the agents the sets place on its node become its whole desired state.",
)
@manager_options
@output_option()
@click.pass_context
def apply(
    ctx: click.Context,
    files: tuple[str, ...],
    dry_run: bool,
    wait: bool,
    timeout: float,
    daemon_address: str | None,
    connection: ManagerConnection,
    output: OutputFormat,
) -> None:
    """Create or update the AgentSets in FILE."""
    try:
        agent_sets = [message for path in files for message in load_agent_set_file(path)]
    except AgentSetFileError as error:
        raise CliError(str(error)) from None
    if daemon_address is not None:
        apply_to_daemon(
            DaemonClient(daemon_address, connection),
            agent_sets,
            dry_run=dry_run,
            wait_s=timeout if wait else None,
            output=output,
        )
        return
    client = FleetClient(connection)
    responses = run(_apply(client, agent_sets, dry_run=dry_run), address=client.address)
    _print_results(responses, output, dry_run=dry_run)
    if wait and not dry_run:
        final = run(_wait(client, responses, timeout_s=timeout), address=client.address)
        _end_wait(final, timeout_s=timeout)


async def _apply(
    client: FleetClient, agent_sets: Sequence[fleet_pb2.AgentSet], *, dry_run: bool
) -> list[fleet_pb2.ApplyAgentSetResponse]:
    responses = []
    async with client:
        for agent_set in agent_sets:
            request = fleet_pb2.ApplyAgentSetRequest(agent_set=agent_set, dry_run=dry_run)
            responses.append(await client.fleet.ApplyAgentSet(request, timeout=client.timeout_s))
    return responses


# ------------------------------------------------------------------------ --daemon


def apply_to_daemon(
    client: DaemonClient,
    agent_sets: Sequence[fleet_pb2.AgentSet],
    *,
    dry_run: bool,
    wait_s: float | None,
    output: OutputFormat,
) -> None:
    """``apply --daemon ADDR``: the sets' agents on that node, as its next generation."""
    try:
        definitions = [check_agent_set(message).definition for message in agent_sets]
    except InvalidArgument as error:
        raise CliError(str(error)) from None
    change = run(_sync_daemon(client, definitions, dry_run=dry_run), address=client.address,
                 peer="the daemon")  # fmt: skip
    if output is not OutputFormat.TABLE:
        print_records([_change_record(change, dry_run=dry_run)], output)
    elif change.generation == change.previous_generation:
        click.echo(f"node/{change.node_id} unchanged (generation {change.generation})")
    else:
        verb = "configured (dry run)" if dry_run else "configured"
        click.echo(f"node/{change.node_id} {verb}")
        click.echo(describe_change(change))
    if wait_s is not None and not dry_run:
        applied = change.generation if change.generation != change.previous_generation else 0
        final = run(_wait_daemon(client, change.node_id, applied, timeout_s=wait_s),
                    address=client.address, peer="the daemon")  # fmt: skip
        _end_wait(final, timeout_s=wait_s)


async def _sync_daemon(
    client: DaemonClient, definitions: Sequence[SetDefinition], *, dry_run: bool
) -> fleet_pb2.NodeChange:
    async with client:
        config = await client.daemon.GetConfig(
            daemon_pb2.GetConfigRequest(), timeout=client.timeout_s
        )
        settings = json.loads(config.settings_json or "{}")
        manager = settings.get("manager", {}).get("address", "")
        if manager:
            raise CliError(
                f"node {config.node_id} takes its desired state from the Manager at "
                f"{manager}: apply through the Manager (--manager), or run the daemon "
                "with manager.address empty"
            )
        listed = await client.daemon.ListAgents(
            daemon_pb2.ListAgentsRequest(), timeout=client.timeout_s
        )
        offered = {spec.id: spec for definition in definitions for spec in definition.agents}
        current = (spec_from_proto(a.spec) for a in listed.agents if a.spec.id)
        node = NodeState(
            node_id=config.node_id,
            labels=settings.get("node", {}).get("labels", {}),
            generation=listed.current_generation,
            agents=tuple(_as_offered(spec, offered.get(spec.id)) for spec in current),
        )
        try:
            planned = plan(definitions, [node]).nodes
        except AgentConflict as conflict:
            raise CliError(str(conflict)) from None
        if planned and not dry_run:
            await _send(client, planned[0])
    if not planned:
        return fleet_pb2.NodeChange(
            node_id=node.node_id, previous_generation=node.generation, generation=node.generation
        )
    return node_change(planned[0])


def _as_offered(current: AgentSpec, offered: AgentSpec | None) -> AgentSpec:
    """``current`` with argv[0] as ``offered`` names it, when that is the same program.

    The daemon keeps a bare program name (``agentlet``) resolved on its PATH
    (``/usr/local/bin/agentlet``), so a file that names it bare would otherwise differ
    from what the daemon holds at every apply, and bump the generation for nothing.
    """
    if offered is None or not offered.command or not current.command:
        return current
    program = offered.command[0]
    if "/" in program or not current.command[0].endswith(f"/{program}"):
        return current
    return replace(current, command=(program, *current.command[1:]))


async def _send(client: DaemonClient, node_plan: NodePlan) -> None:
    request = daemon_pb2.SyncAgentStatesRequest(
        node_id=node_plan.node_id,
        generation=node_plan.generation,
        agents=[spec_to_proto(spec) for spec in node_plan.agents],
    )
    try:
        await client.daemon.SyncAgentStates(request, timeout=client.timeout_s)
    except grpc.aio.AioRpcError as error:
        if error.code() is grpc.StatusCode.INVALID_ARGUMENT:
            refused = _name_agent(error.details() or "", node_plan)
            raise CliError(f"the daemon refused {refused}") from None
        if error.code() is not grpc.StatusCode.FAILED_PRECONDITION:
            raise
        raise CliError(
            f"node {node_plan.node_id} moved past generation {node_plan.previous_generation} "
            f"while this apply ran ({error.details()}); apply again"
        ) from None


def _name_agent(details: str, node_plan: NodePlan) -> str:
    """``agents[1].command[0]: ...`` -> ``agent 'tail' (agents[1].command[0]): ...``."""
    found = re.match(r"agents\[(\d+)\]", details)
    if found is None or int(found.group(1)) >= len(node_plan.agents):
        return details
    return f"agent {node_plan.agents[int(found.group(1))].id!r} ({details.replace(': ', '): ', 1)}"


def _change_record(change: fleet_pb2.NodeChange, *, dry_run: bool) -> dict[str, Any]:
    return {
        "nodeId": change.node_id,
        "previousGeneration": change.previous_generation,
        "generation": change.generation,
        "added": list(change.added_agent_ids),
        "changed": list(change.changed_agent_ids),
        "removed": list(change.removed_agent_ids),
        "dryRun": dry_run,
    }


async def _wait_daemon(
    client: DaemonClient, node_id: str, generation: int, *, timeout_s: float
) -> Convergence:
    """Poll the daemon as ``_wait`` polls the Manager, for one node."""

    async def snapshot() -> tuple[
        dict[str, int], list[node_pb2.NodeInfo], list[agent_pb2.AgentState]
    ]:
        listed = await client.daemon.ListAgents(
            daemon_pb2.ListAgentsRequest(), timeout=client.timeout_s
        )
        node = node_pb2.NodeInfo(
            node_id=node_id,
            desired_generation=listed.current_generation,
            observed_generation=listed.observed_generation,
        )
        for state in listed.agents:
            state.node_id = node_id
        return {node_id: generation}, [node], list(listed.agents)

    async with client:
        return await _poll(snapshot, timeout_s=timeout_s)


# ------------------------------------------------------------------------ printing


def describe_change(change: fleet_pb2.NodeChange) -> str:
    """One node's change: ``edge-1  generation 3 -> 4  +shipper ~tail -old``."""
    parts = [f"+{a}" for a in change.added_agent_ids]
    parts += [f"~{a}" for a in change.changed_agent_ids]
    parts += [f"-{a}" for a in change.removed_agent_ids]
    generations = f"generation {change.previous_generation} -> {change.generation}"
    return f"  {change.node_id}  {generations}  {' '.join(parts)}".rstrip()


def _verb(response: fleet_pb2.ApplyAgentSetResponse, *, dry_run: bool) -> str:
    if not response.changed:
        return "unchanged"
    created = response.agent_set.metadata.revision == 1
    verb = "created" if created else "configured"
    return f"{verb} (dry run)" if dry_run else verb


def _print_results(
    responses: Sequence[fleet_pb2.ApplyAgentSetResponse], output: OutputFormat, *, dry_run: bool
) -> None:
    if output is not OutputFormat.TABLE:
        print_records([message_to_dict(r) for r in responses], output)
        return
    for response in responses:
        name = response.agent_set.metadata.name
        revision = response.agent_set.metadata.revision
        click.echo(f"agentset/{name} {_verb(response, dry_run=dry_run)} (revision {revision})")
        for change in response.node_changes:
            click.echo(describe_change(change))
        if response.changed and not response.node_changes:
            click.echo("  no node's agents change")


# ------------------------------------------------------------------------ --wait


@dataclass(frozen=True, slots=True)
class Convergence:
    """How far the applied sets have come: counts for the progress bar, what is
    still pending, and what failed for good."""

    nodes_total: int = 0
    nodes_done: int = 0
    agents_total: int = 0
    agents_running: int = 0
    pending: tuple[str, ...] = ()
    failed: tuple[str, ...] = ()
    left_out: tuple[str, ...] = ()
    """Agents that should run but are not waited for, each with why (held stopped by
    an operator, or done: exited 0 under a policy that does not restart them)."""

    @property
    def converged(self) -> bool:
        return not self.pending and not self.failed


@dataclass
class _Tally:
    nodes_total: int = 0
    nodes_done: int = 0
    agents_total: int = 0
    agents_running: int = 0
    pending: list[str] = field(default_factory=list)
    failed: list[str] = field(default_factory=list)
    left_out: list[str] = field(default_factory=list)


def _phase(info: agent_pb2.AgentInfo) -> str:
    name = enum_word(agent_pb2.AgentPhase.Name(info.phase), "AGENT_PHASE_")
    return f"{name} ({info.message})" if info.message else name


def convergence(
    targets: dict[str, int],
    nodes: Sequence[node_pb2.NodeInfo],
    agents: Sequence[agent_pb2.AgentState],
) -> Convergence:
    """Pure: have the nodes in ``targets`` (node id -> generation the apply produced,
    0 where it left the node's desired state as it was) and the desired-running
    ``agents`` of the applied sets converged?

    Agents that will not run are left out (``_left_out_because``).
    """
    tally = _Tally()
    by_id = {node.node_id: node for node in nodes}
    acted: set[str] = set()
    for node_id, generation in sorted(targets.items()):
        tally.nodes_total += 1
        node = by_id.get(node_id)
        wanted = max(generation, node.desired_generation if node else 0)
        if node is not None and node.observed_generation >= wanted:
            tally.nodes_done += 1
            acted.add(node_id)
        elif node is None:
            tally.pending.append(f"node {node_id}: no longer registered")
        else:
            status = enum_word(node_pb2.NodeStatus.Name(node.status), "NODE_STATUS_")
            tally.pending.append(
                f"node {node_id}: observed generation {node.observed_generation} < "
                f"{wanted} (status {status})"
            )
    for state in agents:
        if state.spec.state != agent_pb2.DESIRED_STATE_RUNNING:
            continue
        where = f"agent {state.spec.id} on {state.node_id}"
        if state.node_id in acted:
            why = _left_out_because(state, node_changed=bool(targets.get(state.node_id)))
            if why is not None:
                tally.left_out.append(f"{where}: {why}")
                continue
        tally.agents_total += 1
        if state.info.phase == agent_pb2.AGENT_PHASE_RUNNING and state.node_id in acted:
            tally.agents_running += 1
        elif state.info.phase == agent_pb2.AGENT_PHASE_FAILED and state.node_id in acted:
            tally.failed.append(f"{where}: {_phase(state.info)}")
        else:
            tally.pending.append(
                f"{where}: {_phase(state.info) if state.HasField('info') else 'not reported yet'}"
            )
    return Convergence(
        tally.nodes_total,
        tally.nodes_done,
        tally.agents_total,
        tally.agents_running,
        tuple(tally.pending),
        tuple(tally.failed),
        tuple(tally.left_out),
    )


_NOT_RESTARTED_AFTER_SUCCESS = (
    agent_pb2.RESTART_POLICY_ON_FAILURE,
    agent_pb2.RESTART_POLICY_NEVER,
)


def _left_out_because(state: agent_pb2.AgentState, *, node_changed: bool) -> str | None:
    """Why an agent that should run, on a node that acted, is not waited for; or None.

    An operator's stop holds it until started again; a new generation clears that
    override, so on a node the apply changed, the override seen may be an older
    report's and the agent is waited for. An agent that exited 0 under OnFailure or
    Never is done: its node does not start it again.
    """
    info = state.info
    if info.override == agent_pb2.OVERRIDE_STOP and not node_changed:
        return "stopped by an operator (`reconciler agent start` resumes it)"
    exit_code = info.last_exit.exit_code if info.last_exit.HasField("exit_code") else None
    if (
        info.phase == agent_pb2.AGENT_PHASE_STOPPED
        and exit_code == 0
        and state.spec.restart_policy in _NOT_RESTARTED_AFTER_SUCCESS
    ):
        policy = enum_word(
            agent_pb2.RestartPolicy.Name(state.spec.restart_policy), "RESTART_POLICY_"
        )
        return f"completed (exited with code 0; restartPolicy {policy})"
    return None


async def _snapshot(
    client: FleetClient, names: Sequence[str]
) -> tuple[list[node_pb2.NodeInfo], list[agent_pb2.AgentState]]:
    nodes = await client.fleet.ListNodes(fleet_pb2.ListNodesRequest(), timeout=client.timeout_s)
    agents: list[agent_pb2.AgentState] = []
    for name in names:
        request = fleet_pb2.ListAgentsRequest(agent_set=name)
        listed = await client.fleet.ListAgents(request, timeout=client.timeout_s)
        agents.extend(listed.agents)
    return list(nodes.nodes), agents


def _targets(
    responses: Sequence[fleet_pb2.ApplyAgentSetResponse], agents: Sequence[agent_pb2.AgentState]
) -> dict[str, int]:
    targets: dict[str, int] = {state.node_id: 0 for state in agents}
    for response in responses:
        for change in response.node_changes:
            targets[change.node_id] = max(targets.get(change.node_id, 0), change.generation)
    return targets


#: One look at the fleet for --wait: node id -> the generation the apply produced,
#: the nodes, and the applied agents.
Snapshot = Callable[
    [], Awaitable[tuple[dict[str, int], list[node_pb2.NodeInfo], list[agent_pb2.AgentState]]]
]


async def _wait(
    client: FleetClient,
    responses: Sequence[fleet_pb2.ApplyAgentSetResponse],
    *,
    timeout_s: float,
) -> Convergence:
    """Poll the Manager until converged, an agent failed for good, or the timeout."""
    names = [r.agent_set.metadata.name for r in responses]

    async def snapshot() -> tuple[
        dict[str, int], list[node_pb2.NodeInfo], list[agent_pb2.AgentState]
    ]:
        nodes, agents = await _snapshot(client, names)
        return _targets(responses, agents), nodes, agents

    async with client:
        return await _poll(snapshot, timeout_s=timeout_s)


async def _poll(snapshot: Snapshot, *, timeout_s: float) -> Convergence:
    """Until converged, an agent failed for good, or the timeout; the last state,
    with progress bars of nodes and agents on stderr."""
    deadline = time.monotonic() + timeout_s
    columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn())
    with Progress(*columns, TimeElapsedColumn(), console=Console(stderr=True)) as progress:
        nodes_bar = progress.add_task("nodes converged ", total=None)
        agents_bar = progress.add_task("agents running  ", total=None)
        while True:
            state = convergence(*await snapshot())
            progress.update(nodes_bar, total=state.nodes_total, completed=state.nodes_done)
            progress.update(agents_bar, total=state.agents_total, completed=state.agents_running)
            if state.converged or state.failed or time.monotonic() >= deadline:
                return state
            await asyncio.sleep(POLL_INTERVAL_S)


def _end_wait(state: Convergence, *, timeout_s: float) -> None:
    """Name the agents left out of the wait; exit 1 with the reasons unless converged."""
    for note in state.left_out:
        click.echo(f"note: {note}", err=True)
    if not state.converged:
        raise CliError(_failure_text(state, timeout_s=timeout_s))


def _failure_text(state: Convergence, *, timeout_s: float) -> str:
    if state.failed:
        lines = ["failed: agents stopped for good:", *(f"  {p}" for p in state.failed)]
    else:
        lines = [f"not converged within {timeout_s:g}s:", *(f"  {p}" for p in state.pending)]
    return "\n".join(lines)
