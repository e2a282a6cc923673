"""The `WorkQueue` contract, run against every implementation: `InMemoryWorkQueue` and
`RedisWorkQueue` (on the session's real redis-server). Where they legitimately differ (what
`close()` does with waiting items), each has its own test at the end."""

from __future__ import annotations

import asyncio

import pytest

from prism.queue import (
    DuplicateTask,
    InMemoryWorkQueue,
    QueueClosed,
    QueueFull,
    TaskState,
    UnknownTask,
    WorkItem,
    WorkQueue,
)
from prism.queue.redis_queue import RedisWorkQueue, connect


from tests.queueing import FakeClock, item  # noqa: E402


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


@pytest.fixture(params=["memory", "redis"])
async def make(request, clock, redis_url):
    """factory(**options) -> a queue of the parametrized kind (max_depth 8, the fake clock)."""
    clients = []

    def factory(**kw) -> WorkQueue:
        kw.setdefault("max_depth", 8)
        kw.setdefault("clock", clock)
        instance = kw.pop("instance", "w1")
        prefetch = kw.pop("prefetch", 16)
        if request.param == "memory":
            return InMemoryWorkQueue(**kw)
        client = connect(redis_url)
        clients.append(client)
        kw.setdefault("block_ms", 20)
        return RedisWorkQueue(client, stage="encode", instance=instance, prefetch=prefetch, **kw)

    factory.kind = request.param
    yield factory
    for client in clients:
        await client.aclose()


@pytest.fixture
def q(make) -> WorkQueue:
    return make()


async def drain_ids(q: WorkQueue) -> list[str]:
    out = []
    while (it := await q.get(timeout=0)) is not None:
        out.append(it.task_id)
    return out


# ---------------------------------------------------------------- ordering


async def test_fifo_within_same_priority(q) -> None:
    for name in "abcde":
        await q.put(item(name))
    assert await drain_ids(q) == list("abcde")


async def test_priority_classes_first(q) -> None:
    await q.put(item("low", priority=0))
    await q.put(item("high", priority=5))
    await q.put(item("neg", priority=-1))
    await q.put(item("mid", priority=1))
    await q.put(item("high2", priority=5))
    assert await drain_ids(q) == ["high", "high2", "mid", "low", "neg"]


async def test_earliest_deadline_first_then_no_deadline(q, clock) -> None:
    base = int(clock.now * 1000)
    await q.put(item("none1"))
    await q.put(item("late", deadline=base + 50_000))
    await q.put(item("early", deadline=base + 10_000))
    await q.put(item("none2"))
    await q.put(item("early2", deadline=base + 10_000))
    await q.put(item("urgent_low_prio", priority=-1, deadline=base + 1))
    assert await drain_ids(q) == ["early", "early2", "late", "none1", "none2", "urgent_low_prio"]


async def test_cheaper_first_within_priority_and_deadline(q, clock) -> None:
    base = int(clock.now * 1000)
    await q.put(item("big", cost=900))
    await q.put(item("small", cost=10))
    await q.put(item("free"))
    await q.put(item("small2", cost=10))
    await q.put(item("due_big", cost=5000, deadline=base + 1000))
    await q.put(item("vip_big", priority=1, cost=10_000))
    assert await drain_ids(q) == ["vip_big", "due_big", "free", "small", "small2", "big"]


async def test_expired_items_fail_instead_of_delivery(q, clock) -> None:
    base = int(clock.now * 1000)
    await q.put(item("soon", deadline=base + 1000))
    await q.put(item("ok"))
    clock.now += 2.0
    got = await q.get(timeout=0)
    assert got is not None and got.task_id == "ok"
    assert await q.state("soon") is TaskState.FAILED
    events = [e async for e in q.watch("soon")]
    assert [e.state for e in events] == [TaskState.FAILED]
    assert events[-1].detail["code"] == "DEADLINE_EXCEEDED"


async def test_expired_items_delivered_when_not_dropping(make) -> None:
    q = make(drop_expired=False)
    await q.put(item("past", deadline=1))
    got = await q.get(timeout=0)
    assert got is not None and got.task_id == "past"


