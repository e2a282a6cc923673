"""Redis-only behaviour of `RedisWorkQueue`: several processes (one client each) on one queue,
dead and restarted workers, malformed entries, a restarted redis-server, concurrent reclaiming,
and no keys left behind. Real redis-server, no fakes."""

from __future__ import annotations

import asyncio
import uuid

import pytest
import redis.asyncio as aioredis

from prism.queue import DuplicateTask, QueueFull, TaskState, UnknownTask, WorkItem
from prism.queue.redis_queue import SHARED, RedisWorkQueue, connect
from prism.queue.redis_reclaim import consumer_tasks, move_tasks, pending_cost

NS = "prism"
QUEUED, RUNNING, DONE = TaskState.QUEUED, TaskState.RUNNING, TaskState.DONE


def item(task_id: str, **kw) -> WorkItem:
    return WorkItem(task_id=task_id, payload=task_id.encode(), **kw)


@pytest.fixture
async def clients(redis_url):
    """clients() -> a fresh client: one per simulated process. All closed at the end."""
    made: list[aioredis.Redis] = []

    def factory() -> aioredis.Redis:
        made.append(connect(redis_url))
        return made[-1]

    yield factory
    for client in made:
        await client.aclose()


def queue(client, instance: str = "w1", **kw) -> RedisWorkQueue:
    kw.setdefault("block_ms", 20)
    return RedisWorkQueue(client, stage="encode", instance=instance, **kw)


async def kill(client: aioredis.Redis) -> None:
    """A SIGKILLed worker: its connections go away and nothing is acked."""
    await client.aclose()


async def drain(q: RedisWorkQueue) -> list[WorkItem]:
    out = []
    while (it := await q.get(timeout=0.05)) is not None:
        out.append(it)
    return out


# ---------------------------------------------------------------- processes


async def test_producer_and_consumer_on_separate_connections(clients) -> None:
    producer, consumer = queue(clients()), queue(clients())
    sent = [WorkItem(task_id=f"t{i}", payload=bytes([i, 0, 255]) * 10, priority=i % 3, cost=i,
                     trace_context={"traceparent": f"00-{i:032x}-{i:016x}-01"}, attrs={"strategy": "image"})
            for i in range(20)]
    for it in sent:
        await producer.put(it)
    assert await producer.depth() == 20
    watchers = {it.task_id: asyncio.create_task(_states(producer, it.task_id)) for it in sent[:3]}
    await asyncio.sleep(0.05)
    got = []
    while (it := await consumer.get(timeout=0.2)) is not None:
        got.append(it)
        await consumer.set_state(it.task_id, TaskState.RUNNING, compute_ms=1)
        await consumer.set_state(it.task_id, TaskState.DONE)
        assert await consumer.ack(it.task_id)
    assert sorted(got, key=lambda i: i.task_id) == sorted(sent, key=lambda i: i.task_id)
    # Each get tops the 8-entry read-ahead window up, then serves the best entry in it.
    window, expected, rest = [], [], list(sent)
    while window or rest:
        while len(window) < 8 and rest:
            window.append(rest.pop(0))
        best = min(window, key=lambda i: (-i.priority, i.cost))
        window.remove(best)
        expected.append(best.task_id)
    assert [g.task_id for g in got] == expected and got[0].priority == 2
    for tid, w in watchers.items():
        assert await asyncio.wait_for(w, 2) == [TaskState.QUEUED, TaskState.RUNNING, TaskState.DONE]
        assert await producer.state(tid) is TaskState.DONE
    assert await producer.depth() == 0


async def test_waiting_count_is_exact_with_prefetch(clients) -> None:
    producer = queue(clients(), max_depth=4)
    consumer = queue(clients(), prefetch=8)
    for i in range(4):
        await producer.put(item(f"t{i}"))
    with pytest.raises(QueueFull):
        await producer.put(item("t4"))
    assert (await consumer.get(timeout=1)).task_id == "t0"  # prefetched t1..t3: still waiting
    assert await producer.depth() == 3 and await consumer.depth() == 3
    await producer.put(item("t4"))
    with pytest.raises(QueueFull):
        await producer.put(item("t5"))


