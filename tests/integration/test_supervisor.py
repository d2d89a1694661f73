"""ProcessSupervisor with real processes: sessions, pidfd exits, stop, adoption, logs."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import pwd
import signal
import stat
import subprocess
import sys
import textwrap
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path

import pytest

from reconciler.daemon import procfs
from reconciler.daemon.agentlogs import LAST_LINE_MAX_CHARS, AgentLogs, printable_line
from reconciler.daemon.clock import FakeClock
from reconciler.daemon.commands import CommandPolicy
from reconciler.daemon.supervisor import (
    AGENT_CONFIG_FILE_ENV,
    AGENT_ID_ENV,
    FakeSupervisor,
    ProcessHandle,
    ProcessSupervisor,
    SpawnError,
)
from reconciler.model.ids import AgentId
from reconciler.model.spec import AgentSpec
from reconciler.model.status import ExitInfo

PY = sys.executable
SLEEP = "/bin/sleep"


class Exits:
    """Records every exit callback, with the perf_counter time it arrived."""

    def __init__(self) -> None:
        self.calls: list[tuple[ProcessHandle, ExitInfo, float]] = []

    def __call__(self, handle: ProcessHandle, info: ExitInfo) -> None:
        self.calls.append((handle, info, time.perf_counter()))

    def of(self, handle: ProcessHandle) -> list[tuple[ExitInfo, float]]:
        return [(info, at) for seen, info, at in self.calls if seen == handle]

    async def wait(self, handle: ProcessHandle, *, timeout_s: float = 10.0) -> ExitInfo:
        await eventually(lambda: bool(self.of(handle)), timeout_s=timeout_s, what="an exit")
        return self.of(handle)[0][0]


async def eventually(
    predicate: Callable[[], bool], *, timeout_s: float = 10.0, what: str = "a condition"
) -> None:
    deadline = time.monotonic() + timeout_s
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout_s} s waiting for {what}")
        await asyncio.sleep(0.005)


def spec(agent_id: str, *command: str, **fields: object) -> AgentSpec:
    return AgentSpec(id=AgentId(agent_id), command=tuple(command), **fields)  # type: ignore[arg-type]


def python(code: str, *args: str) -> tuple[str, ...]:
    return (PY, "-c", textwrap.dedent(code), *args)


def gone(pid: int) -> bool:
    stat = procfs.read_stat(pid)
    return stat is None or stat.zombie


def open_files() -> set[str]:
    """What this process's descriptors point at."""
    found = set()
    for fd in os.listdir("/proc/self/fd"):
        with contextlib.suppress(FileNotFoundError):  # the listing's own descriptor
            found.add(os.readlink(f"/proc/self/fd/{fd}"))
    return found


def our_zombies() -> list[int]:
    me = os.getpid()
    return [stat.pid for stat in procfs.scan() if stat.ppid == me and stat.zombie]


@pytest.fixture
def exits() -> Exits:
    return Exits()


@pytest.fixture
async def supervisor(tmp_path: Path, exits: Exits) -> AsyncIterator[ProcessSupervisor]:
    sup = ProcessSupervisor(tmp_path / "logs", log_max_bytes=1 << 20, log_backups=2)
    sup.set_exit_callback(exits)
    yield sup
    for handle in sup.handles():
        await sup.stop(handle, grace_s=0.0)
    await sup.close()


async def read_log_until(sup: ProcessSupervisor, agent_id: str, text: str) -> str:
    path = sup.logs.path_for(AgentId(agent_id))
    await eventually(
        lambda: path.exists() and text in path.read_text(), what=f"{text!r} in the log"
    )
    return path.read_text()


# ---------------------------------------------------------------- start and exits


async def test_an_agent_runs_in_its_own_session_with_devnull_stdin_and_a_log_file(
    supervisor: ProcessSupervisor,
) -> None:
    handle = await supervisor.start(spec("sleeper", SLEEP, "60"), env={})
    await eventually(lambda: procfs.read_cmdline(handle.pid) == (SLEEP, "60"), what="the exec")
    stat = procfs.read_stat(handle.pid)
    assert stat is not None
    assert (stat.sid, stat.pgid) == (handle.pid, handle.pid)
    assert stat.start_ticks == handle.start_ticks
    assert procfs.read_cmdline(handle.pid) == (SLEEP, "60") == handle.cmdline
    assert os.readlink(f"/proc/{handle.pid}/fd/0") == "/dev/null"
    log = str(supervisor.logs.path_for(AgentId("sleeper")))
    assert os.readlink(f"/proc/{handle.pid}/fd/1") == log
    assert os.readlink(f"/proc/{handle.pid}/fd/2") == log