async def test_item_fields_survive_the_trip(q) -> None:
    sent = WorkItem(task_id="t", payload=bytes(range(256)) * 3, priority=2, deadline_unix_ms=0,
                    enqueued_at=1234.5678, trace_context={"traceparent": "00-ab-cd-01", "tracestate": "x=1"},
                    cost=77, attrs={"upstream": "enc-0@h:1", "placement": "split"})
    await q.put(sent)
    got = await q.get(timeout=1)
    assert got == sent


# ---------------------------------------------------------------- bounds and duplicates


async def test_bound_and_duplicates(q) -> None:
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
    with pytest.raises(QueueFull):
        await q.put(item("t9"))
    with pytest.raises(DuplicateTask):  # delivered and live
        await q.put(item("t0"))


async def test_finished_task_id_can_be_reused(q) -> None:
    await q.put(item("a"))
    await q.get()
    await q.set_state("a", TaskState.DONE)
    with pytest.raises(DuplicateTask):  # terminal but its delivery is not acked yet
        await q.put(item("a"))
    await q.ack("a")
    await q.put(item("a", priority=3))
    assert await q.state("a") is TaskState.QUEUED
    got = await q.get()
    assert got is not None and got.priority == 3 and got.attempt == 1


async def test_cancelled_waiting_id_can_be_reused_at_once(q) -> None:
    await q.put(item("a"))
    await q.cancel("a")
    await q.put(item("a"))
    assert await drain_ids(q) == ["a"]


# ---------------------------------------------------------------- get / wake-ups


async def test_get_timeout_returns_none(q) -> None:
    loop = asyncio.get_running_loop()
    t0 = loop.time()
    assert await q.get(timeout=0.05) is None
    assert loop.time() - t0 >= 0.04
    assert await q.get(timeout=0) is None


async def test_blocked_getter_woken_by_put(q) -> None:
    getter = asyncio.create_task(q.get())
    await asyncio.sleep(0.05)
    assert not getter.done()
    await q.put(item("a"))
    got = await asyncio.wait_for(getter, 2)
    assert got is not None and got.task_id == "a"


async def test_several_getters_each_get_one(q) -> None:
    getters = [asyncio.create_task(q.get(timeout=2)) for _ in range(3)]
    await asyncio.sleep(0.01)
    for name in "xyz":
        await q.put(item(name))
    got = await asyncio.gather(*getters)
    assert sorted(g.task_id for g in got) == ["x", "y", "z"]


# ---------------------------------------------------------------- states


async def test_state_lifecycle_and_terminal_is_final(q) -> None:
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


async def test_set_state_accepts_plain_int(q) -> None:
    await q.put(item("a"))
    await q.get()
    assert await q.set_state("a", 3)
    assert await q.state("a") is TaskState.RUNNING


async def test_set_state_on_waiting_task_takes_it_out(q) -> None:
    await q.put(item("a"))
    await q.put(item("b"))
    await q.set_state("a", TaskState.FAILED, code="INTERNAL", message="boom")
    assert await q.depth() == 1
    assert await drain_ids(q) == ["b"]


async def test_ack_nack_attempts_and_dead_letter(make) -> None:
    q = make(max_attempts=2)
    assert not await q.ack("nope")
    assert not await q.nack("nope")
    await q.put(item("a"))
    await q.put(item("b"))
    assert not await q.ack("a")  # not delivered yet
    assert not await q.nack("a")
    first = await q.get()
    assert first.task_id == "a" and first.attempt == 1
    await q.set_state("a", TaskState.RUNNING)
    assert await q.nack("a", reason="worker stopping")
    assert await q.state("a") is TaskState.QUEUED
    assert not await q.ack("a")
    again = await q.get()
    assert again.task_id == "a" and again.attempt == 2  # back at the front
    assert await q.nack("a")  # last attempt used up: FAILED and dead-lettered
    assert await q.state("a") is TaskState.FAILED
    assert not await q.nack("a")
    assert ("a", "gave up after 2 attempts") in await q.dead_letters()
    assert (await q.get()).task_id == "b"
    assert await q.ack("b")
    assert not await q.ack("b")
    assert await q.depth() == 0