async def test_killed_consumer_task_moved_to_another_instance(clients) -> None:
    admin = clients()
    producer = queue(admin)
    for name in "abc":
        await producer.put(item(name, cost=10))
    watcher = asyncio.create_task(_events(producer, "a"))
    doomed_client = clients()
    doomed = queue(doomed_client, "w1")
    got = await doomed.get(timeout=1)
    assert got.task_id == "a" and got.attempt == 1
    await doomed.set_state("a", TaskState.RUNNING)
    await kill(doomed_client)

    routed = []

    def route(it: WorkItem) -> str:
        routed.append((it.task_id, it.attempt))
        return "w2"

    moved = await move_tasks(admin, namespace=NS, stage="encode", from_instance="w1", route=route)
    assert sorted(moved) == [("a", "w2"), ("b", "w2"), ("c", "w2")]
    assert sorted(routed) == [("a", 1), ("b", 1), ("c", 1)]
    assert await admin.xlen(f"{NS}:q:encode:w1") == 0
    assert await pending_cost(admin, namespace=NS, stage="encode", instance="w2") == 30
    rescuer = queue(clients(), "w2")
    got = await drain(rescuer)
    assert [(g.task_id, g.attempt) for g in got] == [("a", 2), ("b", 1), ("c", 1)]
    for g in got:
        await rescuer.set_state(g.task_id, TaskState.DONE)
        await rescuer.ack(g.task_id)
    events = await asyncio.wait_for(watcher, 2)  # the watcher followed the task across instances
    assert [e.state for e in events] == [QUEUED, RUNNING, QUEUED, DONE]
    assert events[2].detail == {"attempt": 2, "instance": "w2"}
    assert await move_tasks(admin, namespace=NS, stage="encode", from_instance="w1", route=route) == []
    assert await move_tasks(admin, namespace=NS, stage="encode", from_instance="nobody", route=route) == []


async def keda_view(client: aioredis.Redis, stream: str) -> dict:
    """What KEDA's redis-streams scaler reads of group 'workers': XINFO GROUPS lag and pending."""
    (group,) = await client.xinfo_groups(stream)
    return {"lag": group["lag"], "pending": group["pending"], "consumers": group["consumers"]}


async def test_shared_queue_spreads_work_and_shows_its_backlog_to_an_autoscaler(clients) -> None:
    admin = clients()
    producer = RedisWorkQueue(admin, stage="decode", instance=SHARED, block_ms=20)
    stream = f"{NS}:q:decode:{SHARED}"
    for name in "abcd":
        await producer.put(item(name, cost=5))
    assert await keda_view(admin, stream) == {"lag": 4, "pending": 0, "consumers": 0}  # no worker yet
    one = RedisWorkQueue(clients(), stage="decode", instance=SHARED, consumer="w1", prefetch=1, block_ms=20)
    two = RedisWorkQueue(clients(), stage="decode", instance=SHARED, consumer="w2", prefetch=1, block_ms=20)
    a = await one.get(timeout=1)
    b = await two.get(timeout=1)
    assert (a.task_id, b.task_id) == ("a", "b")  # one stream, read in order by both workers
    assert await keda_view(admin, stream) == {"lag": 2, "pending": 2, "consumers": 2}
    assert await producer.depth() == 2
    await one.set_state("a", TaskState.RUNNING)
    await one.set_state("a", TaskState.DONE)
    await one.ack("a")
    assert await keda_view(admin, stream) == {"lag": 2, "pending": 1, "consumers": 2}
    rest = [x.task_id for x in await drain(one)]
    assert rest == ["c", "d"]
    for tid in rest + ["b"]:
        await producer.set_state(tid, TaskState.DONE)
        await (one if tid != "b" else two).ack(tid)
    assert await keda_view(admin, stream) == {"lag": 0, "pending": 0, "consumers": 2}
    assert await admin.xlen(stream) == 0
    for q in (one, two):
        await q.close()
        assert await q.retire()
    assert (await keda_view(admin, stream))["consumers"] == 0  # no reader left behind


