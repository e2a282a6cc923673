"""What only the InMemoryWorkQueue does: record forgetting, watcher detachment, wake-up passing.
The WorkQueue contract itself runs against every implementation in
tests/integration/test_queue_contract.py."""

from __future__ import annotations

import asyncio
import gc

import pytest

from prism.queue import (
    TERMINAL_STATES,
    InMemoryWorkQueue,
    TaskState,
    WorkItem,
    WorkQueue,
)
from prism.v1 import common_pb2


from tests.queueing import FakeClock, item  # noqa: E402  (shared with the contract suite)


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


@pytest.fixture
def q(clock: FakeClock) -> InMemoryWorkQueue:
    return InMemoryWorkQueue(max_depth=8, clock=clock)


async def drain_ids(q: WorkQueue) -> list[str]:
    out = []
    while (it := await q.get(timeout=0)) is not None:
        out.append(it.task_id)
    return out


# ---------------------------------------------------------------- types


def test_task_state_values_match_proto() -> None:
    for state in TaskState:
        assert common_pb2.TaskState.Value(f"TASK_STATE_{state.name}") == state.value
    assert {s for s in TaskState if s.terminal} == set(TERMINAL_STATES) == {
        TaskState.DONE, TaskState.FAILED, TaskState.CANCELLED}


def test_work_item_validation() -> None:
    with pytest.raises(ValueError):
        WorkItem(task_id="", payload=b"")
    with pytest.raises(TypeError):
        WorkItem(task_id="a", payload="text")  # type: ignore[arg-type]
    with pytest.raises(ValueError):
        WorkItem(task_id="a", payload=b"", deadline_unix_ms=-1)
    with pytest.raises(ValueError):
        WorkItem(task_id="a", payload=b"", attempt=0)
    ctx = {"traceparent": "00-abc-def-01"}
    it = WorkItem(task_id="a", payload=bytearray(b"xy"), trace_context=ctx)
    assert it.payload == b"xy" and isinstance(it.payload, bytes)
    ctx["traceparent"] = "changed"
    assert it.trace_context == {"traceparent": "00-abc-def-01"}  # copied
    assert it.attempt == 1 and it.enqueued_at > 0


def test_constructor_validation() -> None:
    with pytest.raises(ValueError):
        InMemoryWorkQueue(max_depth=0)
    with pytest.raises(ValueError):
        InMemoryWorkQueue(terminal_ttl_s=0)
    with pytest.raises(ValueError):
        InMemoryWorkQueue(max_attempts=0)


# ---------------------------------------------------------------- ordering


async def test_cancelled_getter_passes_wakeup_on(q: InMemoryWorkQueue) -> None:
    g1 = asyncio.create_task(q.get())
    g2 = asyncio.create_task(q.get())
    await asyncio.sleep(0.01)
    await q.put(item("a"))  # wakes g1
    g1.cancel()  # ... which is cancelled before it runs
    got = await asyncio.wait_for(g2, 1)
    assert got is not None and got.task_id == "a"
    with pytest.raises(asyncio.CancelledError):
        await g1
    assert not q._getters


async def test_watcher_detaches_on_aclose(q: InMemoryWorkQueue) -> None:
    await q.put(item("a"))
    w = q.watch("a")
    await anext(w)
    assert q.watcher_count("a") == 1
    await w.aclose()
    assert q.watcher_count("a") == 0


async def test_watcher_detaches_on_task_cancellation(q: InMemoryWorkQueue) -> None:
    await q.put(item("a"))

    async def follow():
        async for _ in q.watch("a"):
            pass

    t = asyncio.create_task(follow())
    await asyncio.sleep(0.01)
    assert q.watcher_count("a") == 1
    t.cancel()
    with pytest.raises(asyncio.CancelledError):
        await t
    assert q.watcher_count("a") == 0


async def test_abandoned_watcher_detaches_when_collected(q: InMemoryWorkQueue) -> None:
    await q.put(item("a"))

    async def peek_once():
        async for ev in q.watch("a"):
            return ev.state  # stops listening without closing the iterator

    assert await peek_once() is TaskState.QUEUED
    gc.collect()
    for _ in range(5):  # the loop's async-generator finaliser schedules aclose()
        await asyncio.sleep(0)
    assert q.watcher_count() == 0


async def test_terminal_records_forgotten_after_watchers_saw_them(q: InMemoryWorkQueue) -> None:
    for i in range(50):
        tid = f"t{i}"
        await q.put(item(tid))
        states = asyncio.create_task(_collect(q, tid))
        await asyncio.sleep(0)
        got = await q.get()
        await q.set_state(got.task_id, TaskState.RUNNING)
        await q.set_state(got.task_id, TaskState.DONE)
        await q.ack(got.task_id)
        assert (await states)[-1] is TaskState.DONE
    assert q.tracked_tasks == 0
    assert q.watcher_count() == 0
    assert await q.state("t0") is None


async def test_ttl_timer_of_replaced_record_is_harmless(clock) -> None:
    q = InMemoryWorkQueue(terminal_ttl_s=0.05, clock=clock)
    await q.put(item("a"))
    await q.cancel("a")
    await q.put(item("a"))  # reuse the id of a finished task
    await asyncio.sleep(0.1)
    assert await q.state("a") is TaskState.QUEUED


async def test_waiting_getters_do_not_accumulate(q: InMemoryWorkQueue) -> None:
    for _ in range(20):
        assert await q.get(timeout=0.001) is None
    assert len(q._getters) == 0


async def _collect(q: WorkQueue, task_id: str) -> list[TaskState]:
    return [ev.state async for ev in q.watch(task_id)]
