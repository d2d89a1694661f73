"""Spec validation and the phase transition table."""

from __future__ import annotations

from dataclasses import replace

import pytest

from reconciler.model import (
    AgentId,
    AgentRecord,
    AgentSpec,
    Generation,
    HeartbeatSpec,
    IllegalTransition,
    InvalidArgument,
    NodeDesiredState,
    Phase,
    transition,
    validate_node_state,
)
from reconciler.model.status import ALLOWED

GOOD = AgentSpec(id=AgentId("a"), command=("/bin/sleep", "10"))


@pytest.mark.parametrize(
    ("changes", "field"),
    [
        pytest.param({"id": AgentId("")}, "agents[0].id", id="empty-id"),
        pytest.param({"id": AgentId("../etc")}, "agents[0].id", id="path-in-id"),
        pytest.param({"command": ()}, "agents[0].command", id="empty-argv"),
        pytest.param({"command": ("bin/sleep",)}, "agents[0].command[0]", id="relative-path"),
        pytest.param({"command": ("/bin/sleep", "a\x00b")}, "agents[0].command[1]", id="nul-byte"),
        pytest.param(
            {"env": {"LD_PRELOAD": "/x.so"}}, "agents[0].env[LD_PRELOAD]", id="ld-preload"
        ),
        pytest.param({"env": {"A=B": "x"}}, "agents[0].env['A=B']", id="bad-env-name"),
        pytest.param(
            {"env": {"RECONCILER_AGENT_TOKEN": "x"}},
            "agents[0].env[RECONCILER_AGENT_TOKEN]",
            id="reserved-env",
        ),
        pytest.param({"working_dir": "tmp"}, "agents[0].workingDir", id="relative-workdir"),
        pytest.param(
            {"stop_grace_period_s": float("nan")},
            "agents[0].stopGracePeriodSeconds",
            id="nan-grace",
        ),
        pytest.param(
            {"heartbeat": HeartbeatSpec(interval_s=5, timeout_s=1)},
            "agents[0].heartbeat.timeoutSeconds",
            id="timeout-below-interval",
        ),
    ],
)
def test_an_invalid_spec_is_refused_naming_the_field(
    changes: dict[str, object], field: str
) -> None:
    bad = replace(GOOD, **changes)  # type: ignore[arg-type]
    state = NodeDesiredState(Generation(1), (bad,))
    with pytest.raises(InvalidArgument) as caught:
        validate_node_state(state)
    assert caught.value.field == field


def test_duplicate_agent_ids_on_a_node_are_refused() -> None:
    with pytest.raises(InvalidArgument, match="duplicate agent id"):
        validate_node_state(NodeDesiredState(Generation(1), (GOOD, GOOD)))


def test_a_bare_program_name_passes_shape_validation() -> None:
    validate_node_state(NodeDesiredState(Generation(1), (replace(GOOD, command=("sleep", "1")),)))


def test_the_fingerprint_ignores_labels_and_state_only() -> None:
    assert replace(GOOD, labels={"a": "b"}).fingerprint() == GOOD.fingerprint()
    assert replace(GOOD, version="2").fingerprint() != GOOD.fingerprint()
    assert replace(GOOD, env={"A": "1"}).fingerprint() != GOOD.fingerprint()


def test_every_phase_lists_where_it_may_go() -> None:
    assert set(ALLOWED) == set(Phase)


def test_an_unlisted_transition_is_refused() -> None:
    record = AgentRecord(agent_id=AgentId("a"), phase=Phase.STOPPED)
    with pytest.raises(IllegalTransition, match="Stopped -> Stopping"):
        transition(record, Phase.STOPPING)


def test_a_live_phase_without_a_pid_is_refused() -> None:
    with pytest.raises(IllegalTransition, match="needs a pid"):
        transition(AgentRecord(agent_id=AgentId("a")), Phase.RUNNING)
