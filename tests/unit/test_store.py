"""The state directory: round-trips, corrupt files moved aside, safety, bounds, costs."""

from __future__ import annotations

import json
import math
import os
import stat
import time
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from reconciler import failpoints
from reconciler.daemon.clock import FakeClock
from reconciler.daemon.store import (
    DESIRED_FILE,
    FINISHED_FILE,
    OPERATIONS_FILE,
    OVERRIDES_FILE,
    PATCHES_FILE,
    PROCESSES_FILE,
    DesiredStateStore,
    FinishedEntry,
    MemoryStore,
    OperationResult,
    OverrideEntry,
    Patches,
    ProcessEntry,
    StateDirInUse,
    StateDirLock,
    StateStore,
    UnsafeStateDir,
    check_generation,
    prune_overrides,
    require_not_stale,
    spec_from_json,
    spec_to_json,
)
from reconciler.failpoints import FailpointError
from reconciler.model import (
    AgentId,
    AgentSpec,
    DesiredState,
    Generation,
    HeartbeatSpec,
    InvalidArgument,
    NodeDesiredState,
    OperationId,
    Override,
    RestartPolicy,
    StaleGeneration,
)

FULL_SPEC = AgentSpec(
    id=AgentId("shipper"),
    command=("/usr/bin/python3", "-m", "shipper", "--fast", "ünïcode ☃"),
    env={"LOG_LEVEL": "info", "EMPTY": ""},
    working_dir="/var/lib/shipper",
    version="1.4.2",
    state=DesiredState.STOPPED,
    restart_policy=RestartPolicy.ON_FAILURE,
    heartbeat=HeartbeatSpec(interval_s=5, timeout_s=15.5),
    stop_grace_period_s=10,
    config={"batch": 500, "ratio": 0.25, "nested": {"list": [1, "two", None, True]}, "n": None},
    labels={"team": "obs"},
    user="nobody",
)


def state_of(generation: int, *specs: AgentSpec) -> NodeDesiredState:
    return NodeDesiredState(generation=Generation(generation), agents=specs)


def sleeper(agent_id: str) -> AgentSpec:
    return AgentSpec(id=AgentId(agent_id), command=("/bin/sleep", "60"))


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


@pytest.fixture
def state_dir(tmp_path: Path) -> Path:
    return tmp_path / "state"


@pytest.fixture
def store(state_dir: Path, clock: FakeClock) -> DesiredStateStore:
    return DesiredStateStore(state_dir, clock=clock)


def reopen(store: DesiredStateStore, clock: FakeClock) -> DesiredStateStore:
    return DesiredStateStore(store.state_dir, clock=clock)


# -- generations ------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("current", "offered", "verdict"),
    [
        pytest.param(3, 4, "accept", id="newer"),
        pytest.param(3, 3, "same", id="same"),
        pytest.param(3, 2, "stale", id="older"),
        pytest.param(0, 0, "same", id="empty-store-offered-zero"),
    ],
)
def test_generations_are_judged_newer_same_or_stale(
    current: int, offered: int, verdict: str
) -> None:
    assert check_generation(current, offered) == verdict


def test_a_stale_generation_raises_carrying_both_generations() -> None:
    with pytest.raises(StaleGeneration) as caught:
        require_not_stale(7, 5)
    assert (caught.value.offered, caught.value.current) == (5, 7)


# -- AgentSpec JSON ---------------------------------------------------------------------


def test_a_spec_with_every_field_set_round_trips_exactly() -> None:
    back = spec_from_json(json.loads(json.dumps(spec_to_json(FULL_SPEC))))
    assert back == FULL_SPEC
    assert back.fingerprint() == FULL_SPEC.fingerprint()
    assert type(back.stop_grace_period_s) is int, "an int stays an int"


json_values = st.recursive(
    st.none()
    | st.booleans()
    | st.integers()
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(), inner, max_size=4),
    max_leaves=20,
)


