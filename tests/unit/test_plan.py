"""The planner: which agents each node runs, conflicts, and generation bumps."""

from __future__ import annotations

from dataclasses import replace

import pytest

from reconciler.manager.plan import (
    AgentConflict,
    NodeSelector,
    NodeState,
    SetDefinition,
    desired_agents,
    owners,
    plan,
)
from reconciler.model import AgentId, AgentSpec


def spec(agent_id: str, *, version: str = "1") -> AgentSpec:
    return AgentSpec(id=AgentId(agent_id), command=("/bin/sleep", "60"), version=version)


def agent_set(
    name: str,
    *agent_ids: str,
    labels: dict[str, str] | None = None,
    node_ids: tuple[str, ...] = (),
    version: str = "1",
) -> SetDefinition:
    selector = NodeSelector(match_labels=labels or {}, node_ids=frozenset(node_ids))
    agents = tuple(spec(a, version=version) for a in agent_ids)
    return SetDefinition(name=name, selector=selector, agents=agents)


EDGE_1 = NodeState("edge-1", {"role": "edge", "zone": "a"})
EDGE_2 = NodeState("edge-2", {"role": "edge", "zone": "b"})
CORE_1 = NodeState("core-1", {"role": "core", "zone": "a"})
NODES = (EDGE_1, EDGE_2, CORE_1)


def ids(node_id: str, sets: list[SetDefinition]) -> list[str]:
    node = next(n for n in NODES if n.node_id == node_id)
    return [s.id for s in desired_agents(node.node_id, node.labels, sets)]


@pytest.mark.parametrize(
    ("sets", "expected"),
    [
        pytest.param(
            [agent_set("all", "a")],
            {"edge-1": ["a"], "edge-2": ["a"], "core-1": ["a"]},
            id="empty-selector-selects-every-node",
        ),
        pytest.param(
            [agent_set("edge", "a", labels={"role": "edge"})],
            {"edge-1": ["a"], "edge-2": ["a"], "core-1": []},
            id="labels-select-matching-nodes",
        ),
        pytest.param(
            [agent_set("edge-a", "a", labels={"role": "edge", "zone": "a"})],
            {"edge-1": ["a"], "edge-2": [], "core-1": []},
            id="every-label-must-match",
        ),
        pytest.param(
            [agent_set("one", "a", node_ids=("core-1",))],
            {"edge-1": [], "edge-2": [], "core-1": ["a"]},
            id="node-ids-select-listed-nodes",
        ),
        pytest.param(
            [agent_set("either", "a", labels={"zone": "b"}, node_ids=("core-1",))],
            {"edge-1": [], "edge-2": ["a"], "core-1": ["a"]},
            id="labels-or-node-ids",
        ),
        pytest.param(
            [agent_set("s1", "b", "a"), agent_set("s2", "c", labels={"role": "edge"})],
            {"edge-1": ["a", "b", "c"], "edge-2": ["a", "b", "c"], "core-1": ["a", "b"]},
            id="union-of-selecting-sets-sorted-by-id",
        ),
    ],
)
def test_a_node_runs_the_union_of_the_sets_selecting_it(
    sets: list[SetDefinition], expected: dict[str, list[str]]
) -> None:
    assert {node.node_id: ids(node.node_id, sets) for node in NODES} == expected


def test_two_sets_placing_one_agent_on_a_node_conflict_naming_both_the_node_and_agent() -> None:
    sets = [agent_set("shippers", "ship", labels={"role": "edge"}), agent_set("zone-a", "ship")]
    with pytest.raises(AgentConflict) as caught:
        plan(sets, NODES, focus="zone-a")
    message = str(caught.value)
    assert "'shippers'" in message
    assert "'zone-a'" in message
    assert "'edge-1'" in message
    assert "'ship'" in message
    assert caught.value.sets == ("shippers", "zone-a")


def test_sets_with_one_agent_id_on_disjoint_nodes_do_not_conflict() -> None:
    sets = [
        agent_set("edge", "ship", labels={"role": "edge"}),
        agent_set("core", "ship", labels={"role": "core"}),
    ]
    assert owners("core-1", CORE_1.labels, sets) == {"ship": "core"}
    assert owners("edge-1", EDGE_1.labels, sets) == {"ship": "edge"}