async def test_nack_event_carries_attempt_and_detail(q) -> None:
    await q.put(item("a"))
    w = q.watch("a")
    assert (await anext(w)).state is TaskState.QUEUED
    await q.get()
    await q.nack("a", reason="draining")
    ev = await anext(w)
    assert ev.state is TaskState.QUEUED and ev.detail == {"attempt": 2, "reason": "draining"}
    await w.aclose()


# ---------------------------------------------------------------- cancel


async def test_cancel_queued_removes_it(q) -> None:
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
    events = [e async for e in q.watch("b")]
    assert events[0].detail == {"code": "CANCELLED", "message": "client went away"}


async def test_cancel_after_prefetch_is_not_delivered(q) -> None:
    for name in "abc":
        await q.put(item(name))
    assert (await q.get()).task_id == "a"  # a Redis worker has prefetched b and c by now
    assert await q.cancel("b")
    assert await drain_ids(q) == ["c"]


async def test_cancel_delivered_is_seen_by_worker(q) -> None:
    await q.put(item("a"))
    await q.get()
    await q.set_state("a", TaskState.RUNNING)
    assert not await q.is_cancelled("a")
    assert await q.cancel("a")
    assert await q.is_cancelled("a")
    assert not await q.set_state("a", TaskState.DONE)  # the worker loses the race gracefully
    assert await q.state("a") is TaskState.CANCELLED
    with pytest.raises(DuplicateTask):  # still delivered
        await q.put(item("a"))
    assert await q.ack("a")


async def test_cancel_if_queued_only_takes_work_no_worker_started(q) -> None:
    for name in "abc":
        await q.put(item(name))
    assert (await q.get()).task_id == "a"
    await q.set_state("a", TaskState.RUNNING)
    assert not await q.cancel("a", if_queued=True, code="ABORTED")  # started: left alone
    assert await q.state("a") is TaskState.RUNNING
    assert await q.cancel("b", if_queued=True, code="ABORTED", message="reassigned")
    assert await q.state("b") is TaskState.CANCELLED
    events = [e async for e in q.watch("b")]
    assert events[0].detail == {"code": "ABORTED", "message": "reassigned"}
    assert not await q.cancel("b", if_queued=True)  # terminal
    assert not await q.cancel("unknown", if_queued=True)
    assert await drain_ids(q) == ["c"]


async def test_cancelled_record_outlives_ttl_until_ack(make) -> None:
    q = make(terminal_ttl_s=0.05)
    await q.put(item("a"))
    await q.get()
    await q.cancel("a")
    await asyncio.sleep(0.15)
    assert await q.is_cancelled("a")
    assert await q.ack("a")
    await asyncio.sleep(0.15)
    assert await q.state("a") is None


async def test_unwatched_terminal_records_forgotten_after_ttl(make) -> None:
    q = make(terminal_ttl_s=0.05)
    await q.put(item("a"))
    await q.put(item("b"))
    await q.cancel("a")
    got = await q.get()
    await q.set_state(got.task_id, TaskState.DONE)
    await q.ack(got.task_id)
    assert await q.state("a") is TaskState.CANCELLED  # kept for late watchers
    await asyncio.sleep(0.15)
    assert await q.state("a") is None
    assert await q.state("b") is None
    with pytest.raises(UnknownTask):
        await anext(q.watch("a"))


# ---------------------------------------------------------------- watch


async def test_watch_yields_current_then_changes_until_terminal(q) -> None:
    await q.put(item("a"))
    seen = []

    async def follow():
        async for ev in q.watch("a"):
            seen.append((ev.state, dict(ev.detail)))

    watcher = asyncio.create_task(follow())
    await asyncio.sleep(0.05)
    await q.get()
    await q.set_state("a", TaskState.RUNNING)
    await q.set_state("a", TaskState.READY, first_token=42)
    await q.set_state("a", TaskState.DONE)
    await asyncio.wait_for(watcher, 2)
    assert seen == [
        (TaskState.QUEUED, {}),
        (TaskState.RUNNING, {}),
        (TaskState.READY, {"first_token": 42}),
        (TaskState.DONE, {}),
    ]