@settings(max_examples=150, suppress_health_check=[HealthCheck.too_slow])
@given(
    command=st.lists(st.text(min_size=1), min_size=1, max_size=5),
    env=st.dictionaries(st.text(min_size=1), st.text(), max_size=4),
    config=st.dictionaries(st.text(), json_values, max_size=4),
    grace=st.integers(0, 100) | st.floats(0, 100),
    heartbeat=st.none() | st.builds(HeartbeatSpec, st.floats(0.1, 10), st.floats(10, 20)),
)
def test_any_spec_round_trips_through_json_text(
    command: list[str],
    env: dict[str, str],
    config: dict[str, Any],
    grace: float,
    heartbeat: HeartbeatSpec | None,
) -> None:
    spec = AgentSpec(
        id=AgentId("a"),
        command=tuple(command),
        env=env,
        heartbeat=heartbeat,
        stop_grace_period_s=grace,
        config=config,
    )
    back = spec_from_json(json.loads(json.dumps(spec_to_json(spec))))
    assert back == spec
    assert back.fingerprint() == spec.fingerprint()


@pytest.mark.parametrize(
    ("config", "field"),
    [
        pytest.param({"x": math.nan}, "agent.config.x", id="nan"),
        pytest.param({"x": {1, 2}}, "agent.config.x", id="a-set"),
        pytest.param({"x": {3: "int key"}}, "agent.config.x", id="non-string-key"),
        pytest.param({"x": [math.inf]}, "agent.config.x[0]", id="infinity-in-a-list"),
    ],
)
def test_a_config_that_is_not_json_is_refused_naming_the_field(
    config: dict[str, Any], field: str
) -> None:
    spec = AgentSpec(id=AgentId("a"), command=("/bin/true",), config=config)
    with pytest.raises(InvalidArgument) as caught:
        spec_to_json(spec)
    assert caught.value.field == field


@pytest.mark.parametrize(
    ("change", "field"),
    [
        pytest.param({"command": "/bin/true"}, "agent.command", id="command-not-a-list"),
        pytest.param({"state": "paused"}, "agent.state", id="unknown-state"),
        pytest.param({"stop_grace_period_s": True}, "agent.stop_grace_period_s", id="bool"),
        pytest.param({"env": {"A": 1}}, "agent.env[A]", id="env-value-not-a-string"),
        pytest.param({"surprise": 1}, "agent", id="unknown-key"),
    ],
)
def test_a_bad_spec_dict_is_refused_naming_the_field(change: dict[str, Any], field: str) -> None:
    data = spec_to_json(FULL_SPEC) | change
    with pytest.raises(InvalidArgument) as caught:
        spec_from_json(data)
    assert caught.value.field == field


# -- desired.json -----------------------------------------------------------------------


def test_an_empty_directory_loads_generation_zero(store: DesiredStateStore) -> None:
    result = store.load()
    assert result.state == state_of(0)
    assert not result.was_corrupt


def test_a_saved_state_loads_back_after_reopening(
    store: DesiredStateStore, clock: FakeClock
) -> None:
    state = state_of(5, FULL_SPEC, sleeper("b"))
    store.save(state)
    result = reopen(store, clock).load()
    assert result.state == state
    assert result.corrupt is None


def test_saving_an_older_generation_is_refused_and_changes_nothing(
    store: DesiredStateStore, clock: FakeClock
) -> None:
    store.save(state_of(5, sleeper("a")))
    with pytest.raises(StaleGeneration):
        store.save(state_of(4))
    assert reopen(store, clock).load().state.generation == 5


def test_the_directory_is_0700_and_the_file_0600(store: DesiredStateStore, state_dir: Path) -> None:
    store.save(state_of(1, sleeper("a")))
    assert stat.S_IMODE(state_dir.stat().st_mode) == 0o700
    assert stat.S_IMODE((state_dir / DESIRED_FILE).stat().st_mode) == 0o600


def test_the_file_carries_a_schema_version_and_a_checksum(
    store: DesiredStateStore, state_dir: Path
) -> None:
    store.save(state_of(1, sleeper("a")))
    data = (state_dir / DESIRED_FILE).read_bytes()
    envelope = json.loads(data)
    assert data == json.dumps(envelope, sort_keys=True, separators=(",", ":")).encode() + b"\n"
    assert envelope["schema_version"] == 1
    assert envelope["checksum"].startswith("sha256:")
    assert envelope["body"]["generation"] == 1


def valid_file(state_dir: Path, clock: FakeClock) -> bytes:
    DesiredStateStore(state_dir, clock=clock).save(state_of(3, sleeper("a")))
    return (state_dir / DESIRED_FILE).read_bytes()


