"""The keyed work queue's promises."""

from __future__ import annotations

import asyncio

import pytest

from reconciler.daemon.workqueue import RetryPolicy, WorkQueue


async def test_an_id_added_many_times_is_handed_out_once() -> None:
    queue: WorkQueue[str] = WorkQueue()
    for _ in range(5):
        queue.add("a")
    queue.add("b")
    assert [await queue.get(), await queue.get()] == ["a", "b"]
    assert len(queue) == 0


async def test_an_id_added_while_in_flight_comes_back_once_after_done() -> None:
    queue: WorkQueue[str] = WorkQueue()
    queue.add("a")
    key = await queue.get()
    queue.add("a")
    queue.add("a")
    assert len(queue) == 0, "never handed to two workers at once"
    assert queue.in_flight == 1
    queue.done(key)
    assert await queue.get() == "a"
    queue.done("a")
    assert len(queue) == 0
    assert queue.in_flight == 0


async def test_add_after_keeps_the_earliest_timer() -> None:
    queue: WorkQueue[str] = WorkQueue()
    queue.add_after("a", 30.0)
    queue.add_after("a", 0.01)
    queue.add_after("a", 20.0)
    assert await asyncio.wait_for(queue.get(), timeout=5.0) == "a"


async def test_rate_limited_retries_grow_and_forget_resets() -> None:
    queue: WorkQueue[str] = WorkQueue(retry=RetryPolicy(initial_s=1.0, max_s=8.0, jitter=0.0))
    delays = [queue.add_rate_limited("a") for _ in range(5)]
    assert delays == [1.0, 2.0, 4.0, 8.0, 8.0]
    queue.forget("a")
    assert queue.add_rate_limited("a") == 1.0
    queue.close()


async def test_jitter_stretches_delays_within_its_fraction() -> None:
    queue: WorkQueue[str] = WorkQueue(retry=RetryPolicy(initial_s=1.0, jitter=0.5), seed=7)
    delay = queue.add_rate_limited("a")
    assert 1.0 <= delay <= 1.5
    queue.close()


async def test_close_ends_waiting_workers() -> None:
    queue: WorkQueue[str] = WorkQueue()
    waiter = asyncio.create_task(queue.get())
    await asyncio.sleep(0)
    queue.close()
    with pytest.raises(asyncio.CancelledError):
        await waiter