def test_the_start_time_from_the_boot_clock_is_the_one_proc_shows() -> None:
    tick_ns = 1_000_000_000 // os.sysconf("SC_CLK_TCK")
    assert procfs.start_ticks_between(7 * tick_ns, 8 * tick_ns - 1) == 7
    assert procfs.start_ticks_between(8 * tick_ns - 1, 8 * tick_ns) is None
    told = 0
    for _ in range(100):
        before = procfs.boot_clock_ns()
        child = subprocess.Popen(["/bin/true"])
        ticks = procfs.start_ticks_between(before, procfs.boot_clock_ns())
        try:
            if ticks is not None:
                told += 1
                assert ticks == procfs.read_start_ticks(child.pid)
        finally:
            child.wait()
    assert told > 50  # a spawn straddles a 10 ms tick now and then, not half the time


async def test_a_sigkill_is_reported_at_once_with_signal_9(
    supervisor: ProcessSupervisor, exits: Exits
) -> None:
    latencies_ms = []
    for index in range(5):
        handle = await supervisor.start(spec(f"victim-{index}", SLEEP, "60"), env={})
        sent = time.perf_counter()
        os.kill(handle.pid, signal.SIGKILL)
        info = await exits.wait(handle)
        assert (info.code, info.signal) == (None, signal.SIGKILL)
        latencies_ms.append((exits.of(handle)[0][1] - sent) * 1000)
        assert not supervisor.tracks(handle.pid)
    print(f"SIGKILL -> exit callback: {sorted(latencies_ms)} ms")


@pytest.mark.parametrize(
    ("code", "expected"),
    [
        pytest.param("import sys; sys.exit(0)", (0, None), id="clean-exit"),
        pytest.param("import sys; sys.exit(3)", (3, None), id="exit-3"),
        pytest.param(
            "import os, signal; os.kill(os.getpid(), signal.SIGTERM)",
            (None, signal.SIGTERM),
            id="killed-by-sigterm",
        ),
    ],
)
async def test_exit_status_is_reported_exactly_once(
    supervisor: ProcessSupervisor, exits: Exits, code: str, expected: tuple[int | None, int | None]
) -> None:
    handle = await supervisor.start(spec("quitter", *python(code)), env={})
    info = await exits.wait(handle)
    assert (info.code, info.signal) == expected
    await asyncio.sleep(0)
    assert len(exits.of(handle)) == 1