def truncated(data: bytes) -> bytes:
    return data[: len(data) // 2]


def bad_checksum(data: bytes) -> bytes:
    return data.replace(b'"generation":3', b'"generation":9')


def unknown_schema(data: bytes) -> bytes:
    return data.replace(b'"schema_version":1', b'"schema_version":99')


def wrong_kind(data: bytes) -> bytes:
    return data.replace(b'"kind":"desired"', b'"kind":"processes"')


def deeply_nested(data: bytes) -> bytes:
    return b"[" * 100_000 + b"]" * 100_000


@pytest.mark.parametrize(
    ("damage", "reason"),
    [
        pytest.param(truncated, "not JSON", id="truncated"),
        pytest.param(bad_checksum, "checksum mismatch", id="bad-checksum"),
        pytest.param(unknown_schema, "unknown schema_version 99", id="unknown-schema"),
        pytest.param(wrong_kind, "kind is 'processes'", id="wrong-kind"),
        pytest.param(lambda _: b"\x00\xffgarbage", "not JSON", id="garbage"),
        pytest.param(lambda _: b"", "not JSON", id="empty"),
        pytest.param(lambda _: b"[1, 2]", "not a JSON object", id="a-list"),
        pytest.param(lambda _: b'{"schema_version": NaN}', "not JSON", id="nan"),
        pytest.param(deeply_nested, "not JSON", id="deeply-nested"),
    ],
)
def test_a_damaged_file_is_moved_aside_and_reported(
    state_dir: Path, clock: FakeClock, damage: Any, reason: str
) -> None:
    damaged = damage(valid_file(state_dir, clock))
    (state_dir / DESIRED_FILE).write_bytes(damaged)
    store = DesiredStateStore(state_dir, clock=clock)
    result = store.load()
    assert result.state == state_of(0)
    assert result.corrupt is not None
    assert reason in result.corrupt.reason
    assert result.corrupt.moved_to is not None
    assert result.corrupt.moved_to.name == f"{DESIRED_FILE}.corrupt-20231114T221320.000000Z"
    assert result.corrupt.moved_to.read_bytes() == damaged
    assert not (state_dir / DESIRED_FILE).exists()
    assert store.corrupt_files == (result.corrupt,)
    assert store.load().corrupt is None, "loading again finds nothing and does not loop"


def test_a_checksummed_body_that_fails_validation_is_moved_aside(
    store: DesiredStateStore, clock: FakeClock, state_dir: Path
) -> None:
    store.save(state_of(2, sleeper("a")))
    envelope = json.loads((state_dir / DESIRED_FILE).read_bytes())
    envelope["body"]["agents"][0]["command"] = []
    from reconciler.daemon.store import _checksum

    envelope["checksum"] = _checksum(envelope["body"])
    (state_dir / DESIRED_FILE).write_text(json.dumps(envelope))
    result = reopen(store, clock).load()
    assert result.corrupt is not None
    assert "agents[0].command" in result.corrupt.reason


def test_a_symlinked_state_file_is_not_followed(
    state_dir: Path, clock: FakeClock, tmp_path: Path
) -> None:
    elsewhere = tmp_path / "elsewhere.json"
    elsewhere.write_bytes(valid_file(state_dir, clock))
    (state_dir / DESIRED_FILE).unlink()
    (state_dir / DESIRED_FILE).symlink_to(elsewhere)
    result = DesiredStateStore(state_dir, clock=clock).load()
    assert result.corrupt is not None
    assert "symlink" in result.corrupt.reason
    assert elsewhere.exists()


def test_a_group_writable_state_file_is_not_used(state_dir: Path, clock: FakeClock) -> None:
    valid_file(state_dir, clock)
    os.chmod(state_dir / DESIRED_FILE, 0o620)
    result = DesiredStateStore(state_dir, clock=clock).load()
    assert result.corrupt is not None
    assert "writable by group or others" in result.corrupt.reason


def test_two_corrupt_files_in_the_same_microsecond_get_distinct_names(
    state_dir: Path, clock: FakeClock
) -> None:
    store = DesiredStateStore(state_dir, clock=clock)
    for _ in range(2):
        (state_dir / DESIRED_FILE).write_bytes(b"junk")
        store.load()
    moved = {c.moved_to for c in store.corrupt_files}
    assert len(moved) == 2


def test_only_the_newest_corrupt_copies_are_kept(state_dir: Path, clock: FakeClock) -> None:
    store = DesiredStateStore(state_dir, clock=clock)
    for _ in range(14):
        (state_dir / DESIRED_FILE).write_bytes(b"junk")
        store.load()
        clock.advance(1.0)
    assert len(list(state_dir.glob(f"{DESIRED_FILE}.corrupt-*"))) == 10


# -- failpoints inside one process ------------------------------------------------------


@pytest.mark.parametrize(
    ("point", "survives"),
    [
        pytest.param("store.before_write", "old", id="before-write"),
        pytest.param("store.after_tmp_write", "old", id="after-tmp-write"),
        pytest.param("store.after_tmp_fsync", "old", id="after-tmp-fsync"),
        pytest.param("store.after_rename", "new", id="after-rename"),
        pytest.param("store.after_dir_fsync", "new", id="after-dir-fsync"),
    ],
)
def test_a_failure_at_each_step_leaves_the_old_or_the_new_file_and_no_temp(
    store: DesiredStateStore, clock: FakeClock, state_dir: Path, point: str, survives: str
) -> None:
    old, new = state_of(1, sleeper("a")), state_of(2, sleeper("a"), sleeper("b"))
    store.save(old)
    with failpoints.set(point, "raise"), pytest.raises(FailpointError):
        store.save(new)
    assert reopen(store, clock).load().state == (old if survives == "old" else new)
    assert sorted(p.name for p in state_dir.iterdir()) == [DESIRED_FILE]


def test_temp_files_left_by_a_crash_are_removed_on_open(state_dir: Path, clock: FakeClock) -> None:
    valid_file(state_dir, clock)
    leftover = state_dir / f".{DESIRED_FILE}.abc123.tmp"
    leftover.write_bytes(b"half a fi")
    DesiredStateStore(state_dir, clock=clock)
    assert not leftover.exists()


# -- the directory ----------------------------------------------------------------------


def test_a_new_directory_is_created_0700_despite_the_umask(tmp_path: Path) -> None:
    old_umask = os.umask(0)
    try:
        store = DesiredStateStore(tmp_path / "a" / "state", clock=FakeClock())
    finally:
        os.umask(old_umask)
    assert stat.S_IMODE(store.state_dir.stat().st_mode) == 0o700


def test_an_existing_readable_directory_is_tightened_to_0700(tmp_path: Path) -> None:
    state_dir = tmp_path / "state"
    state_dir.mkdir(mode=0o755)
    os.chmod(state_dir, 0o755)
    DesiredStateStore(state_dir, clock=FakeClock())
    assert stat.S_IMODE(state_dir.stat().st_mode) == 0o700


def make_group_writable(path: Path) -> Path:
    path.mkdir()
    os.chmod(path, 0o770)
    return path


def make_world_writable(path: Path) -> Path:
    path.mkdir()
    os.chmod(path, 0o707)
    return path


def make_symlink(path: Path) -> Path:
    real = path.with_name("real")
    real.mkdir(mode=0o700)
    path.symlink_to(real)
    return path


def make_file(path: Path) -> Path:
    path.write_text("not a directory")
    return path


def make_foreign(path: Path) -> Path:
    path.mkdir(mode=0o700)
    os.chown(path, os.geteuid() + 1, -1)
    return path


@pytest.mark.parametrize(
    ("make", "message"),
    [
        pytest.param(make_group_writable, "writable by group or others", id="group-writable"),
        pytest.param(make_world_writable, "writable by group or others", id="world-writable"),
        pytest.param(make_symlink, "is a symlink", id="symlink"),
        pytest.param(make_file, "not a directory", id="a-file"),
        pytest.param(
            make_foreign,
            "belongs to uid",
            id="another-users",
            marks=pytest.mark.skipif(os.geteuid() != 0, reason="chown needs root"),
        ),
    ],
)
def test_an_unsafe_directory_is_refused_with_a_clear_error(
    tmp_path: Path, make: Any, message: str
) -> None:
    path = make(tmp_path / "state")
    with pytest.raises(UnsafeStateDir, match=message):
        DesiredStateStore(path, clock=FakeClock())


# -- overrides.json ---------------------------------------------------------------------


def test_overrides_round_trip(store: DesiredStateStore, clock: FakeClock) -> None:
    overrides = {
        AgentId("a"): OverrideEntry(Override.STOP, Generation(4)),
        AgentId("b"): OverrideEntry(Override.START, Generation(5)),
    }
    store.save_overrides(overrides)
    assert reopen(store, clock).load_overrides() == overrides
    assert stat.S_IMODE((store.state_dir / OVERRIDES_FILE).stat().st_mode) == 0o600


def test_overrides_set_before_a_newer_generation_are_dropped() -> None:
    overrides = {
        AgentId("old"): OverrideEntry(Override.STOP, Generation(4)),
        AgentId("current"): OverrideEntry(Override.START, Generation(5)),
    }
    assert prune_overrides(overrides, 5) == {AgentId("current"): overrides[AgentId("current")]}
    assert prune_overrides(overrides, 6) == {}


def test_a_corrupt_overrides_file_is_moved_aside_and_reported(
    store: DesiredStateStore, state_dir: Path
) -> None:
    (state_dir / OVERRIDES_FILE).write_bytes(b'{"schema_version": 1')
    assert store.load_overrides() == {}
    assert [c.path.name for c in store.corrupt_files] == [OVERRIDES_FILE]


# -- patches.json -----------------------------------------------------------------------


def test_patches_round_trip(store: DesiredStateStore, clock: FakeClock) -> None:
    patches = Patches(Generation(7), {FULL_SPEC.id: FULL_SPEC, AgentId("s"): sleeper("s")})
    store.save_patches(patches)
    assert reopen(store, clock).load_patches() == patches
    assert stat.S_IMODE((store.state_dir / PATCHES_FILE).stat().st_mode) == 0o600


def test_no_patches_file_means_no_patches(store: DesiredStateStore) -> None:
    assert store.load_patches() == Patches(Generation(0))


@pytest.mark.parametrize(
    "body",
    [
        pytest.param(b'{"schema_version": 1', id="truncated"),
        pytest.param(None, id="filed-under-another-id"),
    ],
)
def test_a_bad_patches_file_is_moved_aside_and_reported(
    store: DesiredStateStore, state_dir: Path, body: bytes | None
) -> None:
    if body is None:
        store.save_patches(Patches(Generation(1), {AgentId("other"): sleeper("s")}))
    else:
        (state_dir / PATCHES_FILE).write_bytes(body)
    assert store.load_patches() == Patches(Generation(0))
    assert [c.path.name for c in store.corrupt_files] == [PATCHES_FILE]


# -- finished.json ----------------------------------------------------------------------


def test_finished_agents_round_trip(store: DesiredStateStore, clock: FakeClock) -> None:
    finished = {
        AgentId("job"): FinishedEntry("f1", False, 0, None, 1_700_000_000.5, "done", "boot"),
        AgentId("oom"): FinishedEntry("f2", True, None, 9, 1_700_000_001.0, "killed", "boot"),
    }
    store.save_finished(finished)
    assert reopen(store, clock).load_finished() == finished


def test_a_corrupt_finished_file_is_moved_aside_and_reported(
    store: DesiredStateStore, state_dir: Path
) -> None:
    (state_dir / FINISHED_FILE).write_bytes(b'{"schema_version": 1, "kind": "finished"')
    assert store.load_finished() == {}
    assert [c.path.name for c in store.corrupt_files] == [FINISHED_FILE]


# -- processes.json ---------------------------------------------------------------------


def process_entry(pid: int) -> ProcessEntry:
    return ProcessEntry(
        pid=pid,
        start_ticks=123_456 + pid,
        cmdline=("/usr/bin/python3", "-m", "agent", f"--n={pid}"),
        fingerprint="0123456789abcdef0123456789abcdef",
        started_at_wall_s=1_700_000_000.25,
        token=f"secret-{pid}",
        boot_id="8c6e3b4c-5d0e-4d43-9a7e-2f1b6f0e8d11",
    )


def test_processes_round_trip(store: DesiredStateStore, clock: FakeClock) -> None:
    processes = {AgentId(f"a{i}"): process_entry(1000 + i) for i in range(3)}
    store.save_processes(processes)
    assert reopen(store, clock).load_processes() == processes


def test_a_processes_file_from_before_boot_ids_still_loads(
    store: DesiredStateStore, clock: FakeClock, state_dir: Path
) -> None:
    from reconciler.daemon.store import _checksum

    store.save_processes({AgentId("a"): process_entry(1000)})
    envelope = json.loads((state_dir / PROCESSES_FILE).read_bytes())
    del envelope["body"]["a"]["boot_id"]
    envelope["checksum"] = _checksum(envelope["body"])
    (state_dir / PROCESSES_FILE).write_text(json.dumps(envelope))
    loaded = reopen(store, clock).load_processes()
    assert loaded[AgentId("a")].boot_id == ""
    assert loaded[AgentId("a")].pid == 1000


def test_a_process_entry_with_a_bad_pid_makes_the_file_corrupt(
    store: DesiredStateStore, clock: FakeClock
) -> None:
    store.save_processes({AgentId("a"): process_entry(0)})
    reopened = reopen(store, clock)
    assert reopened.load_processes() == {}
    assert "processes[a].pid" in reopened.corrupt_files[0].reason


def test_saving_processes_costs_are_printed_with_and_without_fsync(tmp_path: Path) -> None:
    processes = {AgentId(f"agent-{i}"): process_entry(10_000 + i) for i in range(1000)}
    costs = {}
    for sync in (False, True):
        store = DesiredStateStore(tmp_path / f"sync-{sync}", clock=FakeClock(), sync_processes=sync)
        rounds = 20
        started = time.perf_counter()
        for _ in range(rounds):
            store.save_processes(processes)
        costs[sync] = (time.perf_counter() - started) / rounds
        assert store.load_processes() == processes
    size = (tmp_path / "sync-True" / PROCESSES_FILE).stat().st_size
    print(
        f"\nprocesses.json with 1000 agents ({size} bytes): "
        f"{costs[False] * 1000:.2f} ms per save without fsync, "
        f"{costs[True] * 1000:.2f} ms with fsync of file and directory"
    )


# -- operations.json --------------------------------------------------------------------


def result_for(n: int) -> OperationResult:
    return OperationResult(
        agent_id=AgentId("a"), action="restart", success=n % 2 == 0, message=f"m{n}", at_wall_s=n
    )


def test_a_remembered_operation_is_found_after_reopening(
    store: DesiredStateStore, clock: FakeClock
) -> None:
    store.remember_operation(OperationId("op-1"), result_for(1))
    reopened = reopen(store, clock)
    assert reopened.lookup_operation(OperationId("op-1")) == result_for(1)
    assert reopened.lookup_operation(OperationId("op-2")) is None


def test_only_the_newest_operations_are_remembered(state_dir: Path, clock: FakeClock) -> None:
    store = DesiredStateStore(state_dir, clock=clock, max_operations=5)
    for n in range(8):
        store.remember_operation(OperationId(f"op-{n}"), result_for(n))
    reopened = DesiredStateStore(state_dir, clock=clock, max_operations=5)
    found = [n for n in range(8) if reopened.lookup_operation(OperationId(f"op-{n}"))]
    assert found == [3, 4, 5, 6, 7]
    body = json.loads((state_dir / OPERATIONS_FILE).read_bytes())["body"]
    assert len(body) == 5


def test_the_default_bound_is_1024_operations(store: DesiredStateStore) -> None:
    for n in range(1030):
        store.remember_operation(OperationId(f"op-{n}"), result_for(n))
    assert store.lookup_operation(OperationId("op-5")) is None
    assert store.lookup_operation(OperationId("op-6")) == result_for(6)


@pytest.mark.parametrize(
    "operation_id",
    [pytest.param("", id="empty"), pytest.param("x" * 257, id="too-long")],
)
def test_a_bad_operation_id_is_refused(store: DesiredStateStore, operation_id: str) -> None:
    with pytest.raises(InvalidArgument, match="operation_id"):
        store.remember_operation(OperationId(operation_id), result_for(1))


# -- the fake ---------------------------------------------------------------------------


def test_the_memory_store_keeps_the_same_generation_rule() -> None:
    fake: StateStore = MemoryStore()
    fake.save(state_of(3, sleeper("a")))
    fake.save(state_of(3, sleeper("a")))
    with pytest.raises(StaleGeneration):
        fake.save(state_of(2))
    assert fake.current.generation == 3
    assert PROCESSES_FILE  # the file names are public for operators' tooling


def test_one_daemon_at_a_time_holds_a_state_directory(tmp_path: Path) -> None:
    state_dir = tmp_path / "state"
    first = StateDirLock(state_dir)
    assert (state_dir / "daemon.lock").read_text() == f"{os.getpid()}\n"
    assert stat.S_IMODE((state_dir / "daemon.lock").stat().st_mode) == 0o600
    with pytest.raises(StateDirInUse, match=rf"in use by another daemon \(pid {os.getpid()}\)"):
        StateDirLock(state_dir)
    first.release()
    first.release()
    second = StateDirLock(state_dir)  # released: the next daemon takes it
    del second
    StateDirLock(state_dir).release()  # dropped with its holder, as at a process's death