async def test_dead_reader_of_a_shared_queue_gives_back_only_its_entries(clients) -> None:
    admin = clients()
    producer = RedisWorkQueue(admin, stage="encode", instance=SHARED, block_ms=20)
    for name in "abcd":
        await producer.put(item(name))
    doomed_client = clients()
    doomed = RedisWorkQueue(doomed_client, stage="encode", instance=SHARED, consumer="w1", prefetch=2, block_ms=20)
    survivor = RedisWorkQueue(clients(), stage="encode", instance=SHARED, consumer="w2", prefetch=1, block_ms=20)
    assert (await doomed.get(timeout=1)).task_id == "a"  # taken; "b" read ahead
    await doomed.set_state("a", TaskState.RUNNING)
    assert (await survivor.get(timeout=1)).task_id == "c"
    await kill(doomed_client)
    assert sorted(await consumer_tasks(admin, namespace=NS, stage="encode", instance=SHARED, consumer="w1")) == ["a", "b"]
    # The scheduler's reaper: fail what the dead worker started, give back the rest.
    await producer.set_state("a", TaskState.FAILED, code="UNAVAILABLE", message="worker lost")
    moved = await move_tasks(admin, namespace=NS, stage="encode", from_instance=SHARED, consumer="w1",
                             route=lambda it: SHARED)
    assert moved == [("b", SHARED)]
    assert await consumer_tasks(admin, namespace=NS, stage="encode", instance=SHARED, consumer="w2") == ["c"]
    got = await drain(survivor)
    # "b" was only read ahead, never handed out: no attempt used. (Order within a shared queue is
    # the stream's: a reader buffers one entry, so a given-back entry follows those already added.)
    assert sorted((g.task_id, g.attempt) for g in got) == [("b", 1), ("d", 1)]
    names = {c["name"] for c in await admin.xinfo_consumers(f"{NS}:q:encode:{SHARED}", "workers")}
    assert names == {b"w2"}  # the dead reader is gone from the group


async def test_lost_worker_flow_fails_running_and_moves_waiting(clients) -> None:
    """What the scheduler does for a dead worker: fail what it ran, move what it had not."""
    admin = clients()
    producer = queue(admin)
    for name in "abc":
        await producer.put(item(name))
    doomed_client = clients()
    doomed = queue(doomed_client, "w1")
    await doomed.get(timeout=1)
    await doomed.set_state("a", TaskState.RUNNING)
    await kill(doomed_client)
    await producer.set_state("a", TaskState.FAILED, code="UNAVAILABLE", message="worker lost")
    moved = await move_tasks(admin, namespace=NS, stage="encode", from_instance="w1", route=lambda it: "w2")
    assert sorted(moved) == [("b", "w2"), ("c", "w2")]
    assert [g.task_id for g in await drain(queue(clients(), "w2"))] == ["b", "c"]
    assert await admin.xlen(f"{NS}:q:encode:w1") == 0
    assert await admin.exists(f"{NS}:task:a") and await admin.pttl(f"{NS}:task:a") > 0


async def test_drain_moves_only_undelivered_entries(clients) -> None:
    admin = clients()
    producer = queue(admin)
    for name in "abcd":
        await producer.put(item(name))
    draining = queue(clients(), "w1")
    assert (await draining.get(timeout=1)).task_id == "a"  # b, c, d prefetched
    await draining.close()  # puts back what it had only prefetched
    moved = await move_tasks(admin, namespace=NS, stage="encode", from_instance="w1",
                             route=lambda it: "w2", min_idle_ms=10**12)
    assert sorted(moved) == [("b", "w2"), ("c", "w2"), ("d", "w2")]
    assert [(g.task_id, g.attempt) for g in await drain(queue(clients(), "w2"))] == [
        ("b", 1), ("c", 1), ("d", 1)]
    assert await draining.set_state("a", TaskState.DONE)  # the draining worker finishes a
    assert await draining.ack("a")
    assert await admin.xlen(f"{NS}:q:encode:w1") == 0


async def test_move_route_failure_leaves_tasks_movable(clients) -> None:
    admin = clients()
    producer = queue(admin)
    for name in "abc":
        await producer.put(item(name))

    def broken(it: WorkItem) -> str:
        raise LookupError("no live instance")

    with pytest.raises(LookupError):
        await move_tasks(admin, namespace=NS, stage="encode", from_instance="w1", route=broken)
    info = await admin.xinfo_groups(f"{NS}:q:encode:w1")
    assert info[0]["pending"] == 0 and info[0]["consumers"] == 0
    moved = await move_tasks(admin, namespace=NS, stage="encode", from_instance="w1", route=lambda it: "w3")
    assert sorted(moved) == [("a", "w3"), ("b", "w3"), ("c", "w3")]


