"""The invariant checks catch what they promise to catch (so a green run means something)."""

from __future__ import annotations

import dataclasses

import pytest

from tests.robustness.invariants import (
    AgentView,
    Gap,
    Intent,
    Invariant,
    Observation,
    adoption_gaps,
    always,
    convergence_gaps,
    manager_gaps,
)
from tests.robustness.procs import Proc

RUNNING, STOPPED = "AGENT_PHASE_RUNNING", "AGENT_PHASE_STOPPED"


def proc(pid: int, agent_id: str, *, sid: int = 0, grandchild: bool = False) -> Proc:
    return Proc(
        pid=pid, ppid=1, sid=sid or pid, state="S", agent_id=agent_id, grandchild=grandchild
    )


GOOD = Observation(
    current_generation=3,
    observed_generation=3,
    agents={"a": AgentView("a", RUNNING, 10), "b": AgentView("b", STOPPED, 0)},
    procs=[proc(10, "a"), proc(11, "a", sid=10)],
)
INTENT = Intent(3, running=frozenset({"a"}), stopped=frozenset({"b"}))


def kinds(gaps: list[Gap]) -> set[Invariant]:
    return {gap.invariant for gap in gaps}


def test_a_converged_node_shows_no_gaps() -> None:
    assert always(GOOD, confirmed_stopped={"b"}, acked=3) == []
    assert convergence_gaps(GOOD, INTENT) == []


@pytest.mark.parametrize(
    ("obs", "invariant"),
    [
        pytest.param(
            Observation(procs=[proc(10, "a"), proc(12, "a")]),
            Invariant.ONE_INSTANCE,
            id="two-instances",
        ),
        pytest.param(
            Observation(procs=[proc(13, "b")]), Invariant.STOPPED_NEVER_RUNS, id="stopped-runs"
        ),
        pytest.param(
            Observation(current_generation=2), Invariant.GENERATION_SURVIVES, id="generation-lost"
        ),
    ],
)
def test_what_must_always_hold_is_caught_at_once(obs: Observation, invariant: Invariant) -> None:
    assert kinds(always(obs, confirmed_stopped={"b"}, acked=3)) == {invariant}


def test_a_grandchild_in_a_session_of_its_own_is_not_a_second_instance() -> None:
    obs = Observation(procs=[proc(10, "a"), proc(14, "a", grandchild=True)])
    assert always(obs, confirmed_stopped=(), acked=0) == []


@pytest.mark.parametrize(
    ("change", "invariant"),
    [
        pytest.param({"current_generation": 2}, Invariant.CONVERGES, id="behind"),
        pytest.param({"observed_generation": 2}, Invariant.CONVERGES, id="not-acted-on"),
        pytest.param(
            {"agents": {"b": AgentView("b", STOPPED, 0)}}, Invariant.CONVERGES, id="not-running"
        ),
        pytest.param({"zombies": [99]}, Invariant.NO_ZOMBIES, id="zombie"),
        pytest.param(
            {"procs": [proc(10, "a"), proc(20, "a", sid=7)]}, Invariant.NO_ORPHANS, id="leftover"
        ),
        pytest.param(
            {"procs": [proc(10, "a"), proc(21, "b", sid=8)]}, Invariant.NO_ORPHANS, id="stopped"
        ),
    ],
)
def test_what_convergence_requires_is_caught(
    change: dict[str, object], invariant: Invariant
) -> None:
    obs = dataclasses.replace(GOOD, **change)  # type: ignore[arg-type]
    assert invariant in kinds(convergence_gaps(obs, INTENT))


def test_a_restarted_agent_breaks_adoption_and_a_stale_manager_breaks_agreement() -> None:
    assert GOOD.agents is not None
    assert kinds(adoption_gaps({"a": 9}, GOOD.agents)) == {Invariant.ADOPTED}
    assert adoption_gaps({"a": 10}, GOOD.agents) == []
    stale = {"a": AgentView("a", RUNNING, 9), "b": GOOD.agents["b"]}
    assert kinds(manager_gaps(GOOD.agents, stale)) == {Invariant.MANAGER_AGREES}
    assert manager_gaps(GOOD.agents, dict(GOOD.agents)) == []
