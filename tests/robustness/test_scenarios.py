"""One node under one fault at a time, with every invariant checked before and after.

``RECONCILER_ROBUSTNESS=short`` (the default, part of ``make test``) injects about 26
faults over two scenarios, every kind at least once; ``make robustness`` runs the long
profile (``RECONCILER_ROBUSTNESS=long``: 1,100 faults, at most 40 minutes). The seed
is printed at the start and in every failure; ``RECONCILER_ROBUSTNESS_SEED``,
``..._FAULTS``, ``..._DURATION_S`` and ``..._CONVERGE_S`` override the profile, and
``RECONCILER_ROBUSTNESS_REPORT=FILE`` appends each scenario's figures to FILE (JSON
lines). A scenario's directory (daemon and Manager logs, a copy of the state) stays
under pytest's tmp_path for inspection.
"""

from __future__ import annotations

import json
import os
from functools import partial
from pathlib import Path

import pytest

from tests.robustness.faults import STANDALONE, WITH_MANAGER, Fault, schedule
from tests.robustness.node import ensure_tools
from tests.robustness.runner import Profile, Scenario

PROFILE = Profile.from_env()

pytestmark = [pytest.mark.slow, pytest.mark.timeout(int(PROFILE.duration_s * 1.5) + 300)]

#: (name, faults, share of the profile's faults and time, with a Manager)
SCENARIOS: list[tuple[str, list[tuple[str, Fault, float]], float, bool]] = [
    ("standalone", STANDALONE, 0.6, False),
    ("with-manager", WITH_MANAGER, 0.4, True),
]


@pytest.fixture(scope="module", autouse=True)
def tools() -> None:
    ensure_tools()


@pytest.mark.parametrize(
    ("name", "faults", "share", "with_manager"),
    [pytest.param(*s, id=s[0]) for s in SCENARIOS],
)
def test_a_node_keeps_its_promises_through_one_fault_at_a_time(
    tmp_path: Path,
    name: str,
    faults: list[tuple[str, Fault, float]],
    share: float,
    with_manager: bool,
) -> None:
    profile = PROFILE.share(share)
    run = Scenario(tmp_path / name, profile, name=name, with_manager=with_manager)
    try:
        run.start()
        count = max(profile.faults, len(faults))
        run.run(partial(schedule, faults, count), at_least=len(faults))
    finally:
        run.close()
    summary = {
        "scenario": name,
        "profile": profile.name,
        "seed": profile.seed,
        **run.stats.summary(),
    }
    print(json.dumps(summary, indent=2))
    report = os.environ.get("RECONCILER_ROBUSTNESS_REPORT", "")
    if report:
        with open(report, "a") as out:
            out.write(json.dumps(summary) + "\n")
    assert summary["faults"] >= 1