async def test_concurrent_move_tasks_never_duplicates(clients) -> None:
    admin = clients()
    producer = queue(admin, max_depth=100)
    ids = [f"t{i:02d}" for i in range(40)]
    for tid in ids:
        await producer.put(item(tid))
    doomed_client = clients()
    doomed = queue(doomed_client, "w1", prefetch=8)
    handed = [(await doomed.get(timeout=1)).task_id for _ in range(5)]
    await kill(doomed_client)

    first, second = await asyncio.gather(
        move_tasks(clients(), namespace=NS, stage="encode", from_instance="w1", route=lambda it: "w2"),
        move_tasks(clients(), namespace=NS, stage="encode", from_instance="w1", route=lambda it: "w3"))
    moved = first + second
    assert sorted(tid for tid, _ in moved) == ids  # each task moved exactly once
    assert await admin.xlen(f"{NS}:q:encode:w2") + await admin.xlen(f"{NS}:q:encode:w3") == 40
    got = await drain(queue(clients(), "w2", prefetch=64)) + await drain(queue(clients(), "w3", prefetch=64))
    assert sorted(g.task_id for g in got) == ids
    assert {g.task_id: g.attempt for g in got if g.attempt == 2}.keys() == set(handed)
    for tid, instance in moved:
        assert await admin.hget(f"{NS}:task:{tid}", "instance") == instance.encode()
    assert await admin.xlen(f"{NS}:q:encode:w1") == 0
    assert (await admin.xinfo_groups(f"{NS}:q:encode:w1"))[0]["consumers"] == 1  # only w1's own


# ---------------------------------------------------------------- restarts of a worker


async def test_restarted_consumer_receives_its_pending_entries(clients) -> None:
    producer = queue(clients())
    for name in "abc":
        await producer.put(item(name))
    watcher = asyncio.create_task(_events(producer, "a"))
    first_client = clients()
    first = queue(first_client, "w1")
    assert (await first.get(timeout=1)).task_id == "a"
    await first.set_state("a", TaskState.RUNNING)
    await kill(first_client)

    second = queue(clients(), "w1")  # same instance name, new process
    got = await drain(second)
    assert [(g.task_id, g.attempt) for g in got] == [("a", 2), ("b", 1), ("c", 1)]
    await second.set_state("a", TaskState.DONE)
    assert await second.ack("a")
    events = await asyncio.wait_for(watcher, 2)
    assert [e.state for e in events] == [QUEUED, RUNNING, QUEUED, DONE]
    assert events[2].detail == {"attempt": 2, "redelivered": True}


async def test_crash_looping_task_is_dead_lettered(clients) -> None:
    producer = queue(clients(), max_attempts=2)
    await producer.put(item("poison"))
    for attempt in (1, 2):
        client = clients()
        got = await queue(client, "w1").get(timeout=1)
        assert got.task_id == "poison" and got.attempt == attempt
        await kill(client)
    assert await queue(clients(), "w1").get(timeout=0.1) is None
    assert await producer.state("poison") is TaskState.FAILED
    assert await producer.dead_letters() == [("poison", "gave up after 2 attempts")]


async def test_lost_delivery_reply_is_recovered_by_rescan(clients, monkeypatch) -> None:
    """An entry read by XREADGROUP whose reply never reached us (connection cut) sits in our
    pending list; an idle worker finds it again."""
    monkeypatch.setattr("prism.queue.redis_queue.RESCAN_S", 0.05)
    client = clients()
    q = queue(client)
    assert await q.get(timeout=0) is None  # initial scan done
    await q.put(item("a"))
    await client.xreadgroup("workers", "w1", {f"{NS}:q:encode:w1": ">"})  # "lost" delivery
    got = await q.get(timeout=1)
    assert got is not None and got.task_id == "a" and got.attempt == 1


# ---------------------------------------------------------------- bad entries