async def test_watch_delivers_every_progress_event_in_order(q, clock) -> None:
    await q.put(item("a"))
    w = q.watch("a")
    assert (await anext(w)).state is TaskState.QUEUED
    await q.get()
    for n in range(300):
        clock.now += 0.001
        await q.set_state("a", TaskState.RUNNING, tokens=[n, n + 1], index=n)
    await q.set_state("a", TaskState.DONE, finish_reason="length")
    events = [ev async for ev in w]
    assert [ev.detail.get("index") for ev in events[:-1]] == list(range(300))
    assert all(ev.detail["tokens"] == [ev.detail["index"], ev.detail["index"] + 1] for ev in events[:-1])
    assert events[-1].state is TaskState.DONE and events[-1].detail == {"finish_reason": "length"}
    assert [ev.at for ev in events] == sorted(ev.at for ev in events)
    assert all(ev.task_id == "a" for ev in events)


async def test_watch_late_joiner_gets_latest_first(q) -> None:
    await q.put(item("a"))
    await q.get()
    for n in range(100):
        await q.set_state("a", TaskState.RUNNING, index=n)
    w = q.watch("a")
    first = await anext(w)
    assert first.state is TaskState.RUNNING and first.detail == {"index": 99} and first.task_id == "a"
    await q.set_state("a", TaskState.RUNNING, index=100)
    assert (await anext(w)).detail == {"index": 100}
    await q.set_state("a", TaskState.FAILED, code="INTERNAL", message="x")
    last = await anext(w)
    assert last.state is TaskState.FAILED and last.detail == {"code": "INTERNAL", "message": "x"}
    with pytest.raises(StopAsyncIteration):
        await anext(w)


async def test_watch_with_replay_yields_every_event_from_the_start(q) -> None:
    await q.put(item("a"))
    await q.get()
    await q.set_state("a", TaskState.TRANSFERRING)
    for n in range(50):
        await q.set_state("a", TaskState.RUNNING, tokens=[n], index=n)
    w = q.watch("a", replay=True)
    seen = [await anext(w) for _ in range(52)]
    assert [e.state for e in seen[:2]] == [TaskState.QUEUED, TaskState.TRANSFERRING]
    assert [e.detail["index"] for e in seen[2:]] == list(range(50))
    await q.set_state("a", TaskState.DONE, tokens=[50], index=50)
    last = await anext(w)
    assert last.state is TaskState.DONE and last.detail["index"] == 50
    with pytest.raises(StopAsyncIteration):
        await anext(w)


async def test_several_watchers_all_see_everything(q) -> None:
    await q.put(item("a"))

    async def follow():
        return [ev.state async for ev in q.watch("a")]

    watchers = [asyncio.create_task(follow()) for _ in range(3)]
    await asyncio.sleep(0.05)
    await q.get()
    await q.set_state("a", TaskState.RUNNING)
    await q.cancel("a")
    results = await asyncio.wait_for(asyncio.gather(*watchers), 2)
    assert results == [[TaskState.QUEUED, TaskState.RUNNING, TaskState.CANCELLED]] * 3


async def test_watch_unknown_raises(q) -> None:
    with pytest.raises(UnknownTask):
        await anext(q.watch("ghost"))


async def test_watch_of_finished_task_within_ttl(q) -> None:
    await q.put(item("a"))
    await q.cancel("a")
    assert [ev.state async for ev in q.watch("a")] == [TaskState.CANCELLED]


async def test_watch_of_reused_id_starts_at_new_incarnation(q) -> None:
    await q.put(item("a"))
    await q.cancel("a")
    await q.put(item("a"))
    w = q.watch("a")
    assert (await anext(w)).state is TaskState.QUEUED
    await q.get()
    await q.set_state("a", TaskState.DONE)
    assert [ev.state async for ev in w] == [TaskState.DONE]


async def test_watcher_can_be_cancelled_and_closed(q) -> None:
    await q.put(item("a"))

    async def follow():
        async for _ in q.watch("a"):
            pass

    t = asyncio.create_task(follow())
    await asyncio.sleep(0.05)
    t.cancel()
    with pytest.raises(asyncio.CancelledError):
        await t
    w = q.watch("a")
    await anext(w)
    await w.aclose()
    await q.cancel("a")  # the queue still works
    assert [ev.state async for ev in q.watch("a")] == [TaskState.CANCELLED]


