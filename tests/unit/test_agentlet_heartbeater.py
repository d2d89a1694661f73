"""Heartbeater against a fake transport: statuses, seq, counters, callbacks, backoff, spans."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Callable
from typing import Any

import pytest
import tenacity

from agentlet.heartbeat import Heartbeat, HeartbeatStatus
from agentlet.heartbeater import BackoffPolicy, Heartbeater
from agentlet.sampling import FixedSampler
from agentlet.tracing import FIRST_HEARTBEAT_SPAN, record_first_heartbeat
from agentlet.transport import FakeTransport, ReceiverBusy, ReceiverUnavailable, TransportError

INTERVAL_S = 0.02
FAST = BackoffPolicy(initial_s=0.005, max_s=0.02)


async def until(condition: Callable[[], bool], *, deadline_s: float = 10.0) -> None:
    end = time.monotonic() + deadline_s
    while not condition():
        assert time.monotonic() < end, "condition not met before the deadline"
        await asyncio.sleep(0.005)


def make_heartbeater(transport: FakeTransport, **kwargs: Any) -> Heartbeater:
    return Heartbeater(
        transport,
        agent_id="a1",
        interval_s=INTERVAL_S,
        version="2.0",
        pid=1234,
        sampler=FixedSampler(cpu_percent=1.5, memory_bytes=4096),
        backoff=FAST,
        **kwargs,
    )


@pytest.fixture
async def running() -> AsyncIterator[Callable[[Heartbeater], None]]:
    tasks: list[tuple[Heartbeater, asyncio.Task[None]]] = []

    def start(heartbeater: Heartbeater) -> None:
        tasks.append((heartbeater, asyncio.create_task(heartbeater.run())))

    yield start
    for heartbeater, task in tasks:
        heartbeater.stop()
        await asyncio.wait_for(task, 10)


async def test_the_first_heartbeat_says_starting_and_later_ones_say_healthy(
    running: Callable[[Heartbeater], None],
) -> None:
    transport = FakeTransport()
    running(make_heartbeater(transport))
    await until(lambda: len(transport.sent) >= 3)
    assert transport.sent[0].status is HeartbeatStatus.STARTING
    assert {hb.status for hb in transport.sent[1:]} == {HeartbeatStatus.HEALTHY}


async def test_seq_grows_by_one_per_delivered_heartbeat(
    running: Callable[[Heartbeater], None],
) -> None:
    transport = FakeTransport()
    running(make_heartbeater(transport))
    await until(lambda: len(transport.sent) >= 4)
    seqs = [hb.seq for hb in transport.sent]
    assert seqs == list(range(len(seqs)))


async def test_heartbeats_carry_the_given_identity_and_the_sample(
    running: Callable[[Heartbeater], None],
) -> None:
    transport = FakeTransport()
    running(make_heartbeater(transport))
    await until(lambda: len(transport.sent) >= 1)
    first = transport.sent[0]
    assert (first.agent_id, first.pid, first.version) == ("a1", 1234, "2.0")
    assert (first.cpu, first.memory) == (1.5, 4096)


async def test_a_status_set_by_the_program_is_sent_from_the_next_heartbeat(
    running: Callable[[Heartbeater], None],
) -> None:
    transport = FakeTransport()
    heartbeater = make_heartbeater(transport)
    running(heartbeater)
    await until(lambda: len(transport.sent) >= 1)
    heartbeater.set_status("degraded")
    mark = len(transport.sent)
    await until(lambda: len(transport.sent) >= mark + 2)
    assert transport.sent[-1].status is HeartbeatStatus.DEGRADED


async def test_a_status_set_before_start_replaces_starting(
    running: Callable[[Heartbeater], None],
) -> None:
    transport = FakeTransport()
    heartbeater = make_heartbeater(transport)
    heartbeater.set_status(HeartbeatStatus.UNHEALTHY)
    running(heartbeater)
    await until(lambda: len(transport.sent) >= 1)
    assert transport.sent[0].status is HeartbeatStatus.UNHEALTHY


def test_an_unknown_status_word_is_refused() -> None:
    with pytest.raises(ValueError, match="fine"):
        make_heartbeater(FakeTransport()).set_status("fine")


async def test_failures_are_counted_and_reported_then_delivery_resumes(
    running: Callable[[Heartbeater], None],
) -> None:
    transport = FakeTransport()
    transport.fail_with = ReceiverUnavailable("daemon away")
    failures: list[TransportError] = []
    successes: list[Heartbeat] = []
    heartbeater = make_heartbeater(
        transport, on_failure=failures.append, on_success=successes.append
    )
    running(heartbeater)
    await until(lambda: heartbeater.failed >= 3)
    assert heartbeater.sent == 0
    assert all(isinstance(error, ReceiverUnavailable) for error in failures)
    transport.fail_with = None
    await until(lambda: heartbeater.sent >= 2)
    assert [hb.seq for hb in successes[:2]] == [0, 1]
    assert successes[0].status is HeartbeatStatus.STARTING


async def test_callbacks_that_raise_never_stop_the_heartbeats(
    running: Callable[[Heartbeater], None],
) -> None:
    def explode(_value: object) -> None:
        raise RuntimeError("the program's bug")

    transport = FakeTransport()
    heartbeater = make_heartbeater(transport, on_success=explode, on_failure=explode)
    running(heartbeater)
    await until(lambda: heartbeater.sent >= 3)
    transport.fail_with = ReceiverUnavailable("away")
    await until(lambda: heartbeater.failed >= 2)


async def test_stop_returns_promptly_while_the_daemon_is_away() -> None:
    transport = FakeTransport()
    transport.fail_with = ReceiverUnavailable("away")
    heartbeater = make_heartbeater(transport)
    task = asyncio.create_task(heartbeater.run())
    await until(lambda: heartbeater.failed >= 1)
    heartbeater.stop()
    await asyncio.wait_for(task, 10)
    assert transport.closed


async def test_a_failing_receiver_is_never_retried_faster_than_the_initial_wait() -> None:
    transport = FakeTransport()
    transport.fail_with = ReceiverUnavailable("away")
    policy = BackoffPolicy(initial_s=0.01, max_s=0.05)
    heartbeater = Heartbeater(
        transport, agent_id="a1", interval_s=0.05, sampler=FixedSampler(), backoff=policy
    )
    started = time.monotonic()
    task = asyncio.create_task(heartbeater.run())
    await until(lambda: heartbeater.failed >= 8)
    heartbeater.stop()
    await asyncio.wait_for(task, 10)
    elapsed_s = time.monotonic() - started
    assert heartbeater.failed <= elapsed_s / policy.initial_s + 1


def retry_state_failing_with(error: BaseException) -> tenacity.RetryCallState:
    state = tenacity.RetryCallState(tenacity.Retrying(), fn=None, args=(), kwargs={})
    state.set_exception((type(error), error, None))
    return state


def test_a_busy_answer_waits_at_least_the_servers_retry_after() -> None:
    wait = BackoffPolicy(initial_s=0.01, max_s=0.05).wait(interval_s=0.05)
    assert wait(retry_state_failing_with(ReceiverBusy(retry_after_s=3.0))) >= 3.0


def test_backoff_waits_grow_from_the_initial_wait_up_to_the_interval() -> None:
    wait = BackoffPolicy(initial_s=0.1).wait(interval_s=1.0)
    state = retry_state_failing_with(ReceiverUnavailable("away"))
    ceilings = []
    for attempt in range(1, 8):
        state.attempt_number = attempt
        waits = [wait(state) for _ in range(200)]
        assert min(waits) >= 0.1
        ceilings.append(max(waits))
    assert ceilings[0] == pytest.approx(0.1)
    assert ceilings[2] > 0.2  # grown: the third wait may reach 0.4
    assert max(ceilings) <= 1.0


def test_the_first_heartbeat_span_is_a_child_of_the_traceparent() -> None:
    sdk_trace = pytest.importorskip("opentelemetry.sdk.trace")
    export = pytest.importorskip("opentelemetry.sdk.trace.export")
    in_memory = pytest.importorskip("opentelemetry.sdk.trace.export.in_memory_span_exporter")
    exporter = in_memory.InMemorySpanExporter()
    provider = sdk_trace.TracerProvider()
    provider.add_span_processor(export.SimpleSpanProcessor(exporter))
    heartbeat = Heartbeat("a1", 42, time.time(), "1.0", HeartbeatStatus.STARTING, 0.0, 0, 0)
    traceparent = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"
    record_first_heartbeat(
        traceparent, heartbeat, started_ns=time.time_ns(), tracer_provider=provider
    )
    (span,) = exporter.get_finished_spans()
    assert span.name == FIRST_HEARTBEAT_SPAN
    assert f"{span.context.trace_id:032x}" == "4bf92f3577b34da6a3ce929d0e0e4736"
    assert f"{span.parent.span_id:016x}" == "00f067aa0ba902b7"
    assert span.attributes["agent.id"] == "a1"
