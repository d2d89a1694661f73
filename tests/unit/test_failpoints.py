"""Failpoints: off by default, switched per test in-process, or by the environment."""

from __future__ import annotations

import signal
import subprocess
import sys

import pytest

from reconciler import failpoints
from reconciler.failpoints import Action, FailpointError, failpoint


def test_a_failpoint_without_an_action_does_nothing() -> None:
    before = failpoints.hits("store.after_tmp_fsync")
    failpoint("store.after_tmp_fsync")
    assert failpoints.hits("store.after_tmp_fsync") == before


def test_a_raise_failpoint_raises_inside_the_block_only() -> None:
    with failpoints.set("test.point", "raise"), pytest.raises(FailpointError, match=r"test\.point"):
        failpoint("test.point")
    failpoint("test.point")
    assert "test.point" not in failpoints.active()


def test_nested_settings_restore_the_outer_action() -> None:
    with failpoints.set("test.nested", "raise"):
        with failpoints.set("test.nested", "off"):
            failpoint("test.nested")
        with pytest.raises(FailpointError):
            failpoint("test.nested")


def test_hits_count_each_firing() -> None:
    before = failpoints.hits("test.counted")
    with failpoints.set("test.counted", "off"):
        failpoint("test.counted")
        failpoint("test.counted")
    assert failpoints.hits("test.counted") == before + 2


def test_a_spec_lists_several_points_separated_by_semicolons() -> None:
    table = failpoints.parse(" store.before_write=kill ; a.b=raise;c.d=sleep(0.25);; e.f=off ")
    assert table == {
        "store.before_write": Action("kill"),
        "a.b": Action("raise"),
        "c.d": Action("sleep", 0.25),
        "e.f": Action("off"),
    }


@pytest.mark.parametrize(
    "spec",
    [
        pytest.param("store.before_write", id="no-action"),
        pytest.param("store.before_write=explode", id="unknown-action"),
        pytest.param("nodot=kill", id="name-without-a-dot"),
        pytest.param("a.b=sleep(-1)", id="negative-sleep"),
        pytest.param("a.b=sleep(99999)", id="sleep-too-long"),
        pytest.param("a.b=sleep()", id="sleep-without-seconds"),
    ],
)
def test_a_malformed_spec_is_an_error_naming_the_entry(spec: str) -> None:
    with pytest.raises(ValueError, match="RECONCILER_FAILPOINTS"):
        failpoints.parse(spec)


def test_the_environment_is_read_at_import_and_kill_sends_sigkill() -> None:
    code = "from reconciler.failpoints import failpoint; failpoint('x.y'); print('survived')"
    child = subprocess.run(
        [sys.executable, "-c", code],
        env={"RECONCILER_FAILPOINTS": "x.y=kill"},
        capture_output=True,
        timeout=60,
        check=False,
    )
    assert child.returncode == -signal.SIGKILL
    assert b"survived" not in child.stdout


def test_a_malformed_environment_fails_loudly_at_import() -> None:
    child = subprocess.run(
        [sys.executable, "-c", "import reconciler.failpoints"],
        env={"RECONCILER_FAILPOINTS": "x.y=explode"},
        capture_output=True,
        timeout=60,
        check=False,
    )
    assert child.returncode != 0
    assert b"x.y=explode" in child.stderr