async def test_malformed_entries_are_dead_lettered_once(clients) -> None:
    admin = clients()
    q = queue(admin)
    await q.put(item("good1"))
    key = f"{NS}:q:encode:w1"
    good = {"task_id": "x", "payload": b"\x00", "priority": "0", "deadline_ms": "0", "cost": "0",
            "attempt": "1", "enqueued_at": "1.0", "trace": "{}", "attrs": "{}"}
    await admin.xadd(key, {"garbage": "1"})
    await admin.xadd(key, {**good, "task_id": "bad_prio", "priority": "high"})
    await admin.xadd(key, {k: v for k, v in good.items() if k != "payload"} | {"task_id": "no_payload"})
    await admin.xadd(key, {**good, "task_id": "bad_trace", "trace": "[1, 2]"})
    await admin.xadd(key, {**good, "task_id": "good1", "cost": "-5"})  # names a live task: not failed
    await q.put(item("good2"))
    assert [g.task_id for g in await drain(q)] == ["good1", "good2"]
    letters = dict((reason.split(": ", 1)[1], tid) for tid, reason in await q.dead_letters())
    assert letters == {"missing field 'task_id'": "", "invalid field 'priority'": "bad_prio",
                       "missing field 'payload'": "no_payload", "invalid field 'trace'": "bad_trace",
                       "invalid field 'cost'": "good1"}
    assert all(reason.startswith("malformed entry ") for _, reason in await q.dead_letters())
    assert await q.state("good1") is TaskState.QUEUED
    assert await admin.xlen(key) == 2  # only the two good deliveries, pending
    assert await queue(clients(), "w1").get(timeout=0.1) is not None  # good1 redelivered, not junk
    assert len(await q.dead_letters()) == 5


async def test_entry_whose_task_record_vanished(clients) -> None:
    admin = clients()
    q = queue(admin)
    await q.put(item("a"))
    await q.put(item("b"))
    await admin.delete(f"{NS}:task:a")
    assert [g.task_id for g in await drain(q)] == ["b"]
    assert await q.dead_letters() == [("a", "task record vanished")]
    assert await admin.xlen(f"{NS}:q:encode:w1") == 1  # b, pending


# ---------------------------------------------------------------- Redis itself restarts


async def test_items_survive_a_redis_restart(redis_proc) -> None:
    client, other = connect(redis_proc.url), connect(redis_proc.url)
    try:
        producer = queue(client)
        consumer = queue(other, "w1")
        for name in "abc":
            await producer.put(item(name, cost=1))
        assert (await consumer.get(timeout=1)).task_id == "a"
        redis_proc.restart()  # SIGTERM (the AOF is flushed), same port and directory
        assert await producer.depth() == 2
        assert await consumer.set_state("a", TaskState.DONE)
        assert await consumer.ack("a")
        assert [g.task_id for g in await drain(consumer)] == ["b", "c"]
    finally:
        await client.aclose()
        await other.aclose()


async def test_blocked_getter_and_watcher_ride_out_a_redis_restart(redis_proc) -> None:
    client, other = connect(redis_proc.url), connect(redis_proc.url)
    try:
        producer, consumer = queue(client), queue(other, "w1")
        await producer.put(item("a"))
        watcher = asyncio.create_task(_states(producer, "a"))
        assert (await consumer.get(timeout=1)).task_id == "a"
        getter = asyncio.create_task(consumer.get(timeout=10))
        await asyncio.sleep(0.1)  # both block in XREAD/XREADGROUP now
        redis_proc.restart()
        await producer.put(item("b"))
        assert (await asyncio.wait_for(getter, 10)).task_id == "b"
        await consumer.set_state("a", TaskState.DONE)
        assert await asyncio.wait_for(watcher, 10) == [QUEUED, DONE]
    finally:
        await client.aclose()
        await other.aclose()


async def test_items_survive_a_redis_crash_with_fsync_always(redis_proc) -> None:
    client = connect(redis_proc.url)
    try:
        await client.config_set("appendfsync", "always")
        producer = queue(client)
        for name in "ab":
            await producer.put(item(name))
        redis_proc.kill()
        redis_proc.start()
        consumer = queue(client, "w1")
        got = await drain(consumer)
        assert [g.task_id for g in got] == ["a", "b"]
        assert await producer.state("a") is TaskState.QUEUED
    finally:
        await client.aclose()


# ---------------------------------------------------------------- housekeeping