async def test_the_environment_is_minimal_plus_spec_env_plus_extra(
    supervisor: ProcessSupervisor, exits: Exits, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("DAEMON_SECRET", "must-not-leak")
    code = "import json, os; print(json.dumps(dict(os.environ)), flush=True)"
    agent = spec("env-printer", *python(code), env={"LOG_LEVEL": "debug", "SHARED": "spec"})
    handle = await supervisor.start(agent, env={"SHARED": "extra", "TRACEPARENT": "00-ab-cd-01"})
    await exits.wait(handle)
    seen = json.loads(supervisor.logs.path_for(AgentId("env-printer")).read_text())
    assert "DAEMON_SECRET" not in seen
    assert seen["LOG_LEVEL"] == "debug"
    assert seen["SHARED"] == "extra"
    assert seen["TRACEPARENT"] == "00-ab-cd-01"
    assert seen[AGENT_ID_ENV] == "env-printer"
    assert seen["PATH"] == os.environ.get("PATH", os.defpath)
    assert "HOME" in seen


async def test_the_working_directory_is_honoured(
    supervisor: ProcessSupervisor, exits: Exits, tmp_path: Path
) -> None:
    workdir = tmp_path / "work"
    workdir.mkdir()
    code = "import os; print(os.getcwd(), flush=True)"
    handle = await supervisor.start(spec("cwd", *python(code), working_dir=str(workdir)), env={})
    await exits.wait(handle)
    assert supervisor.logs.path_for(AgentId("cwd")).read_text().strip() == str(workdir)


async def test_shell_metacharacters_reach_the_program_verbatim_and_run_nothing(
    supervisor: ProcessSupervisor, exits: Exits, tmp_path: Path
) -> None:
    canary = tmp_path / "canary"
    hostile = [
        f"; touch {canary}",
        f"$(touch {canary})",
        f"`touch {canary}`",
        f"| touch {canary}",
        f"&& touch {canary}",
        f"> {canary}",
    ]
    policy = CommandPolicy(["/*"], search_path="/usr/bin:/bin")
    command = policy.resolve(["echo", *hostile], field="agents[0].command")
    handle = await supervisor.start(spec("echo", *command, working_dir=str(tmp_path)), env={})
    assert (await exits.wait(handle)).code == 0
    assert not canary.exists()
    assert supervisor.logs.path_for(AgentId("echo")).read_text() == " ".join(hostile) + "\n"


async def test_an_agent_can_run_as_another_user(supervisor: ProcessSupervisor) -> None:
    if os.geteuid() != 0:
        pytest.skip("switching users needs root")
    nobody = pwd.getpwnam("nobody")
    handle = await supervisor.start(spec("as-nobody", SLEEP, "60", user="nobody"), env={})
    status = Path(f"/proc/{handle.pid}/status").read_text().splitlines()
    ids = {line.split(":")[0]: line.split()[1:] for line in status if ":" in line}
    assert ids["Uid"] == [str(nobody.pw_uid)] * 4
    assert ids["Gid"] == [str(nobody.pw_gid)] * 4
    assert procfs.read_environ_value(handle.pid, "USER") == "nobody"
    assert procfs.read_environ_value(handle.pid, "HOME") == nobody.pw_dir


async def test_an_agent_running_as_another_user_can_read_its_config_file(
    supervisor: ProcessSupervisor, tmp_path: Path
) -> None:
    if os.geteuid() != 0:
        pytest.skip("switching users needs root")
    private = tmp_path / "state" / "agent-config"
    private.mkdir(mode=0o700, parents=True)
    os.chmod(tmp_path / "state", 0o700)
    config = private / "reader.json"
    config.write_text('{"batch": 5}')
    config.chmod(0o600)
    script = 'cat "$RECONCILER_AGENT_CONFIG_FILE"; echo; echo "$RECONCILER_AGENT_CONFIG_FILE"'
    env = {AGENT_CONFIG_FILE_ENV: str(config)}
    await supervisor.start(spec("reader", "/bin/sh", "-c", script, user="nobody"), env=env)
    assert str(config) not in open_files(), "the daemon keeps no descriptor on the config"
    output = await read_log_until(supervisor, "reader", "/proc/self/fd/")
    assert output.splitlines()[0] == '{"batch": 5}'
    nobody = pwd.getpwnam("nobody")
    assert (config.stat().st_uid, stat.S_IMODE(config.stat().st_mode)) == (nobody.pw_uid, 0o400)


@pytest.mark.parametrize(
    ("fields", "command", "phrase"),
    [
        pytest.param({}, ("/nonexistent/agent",), "not found", id="missing-program"),
        pytest.param({}, ("sleep", "1"), "absolute program path", id="bare-name-unresolved"),
        pytest.param(
            {"working_dir": "/nonexistent/dir"}, (SLEEP, "1"), "working directory", id="no-workdir"
        ),
        pytest.param({"user": "root"}, (SLEEP, "1"), "allow_root is false", id="root-refused"),
        pytest.param({"user": "0"}, (SLEEP, "1"), "allow_root is false", id="uid-0-refused"),
        pytest.param(
            {"user": "no-such-user-here"}, (SLEEP, "1"), "does not exist", id="unknown-user"
        ),
        pytest.param({}, ("{tmp}/notes",), "permission denied", id="not-executable"),
        pytest.param({}, ("{tmp}/garbage",), "Exec format error", id="not-a-program"),
    ],
)
async def test_spawn_errors_say_why(
    supervisor: ProcessSupervisor,
    tmp_path: Path,
    fields: dict[str, str],
    command: tuple[str, ...],
    phrase: str,
) -> None:
    (tmp_path / "notes").write_text("just text\n")
    (tmp_path / "garbage").write_bytes(b"\x00\x01not an executable format")
    (tmp_path / "garbage").chmod(0o755)
    argv = [arg.replace("{tmp}", str(tmp_path)) for arg in command]
    with pytest.raises(SpawnError) as caught:
        await supervisor.start(spec("doomed", *argv, **fields), env={})
    assert phrase in caught.value.message
    assert supervisor.handles() == []


async def test_a_command_policy_is_enforced_again_at_spawn(tmp_path: Path) -> None:
    sup = ProcessSupervisor(tmp_path / "logs", command_policy=CommandPolicy(["/opt/agents/*"]))
    try:
        with pytest.raises(SpawnError, match="allowed_commands"):
            await sup.start(spec("outsider", SLEEP, "1"), env={})
    finally:
        await sup.close()


async def test_spawning_cost_is_measured(supervisor: ProcessSupervisor, exits: Exits) -> None:
    handles = []
    started = time.perf_counter()
    for index in range(20):
        handles.append(await supervisor.start(spec(f"true-{index}", "/bin/true"), env={}))
    per_spawn_ms = (time.perf_counter() - started) * 1000 / 20
    for handle in handles:
        assert (await exits.wait(handle)).code == 0
    print(f"start(/bin/true): {per_spawn_ms:.2f} ms per spawn")


# ---------------------------------------------------------------- stop

IGNORE_TERM = """
import signal, sys, time
signal.signal(signal.SIGTERM, signal.SIG_IGN)
print("ready", flush=True)
time.sleep(600)
"""

FORKER = """
import os, signal, sys, time

pidfile = sys.argv[1]

def publish(path, text):
    with open(path + ".tmp", "w") as handle:
        handle.write(text)
    os.rename(path + ".tmp", path)

child = os.fork()
if child == 0:
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    time.sleep(600)
    os._exit(0)
middle = os.fork()
if middle == 0:
    os.setsid()
    if os.fork() == 0:
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        publish(pidfile + ".grand", str(os.getpid()))
        time.sleep(600)
        os._exit(0)
    os._exit(0)
os.waitpid(middle, 0)
while not os.path.exists(pidfile + ".grand"):
    time.sleep(0.005)
with open(pidfile + ".grand") as handle:
    grand = handle.read()
publish(pidfile, f"{os.getpid()} {child} {grand}")
time.sleep(600)
"""


async def test_stop_ends_a_cooperative_agent_with_sigterm(
    supervisor: ProcessSupervisor, exits: Exits
) -> None:
    handle = await supervisor.start(spec("polite", SLEEP, "60"), env={})
    await supervisor.stop(handle, grace_s=30.0)
    info = exits.of(handle)[0][0]
    assert info.signal == signal.SIGTERM
    assert gone(handle.pid)


async def test_stop_kills_an_agent_that_ignores_sigterm_at_its_grace_period(
    supervisor: ProcessSupervisor, exits: Exits
) -> None:
    handle = await supervisor.start(spec("stubborn", *python(IGNORE_TERM)), env={})
    await read_log_until(supervisor, "stubborn", "ready")
    began = time.monotonic()
    await supervisor.stop(handle, grace_s=0.5)
    took_s = time.monotonic() - began
    info = exits.of(handle)[0][0]
    assert info.signal == signal.SIGKILL
    assert took_s >= 0.5
    print(f"stop with grace 0.5 s of a SIGTERM-ignoring agent took {took_s:.3f} s")


async def test_stop_leaves_nothing_of_an_agent_that_forked_and_daemonised_children(
    supervisor: ProcessSupervisor, exits: Exits, tmp_path: Path
) -> None:
    pidfile = tmp_path / "pids"
    handle = await supervisor.start(spec("forker", *python(FORKER, str(pidfile))), env={})
    await eventually(pidfile.exists, what="the forker's pid file")
    main, child, grand = (int(pid) for pid in pidfile.read_text().split())
    assert main == handle.pid
    grand_stat = procfs.read_stat(grand)
    assert grand_stat is not None
    assert grand_stat.ppid == os.getpid(), "the orphan was re-parented to the subreaper"
    assert grand_stat.sid != handle.pid, "the grandchild left the agent's session"
    assert set(supervisor.descendants(handle)) == {child, grand}

    await supervisor.stop(handle, grace_s=0.3)

    assert [pid for pid in (main, child, grand) if not gone(pid)] == []
    assert exits.of(handle)[0][0].signal == signal.SIGTERM  # its family ignored SIGTERM
    await eventually(lambda: our_zombies() == [], what="orphans to be reaped")


async def test_stop_is_idempotent_and_concurrent_stops_share_one_exit(
    supervisor: ProcessSupervisor, exits: Exits
) -> None:
    handle = await supervisor.start(spec("twice", SLEEP, "60"), env={})
    await asyncio.gather(supervisor.stop(handle, grace_s=5.0), supervisor.stop(handle, grace_s=5.0))
    await supervisor.stop(handle, grace_s=5.0)
    assert len(exits.of(handle)) == 1


async def test_many_start_and_kill_cycles_leave_no_zombie(
    supervisor: ProcessSupervisor, exits: Exits
) -> None:
    orphan_maker = "import os\nif os.fork() == 0:\n    os._exit(0)\nos._exit(0)"
    for index in range(25):
        sleeper = await supervisor.start(spec(f"cycle-{index}", SLEEP, "60"), env={})
        quick = await supervisor.start(spec(f"quick-{index}", "/bin/true"), env={})
        forker = await supervisor.start(spec(f"orphan-{index}", *python(orphan_maker)), env={})
        os.kill(sleeper.pid, signal.SIGKILL)
        for handle in (sleeper, quick, forker):
            await exits.wait(handle)
    await eventually(lambda: our_zombies() == [], what="no zombie children")
    assert supervisor.handles() == []


# ---------------------------------------------------------------- adoption


async def test_a_new_supervisor_adopts_a_running_agent_and_sees_it_exit(
    tmp_path: Path, exits: Exits
) -> None:
    first = ProcessSupervisor(tmp_path / "logs")
    first.set_exit_callback(exits)
    handle = await first.start(spec("survivor", SLEEP, "60"), env={})
    await first.close()  # the daemon "dies": the agent must keep running
    assert not gone(handle.pid)

    second = ProcessSupervisor(tmp_path / "logs")
    adopted_exits = Exits()
    second.set_exit_callback(adopted_exits)
    try:
        wrong_ticks = second.adopt(
            handle.agent_id,
            pid=handle.pid,
            start_ticks=handle.start_ticks + 1,
            cmdline=handle.cmdline,
        )
        wrong_cmdline = second.adopt(
            handle.agent_id,
            pid=handle.pid,
            start_ticks=handle.start_ticks,
            cmdline=(SLEEP, "61"),
        )
        assert (wrong_ticks, wrong_cmdline) == (None, None)
        adopted = second.adopt(
            handle.agent_id, pid=handle.pid, start_ticks=handle.start_ticks, cmdline=handle.cmdline
        )
        assert adopted == handle
        os.kill(handle.pid, signal.SIGKILL)
        info = await adopted_exits.wait(adopted)
        # In one process the adopter is still the parent, so the status is known.
        assert info.signal == signal.SIGKILL
        assert exits.calls == []
        await eventually(lambda: our_zombies() == [], what="the adopted agent to be reaped")
    finally:
        await second.close()


async def test_an_adopted_process_that_is_not_our_child_exits_with_unknown_status(
    supervisor: ProcessSupervisor, tmp_path: Path
) -> None:
    parent = subprocess.Popen(
        python(
            """
            import subprocess, sys
            child = subprocess.Popen(["/bin/sleep", "60"])
            print(child.pid, flush=True)
            child.wait()
            """
        ),
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert parent.stdout is not None
        pid = int(parent.stdout.readline())
        ticks = procfs.read_start_ticks(pid)
        assert ticks is not None
        seen = Exits()
        supervisor.set_exit_callback(seen)
        adopted = supervisor.adopt(
            AgentId("stranger"), pid=pid, start_ticks=ticks, cmdline=(SLEEP, "60")
        )
        assert adopted is not None
        os.kill(pid, signal.SIGKILL)
        info = await seen.wait(adopted)
        assert (info.code, info.signal) == (None, None)
        assert "status unknown" in info.describe()
    finally:
        parent.kill()
        parent.wait()
        assert parent.stdout is not None
        parent.stdout.close()


async def test_a_script_started_through_its_shebang_can_be_adopted(
    supervisor: ProcessSupervisor, tmp_path: Path
) -> None:
    script = tmp_path / "agent.py"
    script.write_text(f"#!{PY}\nimport time\ntime.sleep(60)\n")
    script.chmod(0o755)
    handle = await supervisor.start(spec("scripted", str(script), "--flag"), env={})
    # start returns once the child is forked; its exec may still be under way.
    await eventually(
        lambda: procfs.read_cmdline(handle.pid) == (PY, str(script), "--flag"),
        what="the interpreter's command line",
    )
    again = supervisor.adopt(
        handle.agent_id, pid=handle.pid, start_ticks=handle.start_ticks, cmdline=handle.cmdline
    )
    assert again == handle


async def test_adoption_of_a_dead_pid_is_refused(
    supervisor: ProcessSupervisor, exits: Exits
) -> None:
    handle = await supervisor.start(spec("brief", "/bin/true"), env={})
    await exits.wait(handle)
    adopted = supervisor.adopt(
        handle.agent_id, pid=handle.pid, start_ticks=handle.start_ticks, cmdline=handle.cmdline
    )
    assert adopted is None


async def test_stops_begun_together_share_one_read_of_proc(
    supervisor: ProcessSupervisor, exits: Exits, monkeypatch: pytest.MonkeyPatch
) -> None:
    handles = [await supervisor.start(spec(f"many-{i}", SLEEP, "60"), env={}) for i in range(20)]
    real_scan = procfs.scan
    scans: list[int] = []

    def counting_scan() -> list[procfs.ProcStat]:
        scans.append(1)
        return list(real_scan())

    monkeypatch.setattr(procfs, "scan", counting_scan)
    await asyncio.gather(*(supervisor.stop(h, grace_s=5.0) for h in handles))
    assert all(gone(h.pid) for h in handles)
    assert len(scans) == 1, "one read of /proc for twenty stops begun in one pass"
    stopped_alone = await supervisor.start(spec("alone", SLEEP, "60"), env={})
    await supervisor.stop(stopped_alone, grace_s=5.0)
    assert len(scans) == 2, "a later stop reads /proc afresh"


# ---------------------------------------------------------------- logs


async def test_output_is_appended_across_restarts(
    supervisor: ProcessSupervisor, exits: Exits
) -> None:
    for word in ("first", "second"):
        handle = await supervisor.start(spec("talker", "/bin/echo", word), env={})
        await exits.wait(handle)
    assert supervisor.logs.path_for(AgentId("talker")).read_text() == "first\nsecond\n"


async def test_a_failed_exit_carries_the_last_line_this_process_printed(
    supervisor: ProcessSupervisor, exits: Exits
) -> None:
    first = await supervisor.start(
        spec("failing", *python("print('a line of an earlier run')")), env={}
    )
    assert (await exits.wait(first)).output == "", "a clean exit reads nothing back"
    code = """
        import sys
        print("starting", flush=True)
        line = "\\x1b[31merror:\\x1b[0m cannot open /etc/x.yaml\\r\\t\\u202e(no such file)"
        print(line, file=sys.stderr)
        print("   ", flush=True)
        sys.exit(2)
    """
    handle = await supervisor.start(spec("failing", *python(code)), env={})
    info = await exits.wait(handle)
    assert info.output == "error: cannot open /etc/x.yaml (no such file)"
    assert info.describe() == "exited with code 2: error: cannot open /etc/x.yaml (no such file)"
    silent = await supervisor.start(
        spec("failing", *python("import os; os.kill(os.getpid(), 9)")), env={}
    )
    info = await exits.wait(silent)
    assert info.output == "", "an earlier process's output is never this one's"
    assert info.describe() == "killed by SIGKILL"


async def test_failure_output_can_be_kept_on_the_node(tmp_path: Path, exits: Exits) -> None:
    sup = ProcessSupervisor(tmp_path / "logs", failure_output=False)
    sup.set_exit_callback(exits)
    try:
        handle = await sup.start(
            spec("quiet", *python("print('secret'); raise SystemExit(1)")), env={}
        )
        info = await exits.wait(handle)
        assert (info.code, info.output) == (1, "")
        assert "secret" in sup.logs.path_for(AgentId("quiet")).read_text()
    finally:
        await sup.close()


def test_the_last_line_is_read_from_the_new_output_only_and_after_a_rotation(
    tmp_path: Path,
) -> None:
    logs = AgentLogs(tmp_path, max_bytes=1 << 20, backups=1)
    agent = AgentId("reader")
    assert logs.last_line(agent) == "", "no process started here"
    fd = logs.open_for_start(agent)
    os.write(fd, b"old run\n")
    os.close(fd)
    fd = logs.open_for_start(agent)
    assert logs.last_line(agent) == "", "the earlier process's line is not this one's"
    os.write(fd, b"x" * 5000 + b"\nthe end\n\n")
    assert logs.last_line(agent) == "the end"
    logs.rotate(agent)  # copytruncate: the writer goes on at the start of the live file
    os.write(fd, b"after the rotation, longer than the old run\n")
    assert logs.last_line(agent) == "after the rotation, longer than the old run"
    os.truncate(logs.path_for(agent), 0)  # truncated by someone else
    os.write(fd, b"short\n")
    os.close(fd)
    assert logs.last_line(agent) == "short"
    fd = logs.open_for_start(agent)
    os.write(fd, b"bad bytes \xff\xfe end\n")
    os.close(fd)
    assert logs.last_line(agent) == "bad bytes \ufffd\ufffd end"


def test_a_printed_line_is_made_safe_to_show() -> None:
    assert (
        printable_line("\x1b]0;title\x07\x1b[1mbold\x1b[0m\x00 \x1bc\u200ftext\u2028")
        == "bold text"
    )
    long = printable_line("y" * 500)
    assert len(long) == LAST_LINE_MAX_CHARS
    assert long.endswith("…")


async def test_rotation_copies_and_truncates_while_the_agent_keeps_writing(
    tmp_path: Path, exits: Exits
) -> None:
    sup = ProcessSupervisor(tmp_path / "logs", log_max_bytes=1000, log_backups=2)
    sup.set_exit_callback(exits)
    go = tmp_path / "go"
    code = f"""
        import os, sys, time
        sys.stdout.write("x" * 1500 + "\\n"); sys.stdout.flush()
        while not os.path.exists({str(go)!r}):
            time.sleep(0.005)
        print("after", flush=True)
    """
    try:
        handle = await sup.start(spec("chatty", *python(code)), env={})
        await eventually(lambda: sup.logs.size_bytes(AgentId("chatty")) >= 1501, what="output")
        assert sup.logs.rotate_all() == [AgentId("chatty")]
        assert sup.logs.size_bytes(AgentId("chatty")) == 0
        go.touch()
        await exits.wait(handle)
        live = sup.logs.path_for(AgentId("chatty")).read_bytes()
        assert live == b"after\n", "O_APPEND writes continue at the start, with no hole"
        assert sup.logs.backup_path(AgentId("chatty"), 1).read_bytes() == b"x" * 1500 + b"\n"
    finally:
        await sup.close()


def test_rotation_keeps_only_the_configured_number_of_backups(tmp_path: Path) -> None:
    logs = AgentLogs(tmp_path, max_bytes=4, backups=2)
    agent = AgentId("rotating")
    for generation in ("one", "two", "three"):
        fd = logs.open_for_append(agent)
        os.write(fd, generation.encode() + b"!")
        os.close(fd)
        assert logs.rotate_if_needed(agent)
    assert logs.backup_path(agent, 1).read_text() == "three!"
    assert logs.backup_path(agent, 2).read_text() == "two!"
    assert not logs.backup_path(agent, 3).exists()
    assert logs.size_bytes(agent) == 0
    assert not logs.rotate_if_needed(agent)


def test_opening_for_a_start_rotates_a_full_file_and_appends_from_its_new_start(
    tmp_path: Path,
) -> None:
    logs = AgentLogs(tmp_path / "logs", max_bytes=8, backups=1)
    agent = AgentId("starting")
    fd = logs.open_for_start(agent)  # makes the directory and an empty live file
    os.write(fd, b"first run\n")
    os.close(fd)
    fd = logs.open_for_start(agent)
    os.write(fd, b"second\n")
    os.close(fd)
    assert logs.backup_path(agent, 1).read_bytes() == b"first run\n"
    assert logs.path_for(agent).read_bytes() == b"second\n"
    fd = logs.open_for_start(agent)  # 7 bytes: under the limit, kept
    os.close(fd)
    assert logs.path_for(agent).read_bytes() == b"second\n"


async def test_a_fifo_in_place_of_a_log_file_fails_the_start_and_blocks_nothing(
    supervisor: ProcessSupervisor, exits: Exits
) -> None:
    agent = AgentId("piped")
    handle = await supervisor.start(spec("piped", *python("raise SystemExit(1)")), env={})
    await exits.wait(handle)
    path = supervisor.logs.path_for(agent)
    path.unlink()
    os.mkfifo(path)  # what an agent running as the daemon's user could do
    assert supervisor.logs.last_line(agent) == ""
    with pytest.raises(SpawnError, match="is not a regular file"):
        await supervisor.start(spec("piped", SLEEP, "60"), env={})


def test_log_files_are_private_and_named_only_for_valid_ids(tmp_path: Path) -> None:
    logs = AgentLogs(tmp_path / "logs", max_bytes=100, backups=0)
    fd = logs.open_for_append(AgentId("ok"))
    os.close(fd)
    assert (tmp_path / "logs").stat().st_mode & 0o777 == 0o700
    with pytest.raises(ValueError, match="not a valid agent id"):
        logs.path_for(AgentId("../escape"))


# ---------------------------------------------------------------- the fake


async def test_the_fake_records_starts_and_reports_exits_through_the_callback() -> None:
    clock = FakeClock()
    fake = FakeSupervisor(clock=clock)
    seen = Exits()
    fake.set_exit_callback(seen)
    handle = await fake.start(spec("a", SLEEP, "60"), env={"TOKEN": "t"})
    assert fake.starts[0].env == {"TOKEN": "t"}
    assert fake.handle_of(AgentId("a")) == handle
    info = fake.exit(AgentId("a"), code=3)
    assert seen.of(handle)[0][0] == info == ExitInfo(code=3, signal=None, at_s=clock.monotonic())
    assert fake.handle_of(AgentId("a")) is None


@pytest.mark.parametrize(
    ("ignores_sigterm", "expected"),
    [
        pytest.param(False, signal.SIGTERM, id="cooperative"),
        pytest.param(True, signal.SIGKILL, id="ignores-sigterm"),
    ],
)
async def test_the_fake_stop_ends_the_process_before_returning(
    ignores_sigterm: bool, expected: int
) -> None:
    fake = FakeSupervisor()
    seen = Exits()
    fake.set_exit_callback(seen)
    if ignores_sigterm:
        fake.ignore_sigterm.add(AgentId("a"))
    handle = await fake.start(spec("a", SLEEP, "60"), env={})
    await fake.stop(handle, grace_s=2.0)
    await fake.stop(handle, grace_s=2.0)
    assert [info.signal for info, _ in seen.of(handle)] == [expected]
    assert fake.stops == [(handle, 2.0), (handle, 2.0)]


async def test_the_fake_raises_queued_spawn_errors_and_adopts_only_matching_survivors() -> None:
    fake = FakeSupervisor()
    fake.spawn_errors[AgentId("bad")] = "program /x not found"
    with pytest.raises(SpawnError, match="not found"):
        await fake.start(spec("bad", "/x"), env={})
    fake.add_survivor(AgentId("old"), pid=42, start_ticks=7, cmdline=(SLEEP, "60"))
    assert fake.adopt(AgentId("old"), pid=42, start_ticks=8, cmdline=(SLEEP, "60")) is None
    assert fake.adopt(AgentId("old"), pid=42, start_ticks=7, cmdline=(SLEEP, "1")) is None
    adopted = fake.adopt(AgentId("old"), pid=42, start_ticks=7, cmdline=(SLEEP, "60"))
    assert adopted is not None
    assert fake.adopted == [adopted]