def test_a_conflict_not_involving_the_focus_set_leaves_that_node_unchanged() -> None:
    sets = [
        agent_set("left", "x", node_ids=("edge-1",)),
        agent_set("right", "x", node_ids=("edge-1",)),
        agent_set("new", "y"),
    ]
    result = plan(sets, NODES, focus="new")
    assert [n.node_id for n in result.nodes] == ["core-1", "edge-2"]
    assert len(result.conflicts) == 1
    assert "'left'" in result.conflicts[0]


def stored(sets: list[SetDefinition], *, generation: int = 1) -> tuple[NodeState, ...]:
    """The nodes as if ``sets`` had been applied and stored at ``generation``."""
    return tuple(
        replace(n, generation=generation, agents=desired_agents(n.node_id, n.labels, sets))
        for n in NODES
    )


def test_applying_the_same_sets_again_changes_no_node() -> None:
    sets = [agent_set("edge", "a", "b", labels={"role": "edge"})]
    assert plan(sets, stored(sets), focus="edge").nodes == ()


def test_a_changed_spec_bumps_only_the_nodes_that_run_it() -> None:
    before = [agent_set("edge", "a", labels={"role": "edge"}), agent_set("all", "z")]
    after = [agent_set("edge", "a", labels={"role": "edge"}, version="2"), agent_set("all", "z")]
    result = plan(after, stored(before, generation=4), focus="edge")
    assert [(n.node_id, n.changed, n.previous_generation, n.generation) for n in result.nodes] == [
        ("edge-1", ("a",), 4, 5),
        ("edge-2", ("a",), 4, 5),
    ]


@pytest.mark.parametrize(
    ("before", "after", "added", "removed"),
    [
        pytest.param(
            [agent_set("s", "a")], [agent_set("s", "a", "b")], ("b",), (), id="agent-added"
        ),
        pytest.param(
            [agent_set("s", "a", "b")], [agent_set("s", "a")], (), ("b",), id="agent-removed"
        ),
        pytest.param(
            [agent_set("s", "a"), agent_set("t", "b")],
            [agent_set("t", "b")],
            (),
            ("a",),
            id="set-deleted",
        ),
    ],
)
def test_the_diff_names_added_and_removed_agents(
    before: list[SetDefinition],
    after: list[SetDefinition],
    added: tuple[str, ...],
    removed: tuple[str, ...],
) -> None:
    result = plan(after, stored(before), focus="s")
    assert {(n.added, n.removed, n.changed) for n in result.nodes} == {(added, removed, ())}
    assert all(n.generation == 2 for n in result.nodes)


def test_deleting_the_last_set_of_a_node_empties_it_with_a_new_generation() -> None:
    before = [agent_set("one", "a", node_ids=("core-1",))]
    result = plan([], stored(before, generation=3), focus="one")
    core = [n for n in result.nodes if n.node_id == "core-1"]
    assert core[0].agents == ()
    assert core[0].generation == 4
    assert core[0].removed == ("a",)


def test_a_node_without_agents_and_without_a_stored_state_is_not_touched() -> None:
    result = plan([agent_set("edge", "a", labels={"role": "edge"})], NODES)
    assert [n.node_id for n in result.nodes] == ["edge-1", "edge-2"]
    assert plan([], NODES).nodes == ()


def test_a_new_generation_is_numbered_above_what_the_daemon_holds() -> None:
    node = NodeState("edge-1", {"role": "edge"}, generation=0, held_generation=7)
    result = plan([agent_set("edge", "a")], [node])
    assert result.nodes[0].generation == 8


def test_a_daemon_holding_a_newer_generation_than_the_store_gets_one_above_it() -> None:
    sets = [agent_set("s", "a")]
    node = replace(stored(sets, generation=3)[0], held_generation=5)
    result = plan(sets, [node])
    assert [(n.previous_generation, n.generation, n.added) for n in result.nodes] == [(3, 6, ())]


def test_a_node_registering_later_gets_the_agents_of_the_sets_selecting_it() -> None:
    sets = [agent_set("edge", "a", labels={"role": "edge"})]
    newcomer = NodeState("edge-9", {"role": "edge"})
    result = plan(sets, [newcomer])
    assert [(n.node_id, n.added, n.generation) for n in result.nodes] == [("edge-9", ("a",), 1)]
