"""Unit tests for prism.queue: the InMemoryWorkQueue against the WorkQueue contract."""

from __future__ import annotations

import asyncio
import gc

import pytest

from prism.queue import (
    TERMINAL_STATES,
    DuplicateTask,
    InMemoryWorkQueue,
    QueueClosed,
    QueueFull,
    TaskState,
    UnknownTask,
    WorkItem,
    WorkQueue,
)
from prism.v1 import common_pb2


def item(task_id: str, priority: int = 0, deadline: int = 0, **kw) -> WorkItem:
    return WorkItem(task_id=task_id, payload=task_id.encode(), priority=priority,
                    deadline_unix_ms=deadline, **kw)


class FakeClock:
    def __init__(self, now: float = 1_000_000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


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


async def test_fifo_within_same_priority_and_no_deadline(q: InMemoryWorkQueue) -> None:
    for name in "abcde":
        await q.put(item(name))
    assert await drain_ids(q) == list("abcde")


async def test_priority_classes_first(q: InMemoryWorkQueue) -> None:
    await q.put(item("low", priority=0))
    await q.put(item("high", priority=5))
    await q.put(item("neg", priority=-1))
    await q.put(item("mid", priority=1))
    await q.put(item("high2", priority=5))
    assert await drain_ids(q) == ["high", "high2", "mid", "low", "neg"]


async def test_earliest_deadline_first_then_no_deadline(q: InMemoryWorkQueue, clock) -> None:
    base = int(clock.now * 1000)
    await q.put(item("none1"))
    await q.put(item("late", deadline=base + 50_000))
    await q.put(item("early", deadline=base + 10_000))
    await q.put(item("none2"))
    await q.put(item("early2", deadline=base + 10_000))
    await q.put(item("urgent_low_prio", priority=-1, deadline=base + 1))
    assert await drain_ids(q) == ["early", "early2", "late", "none1", "none2", "urgent_low_prio"]


async def test_expired_items_fail_instead_of_delivery(q: InMemoryWorkQueue, clock) -> None:
    base = int(clock.now * 1000)
    await q.put(item("soon", deadline=base + 1000))
    await q.put(item("ok"))
    clock.now += 2.0
    got = await q.get(timeout=0)
    assert got is not None and got.task_id == "ok"
    assert await q.state("soon") is TaskState.FAILED
    events = [e async for e in q.watch("soon")]
    assert events[-1].detail["code"] == "DEADLINE_EXCEEDED"


async def test_expired_items_delivered_when_not_dropping(clock) -> None:
    q = InMemoryWorkQueue(drop_expired=False, clock=clock)
    await q.put(item("past", deadline=1))
    got = await q.get(timeout=0)
    assert got is not None and got.task_id == "past"


# ---------------------------------------------------------------- bounds and duplicates


async def test_bound_and_duplicates(q: InMemoryWorkQueue) -> None:
    for i in range(8):
        await q.put(item(f"t{i}"))
    assert await q.depth() == 8
    with pytest.raises(QueueFull):
        await q.put(item("overflow"))
    assert await q.state("overflow") is None
    with pytest.raises(DuplicateTask):
        await q.put(item("t0"))
    got = await q.get()
    assert got is not None and got.task_id == "t0"
    assert await q.depth() == 7
    await q.put(item("t8"))  # room again: delivered items do not count
    with pytest.raises(DuplicateTask):  # delivered and live
        await q.put(item("t0"))


async def test_finished_task_id_can_be_reused(q: InMemoryWorkQueue) -> None:
    await q.put(item("a"))
    await q.get()
    await q.set_state("a", TaskState.DONE)
    with pytest.raises(DuplicateTask):  # terminal but its delivery is not acked yet
        await q.put(item("a"))
    await q.ack("a")
    await q.put(item("a", priority=3))
    assert await q.state("a") is TaskState.QUEUED
    got = await q.get()
    assert got is not None and got.priority == 3


# ---------------------------------------------------------------- get / wake-ups


async def test_get_timeout_returns_none(q: InMemoryWorkQueue) -> None:
    loop = asyncio.get_running_loop()
    t0 = loop.time()
    assert await q.get(timeout=0.05) is None
    assert loop.time() - t0 >= 0.04
    assert await q.get(timeout=0) is None
    assert not q._getters


async def test_blocked_getter_woken_by_put(q: InMemoryWorkQueue) -> None:
    getter = asyncio.create_task(q.get())
    await asyncio.sleep(0.01)
    assert not getter.done()
    await q.put(item("a"))
    got = await asyncio.wait_for(getter, 1)
    assert got is not None and got.task_id == "a"


async def test_several_getters_each_get_one(q: InMemoryWorkQueue) -> None:
    getters = [asyncio.create_task(q.get(timeout=1)) for _ in range(3)]
    await asyncio.sleep(0.01)
    for name in "xyz":
        await q.put(item(name))
    got = await asyncio.gather(*getters)
    assert sorted(g.task_id for g in got) == ["x", "y", "z"]


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


async def test_close_wakes_getters_and_fails_waiting_items(q: InMemoryWorkQueue) -> None:
    getters = [asyncio.create_task(q.get()) for _ in range(2)]
    await asyncio.sleep(0.01)
    await q.close()
    assert await asyncio.gather(*getters) == [None, None]
    assert await q.get() is None
    with pytest.raises(QueueClosed):
        await q.put(item("late"))
    await q.close()  # idempotent


async def test_close_keeps_in_flight_work_usable(clock) -> None:
    q = InMemoryWorkQueue(clock=clock)
    await q.put(item("running"))
    await q.put(item("waiting"))
    assert (await q.get()).task_id == "running"
    watcher = q.watch("waiting")
    assert (await anext(watcher)).state is TaskState.QUEUED
    await q.close()
    ev = await anext(watcher)
    assert ev.state is TaskState.FAILED and ev.detail["code"] == "UNAVAILABLE"
    assert await q.depth() == 0
    assert await q.set_state("running", TaskState.RUNNING)
    assert await q.set_state("running", TaskState.DONE)
    assert await q.ack("running")


# ---------------------------------------------------------------- states


async def test_state_lifecycle_and_terminal_is_final(q: InMemoryWorkQueue) -> None:
    assert await q.state("nope") is None
    with pytest.raises(UnknownTask):
        await q.set_state("nope", TaskState.RUNNING)
    await q.put(item("a"))
    assert await q.state("a") is TaskState.QUEUED
    await q.get()
    for s in (TaskState.TRANSFERRING, TaskState.RUNNING, TaskState.RUNNING, TaskState.READY):
        assert await q.set_state("a", s)
        assert await q.state("a") is s
    with pytest.raises(ValueError):
        await q.set_state("a", TaskState.QUEUED)
    assert await q.set_state("a", TaskState.DONE)
    assert not await q.set_state("a", TaskState.RUNNING)
    assert not await q.set_state("a", TaskState.FAILED)
    assert await q.state("a") is TaskState.DONE


async def test_set_state_accepts_plain_int(q: InMemoryWorkQueue) -> None:
    await q.put(item("a"))
    await q.get()
    assert await q.set_state("a", 3)  # type: ignore[arg-type]
    assert await q.state("a") is TaskState.RUNNING


async def test_set_state_on_waiting_task_takes_it_out(q: InMemoryWorkQueue) -> None:
    await q.put(item("a"))
    await q.set_state("a", TaskState.FAILED, code="INTERNAL", message="boom")
    assert await q.depth() == 0
    assert await q.get(timeout=0) is None


async def test_ack_and_nack(clock) -> None:
    q = InMemoryWorkQueue(max_attempts=2, clock=clock)
    assert not await q.ack("nope")
    await q.put(item("a"))
    await q.put(item("b"))
    assert not await q.ack("a")  # not delivered yet
    first = await q.get()
    assert first.task_id == "a" and first.attempt == 1
    assert q.delivered_count == 1
    await q.set_state("a", TaskState.RUNNING)
    assert await q.nack("a", reason="worker stopping")
    assert await q.state("a") is TaskState.QUEUED
    assert not await q.ack("a")
    again = await q.get()
    assert again.task_id == "a" and again.attempt == 2  # back at the front
    assert await q.nack("a")  # last attempt used up: FAILED
    assert await q.state("a") is TaskState.FAILED
    assert not await q.nack("a")
    assert (await q.get()).task_id == "b"
    assert await q.ack("b")
    assert not await q.ack("b")
    assert q.delivered_count == 0


# ---------------------------------------------------------------- cancel


async def test_cancel_queued_removes_it(q: InMemoryWorkQueue) -> None:
    for name in "abc":
        await q.put(item(name))
    assert await q.cancel("b", message="client went away")
    assert await q.state("b") is TaskState.CANCELLED
    assert await q.is_cancelled("b")
    assert await q.depth() == 2
    assert await drain_ids(q) == ["a", "c"]
    assert not await q.cancel("b")
    assert not await q.cancel("unknown")
    assert not await q.is_cancelled("unknown")


async def test_cancel_running_is_seen_by_worker(q: InMemoryWorkQueue) -> None:
    await q.put(item("a"))
    await q.get()
    await q.set_state("a", TaskState.RUNNING)
    assert not await q.is_cancelled("a")
    assert await q.cancel("a")
    assert await q.is_cancelled("a")
    # the worker loses the race gracefully...
    assert not await q.set_state("a", TaskState.DONE)
    assert await q.state("a") is TaskState.CANCELLED
    # ...and the record stays until the worker acks, however long that takes
    assert q.tracked_tasks == 1
    assert await q.ack("a")


async def test_cancel_running_record_outlives_ttl_until_ack(clock) -> None:
    q = InMemoryWorkQueue(terminal_ttl_s=0.01, clock=clock)
    await q.put(item("a"))
    await q.get()
    await q.cancel("a")
    await asyncio.sleep(0.05)
    assert await q.is_cancelled("a")
    await q.ack("a")
    assert q.tracked_tasks == 0


# ---------------------------------------------------------------- watch


async def test_watch_yields_current_then_changes_until_terminal(q: InMemoryWorkQueue) -> None:
    await q.put(item("a"))
    seen = []

    async def follow():
        async for ev in q.watch("a"):
            seen.append((ev.state, dict(ev.detail)))

    watcher = asyncio.create_task(follow())
    await asyncio.sleep(0)
    await q.get()
    await q.set_state("a", TaskState.RUNNING)
    await q.set_state("a", TaskState.READY, first_token=42)
    await q.set_state("a", TaskState.DONE)
    await asyncio.wait_for(watcher, 1)
    assert seen == [
        (TaskState.QUEUED, {}),
        (TaskState.RUNNING, {}),
        (TaskState.READY, {"first_token": 42}),
        (TaskState.DONE, {}),
    ]


async def test_watch_late_joiner_starts_at_current_state(q: InMemoryWorkQueue) -> None:
    await q.put(item("a"))
    await q.get()
    await q.set_state("a", TaskState.RUNNING)
    w = q.watch("a")
    first = await anext(w)
    assert first.state is TaskState.RUNNING and first.task_id == "a"
    await q.set_state("a", TaskState.FAILED, code="INTERNAL", message="x")
    last = await anext(w)
    assert last.state is TaskState.FAILED and last.detail == {"code": "INTERNAL", "message": "x"}
    with pytest.raises(StopAsyncIteration):
        await anext(w)


async def test_several_watchers_all_see_everything(q: InMemoryWorkQueue) -> None:
    await q.put(item("a"))

    async def follow():
        return [ev.state async for ev in q.watch("a")]

    watchers = [asyncio.create_task(follow()) for _ in range(3)]
    await asyncio.sleep(0)
    assert q.watcher_count("a") == 3
    await q.get()
    await q.set_state("a", TaskState.RUNNING)
    await q.cancel("a")
    results = await asyncio.gather(*watchers)
    assert results == [[TaskState.QUEUED, TaskState.RUNNING, TaskState.CANCELLED]] * 3


async def test_watch_unknown_raises(q: InMemoryWorkQueue) -> None:
    with pytest.raises(UnknownTask):
        await anext(q.watch("ghost"))


async def test_watch_of_finished_task_within_ttl(q: InMemoryWorkQueue) -> None:
    await q.put(item("a"))
    await q.cancel("a")
    events = [ev.state async for ev in q.watch("a")]
    assert events == [TaskState.CANCELLED]


# ---------------------------------------------------------------- leaks


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


async def test_unwatched_terminal_records_forgotten_after_ttl(clock) -> None:
    q = InMemoryWorkQueue(terminal_ttl_s=0.05, clock=clock)
    await q.put(item("a"))
    await q.put(item("b"))
    await q.cancel("a")
    got = await q.get()
    await q.set_state(got.task_id, TaskState.DONE)
    await q.ack(got.task_id)
    assert q.tracked_tasks == 2  # kept for late watchers
    assert await q.state("a") is TaskState.CANCELLED
    await asyncio.sleep(0.1)
    assert q.tracked_tasks == 0
    assert await q.state("b") is None


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