async def test_terminal_records_expire_and_no_keys_are_left(clients) -> None:
    admin = clients()
    q = queue(admin, terminal_ttl_s=0.2, max_attempts=1)
    for name in ("done", "cancelled", "nacked", "waiting_cancel", "dead"):
        await q.put(item(name))
    await q.cancel("waiting_cancel")
    for _ in range(4):
        got = await q.get(timeout=1)
        if got.task_id == "done":
            await q.set_state("done", TaskState.DONE)
            await q.ack("done")
            assert 0 < await admin.pttl(f"{NS}:task:done") <= 200
            assert 0 < await admin.pttl(f"{NS}:ev:done") <= 200
        elif got.task_id == "cancelled":
            await q.cancel("cancelled")
            await asyncio.sleep(0.3)
            assert await q.is_cancelled("cancelled")  # kept while the delivery is unacked
            await q.ack("cancelled")
        elif got.task_id == "nacked":
            await q.nack("nacked")  # max_attempts=1: FAILED
        else:
            await q.dead_letter("dead", "test")
    await asyncio.sleep(0.4)
    keys = {k.decode() for k in await admin.keys("*")}
    assert keys == {f"{NS}:q:encode:w1", f"{NS}:dlq:encode"}
    assert await admin.xlen(f"{NS}:q:encode:w1") == 0


async def test_pending_cost_and_state_of_handed_out_work(clients) -> None:
    admin = clients()
    q = queue(admin)
    for name, cost in (("a", 5), ("b", 7), ("c", 11)):
        await q.put(item(name, cost=cost))
    assert await pending_cost(admin, namespace=NS, stage="encode", instance="w1") == 23
    await q.get(timeout=1)
    assert await pending_cost(admin, namespace=NS, stage="encode", instance="w1") == 23
    await q.set_state("a", TaskState.DONE)
    await q.ack("a")
    assert await pending_cost(admin, namespace=NS, stage="encode", instance="w1") == 18
    assert await pending_cost(admin, namespace=NS, stage="encode", instance="none") == 0


async def test_put_retried_after_a_lost_reply_is_idempotent(clients, monkeypatch) -> None:
    q = queue(clients())
    await q.put(item("a"))
    with pytest.raises(DuplicateTask):
        await q.put(item("a"))
    token = uuid.uuid4()
    monkeypatch.setattr("prism.queue.redis_queue.uuid.uuid4", lambda: token)
    await q.put(item("b"))
    await q.put(item("b"))  # what a client retry re-sends: the same put, the same token
    assert await q.depth() == 2


async def test_unknown_task_operations(clients) -> None:
    q = queue(clients())
    with pytest.raises(UnknownTask):
        await q.set_state("ghost", TaskState.RUNNING)
    with pytest.raises(UnknownTask):
        await anext(q.watch("ghost"))
    assert not await q.cancel("ghost")
    assert not await q.dead_letter("ghost", "x")
    assert await q.state("ghost") is None


def test_connect_settings_and_argument_validation(redis_url) -> None:
    client = connect(redis_url)
    kwargs = client.connection_pool.connection_kwargs
    assert kwargs["retry"].get_retries() >= 10 and kwargs["health_check_interval"] > 0
    assert not kwargs.get("decode_responses")
    with pytest.raises(ValueError, match="decode_responses"):
        connect(redis_url, decode_responses=True)
    assert client.connection_pool.max_connections >= 1000
    with pytest.raises(ValueError, match="decode_responses"):
        RedisWorkQueue(aioredis.from_url(redis_url, decode_responses=True), stage="encode", instance="w")
    for name, bad in (("max_depth", 0), ("max_attempts", 0), ("prefetch", 0), ("block_ms", 0),
                      ("terminal_ttl_s", 0), ("namespace", ""), ("stage", "a:b"), ("instance", ""),
                      ("instance", "a b"), ("clock", 3)):
        kw = {"stage": "encode", "instance": "w", name: bad}
        with pytest.raises(ValueError, match=name):
            RedisWorkQueue(client, **kw)


async def _states(q, task_id: str) -> list[TaskState]:
    return [ev.state async for ev in q.watch(task_id)]


async def _events(q, task_id: str) -> list:
    return [ev async for ev in q.watch(task_id)]



def test_a_redis_server_started_in_a_relative_folder_comes_up(tmp_path, monkeypatch) -> None:
    """`prism up --log-dir logs` style relative folders: redis-server changes into --dir before it
    opens --logfile, so a relative path would be opened twice-relative and redis would exit 1."""
    import redis

    from prism.runtime.redisproc import RedisProcess

    monkeypatch.chdir(tmp_path)
    with RedisProcess("logs/redis") as server:
        client = redis.Redis(host=server.host, port=server.port)
        assert client.ping() is True
        client.close()
    assert (tmp_path / "logs" / "redis" / "redis.log").exists()