# ---------------------------------------------------------------- dead letters


async def test_dead_letter_waiting_delivered_terminal_and_unknown(q) -> None:
    for name in ("w", "d", "t"):
        await q.put(item(name))
    assert await q.dead_letter("w", "undecodable payload")
    assert await q.state("w") is TaskState.FAILED
    assert await q.depth() == 2
    got = await q.get()
    assert got.task_id == "d"
    assert await q.dead_letter("d", "names a request that no longer exists")
    assert await q.state("d") is TaskState.FAILED
    assert not await q.ack("d")  # dead_letter acked it
    events = [ev async for ev in q.watch("d")]  # ends at once: FAILED is terminal
    assert len(events) == 1 and events[0].detail["code"] == "ABORTED"
    assert "no longer exists" in events[0].detail["message"]
    got = await q.get()
    await q.set_state("t", TaskState.DONE)
    assert await q.dead_letter("t", "late")
    assert await q.state("t") is TaskState.DONE  # terminal states are final
    assert not await q.ack("t")
    assert not await q.dead_letter("ghost", "never existed")
    assert await q.dead_letters() == [("w", "undecodable payload"),
                                      ("d", "names a request that no longer exists"), ("t", "late")]
    assert await q.dead_letters(limit=2) == [("d", "names a request that no longer exists"), ("t", "late")]
    assert await q.dead_letters(limit=0) == []
    assert await q.get(timeout=0) is None


async def test_dead_lettered_id_can_be_reused(q) -> None:
    await q.put(item("a"))
    await q.get()
    await q.dead_letter("a", "bad")
    await q.put(item("a"))
    assert (await q.get()).task_id == "a"


# ---------------------------------------------------------------- close


async def test_close_wakes_getters_and_refuses_puts(q) -> None:
    getters = [asyncio.create_task(q.get()) for _ in range(2)]
    await asyncio.sleep(0.05)
    await q.close()
    assert await asyncio.wait_for(asyncio.gather(*getters), 2) == [None, None]
    assert await q.get() is None
    with pytest.raises(QueueClosed):
        await q.put(item("late"))
    await q.close()  # idempotent


async def test_close_keeps_in_flight_work_usable(q) -> None:
    await q.put(item("running"))
    await q.put(item("other"))
    assert (await q.get()).task_id == "running"
    await q.close()
    assert await q.get(timeout=0) is None
    assert await q.set_state("running", TaskState.RUNNING)
    assert await q.set_state("running", TaskState.DONE)
    assert await q.ack("running")


async def test_memory_close_fails_waiting_items(clock) -> None:
    q = InMemoryWorkQueue(clock=clock)
    await q.put(item("waiting"))
    watcher = q.watch("waiting")
    assert (await anext(watcher)).state is TaskState.QUEUED
    await q.close()
    ev = await anext(watcher)
    assert ev.state is TaskState.FAILED and ev.detail["code"] == "UNAVAILABLE"
    assert await q.depth() == 0


async def test_redis_close_keeps_waiting_items_for_the_next_worker(redis_url, clock) -> None:
    client = connect(redis_url)
    try:
        q = RedisWorkQueue(client, stage="encode", instance="w1", block_ms=20, clock=clock)
        for name in "abcd":
            await q.put(item(name))
        assert (await q.get()).task_id == "a"  # b, c, d prefetched
        await q.close()
        assert await q.state("b") is TaskState.QUEUED
        assert await q.depth() == 3
        # The same instance, restarted: a comes again (it was never acked), the rest as they were.
        successor = RedisWorkQueue(client, stage="encode", instance="w1", block_ms=20, clock=clock)
        got = [await successor.get(timeout=1) for _ in range(4)]
        assert [(g.task_id, g.attempt) for g in got] == [("a", 2), ("b", 1), ("c", 1), ("d", 1)]
        assert await successor.get(timeout=0) is None
    finally:
        await client.aclose()
