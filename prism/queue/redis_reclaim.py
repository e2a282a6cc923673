"""Operations on the queues of other workers, for the scheduler: moving a dead (or drained)
worker's tasks to live ones, the tasks a reader of a shared queue holds, and a queue's pending
cost. Each move is an atomic script of `prism.queue.redis_queue`, so concurrent reclaimers never
queue a task twice."""

from __future__ import annotations

import time
import uuid
from collections.abc import Callable

import redis.asyncio as aioredis

from prism.queue.base import TaskState, WorkItem
from prism.queue.redis_queue import (_DEFAULT_MAX_ATTEMPTS, _DEFAULT_TTL_MS, GROUP, _at, _check_name, _ensure_group,
                                     _entries, _Keys, _Scripts, _vet)

__all__ = ["consumer_tasks", "move_tasks", "pending_cost"]

async def move_tasks(client: aioredis.Redis, *, namespace: str = "prism", stage: str, from_instance: str,
                     route: Callable[[WorkItem], str], min_idle_ms: int = 0,
                     consumer: str | None = None) -> list[tuple[str, str]]:
    """Moves the live tasks of a dead (or drained) worker's queue ``q:{stage}:{from_instance}``
    to the queues ``route(item)`` names. Takes the entries never delivered and those delivered
    but unacknowledged for at least `min_idle_ms` (a huge value moves only undelivered ones);
    a task that had been handed out comes back with ``attempt + 1``, or is dead-lettered past
    its maximum attempts; finished tasks and stale entries are dropped. Each move is one atomic
    script that re-checks the task record, so concurrent calls never queue a task twice.
    `route` is asked only about tasks that look movable; if it raises, the entries not yet
    moved are put back. Returns ``(task_id, new_instance)`` for each task moved.

    With `consumer` (a shared queue, read by many workers), only the entries delivered to that
    consumer are taken -- what a dead worker had read from the stage's shared queue; routing
    them back to `SHARED` puts them at their old rank for any live worker."""
    keys, scripts = _Keys(namespace), _Scripts(client)
    q, dlv, dlq = keys.q(stage, from_instance), keys.dlv(stage, from_instance), keys.dlq(stage)
    if not await client.exists(q):
        return []
    await _ensure_group(client, q)
    mover = f"mover-{uuid.uuid4().hex[:12]}"
    moved: list[tuple[str, str]] = []

    async def move_one(eid: bytes, fields: dict[bytes, bytes]) -> None:
        at = _at(time.time)
        entry = await _vet(client, scripts, keys, stage, from_instance, eid, fields, at, _DEFAULT_TTL_MS)
        if entry is None:
            return
        tid = entry.item.task_id
        current, state = await client.hmget(keys.task(tid)[0], "entry", "state")
        target = from_instance  # unused unless the task is movable: the script re-checks
        if current == eid and state is not None and not TaskState(int(state)).terminal:
            target = route(entry.item)
            _check_name("route() result", target)
        res = await scripts.move(keys=[q, dlv, *keys.task(tid), dlq, keys.q(stage, target)],
                                 args=[namespace, stage, from_instance, target, eid, tid, at, _DEFAULT_TTL_MS,
                                       _DEFAULT_MAX_ATTEMPTS])
        if res == b"moved":
            moved.append((tid, target))

    async def move_all(batch: list) -> None:
        done = 0
        try:
            for eid, fields in batch:
                await move_one(eid, fields)
                done += 1
        finally:
            for eid, fields in batch[done:]:  # put back what is left, undelivered
                tid = (fields or {}).get(b"task_id", b"").decode(errors="replace")
                await scripts.release(keys=[q, dlv, keys.task(tid)[0]],
                                      args=[namespace, stage, from_instance, eid, tid])

    try:
        if consumer is not None:
            while ids := [row["message_id"] for row in await client.xpending_range(
                    q, GROUP, "-", "+", 100, consumername=consumer, idle=min_idle_ms or None)]:
                claimed = await client.xclaim(q, GROUP, mover, min_idle_ms, ids)
                if not claimed:  # deleted entries (XCLAIM drops them) or taken by someone else
                    if not await client.xpending_range(q, GROUP, "-", "+", 1, consumername=consumer,
                                                       idle=min_idle_ms or None):
                        break
                    continue
                await move_all([(eid, fields) for eid, fields in claimed])
            return moved
        start: bytes | str = "0-0"
        while True:
            start, batch, *_ = await client.xautoclaim(q, GROUP, mover, min_idle_ms, start, count=100)
            await move_all(batch)
            if start in (b"0-0", "0-0"):
                break
        while batch := _entries(await client.xreadgroup(GROUP, mover, {q: ">"}, count=100)):
            await move_all(batch)
    finally:  # nothing enters our pending list any more; leave no consumer behind if it is empty
        for name in (mover, consumer) if consumer is not None else (mover,):
            if not await client.xpending_range(q, GROUP, "-", "+", 1, consumername=name):
                await client.xgroup_delconsumer(q, GROUP, name)
    return moved


async def consumer_tasks(client: aioredis.Redis, *, namespace: str = "prism", stage: str, instance: str,
                         consumer: str) -> list[str]:
    """The ids of the tasks whose entries in ``q:{stage}:{instance}`` were delivered to `consumer`
    and are not acknowledged: what a worker reading a shared queue holds (prefetched or taken)."""
    q = _Keys(namespace).q(stage, instance)
    if not await client.exists(q):
        return []
    rows = await client.xpending_range(q, GROUP, "-", "+", 10_000, consumername=consumer)
    tasks = []
    for row in rows:
        for _, fields in await client.xrange(q, min=row["message_id"], max=row["message_id"]):
            if fields and fields.get(b"task_id"):
                tasks.append(fields[b"task_id"].decode(errors="replace"))
    return tasks


async def pending_cost(client: aioredis.Redis, *, namespace: str = "prism", stage: str, instance: str) -> int:
    """Sum of the ``cost`` of the entries of a worker's queue: waiting ones and those handed out
    but not yet acknowledged (O(n) in the queue's length; for the admin API, not for routing)."""
    q = _Keys(namespace).q(stage, instance)
    total, start = 0, b"-"
    while True:
        batch = await client.xrange(q, min=start, max="+", count=1000)
        for _, fields in batch:
            try:
                total += max(0, int(fields.get(b"cost", b"0")))
            except ValueError:
                continue
        if len(batch) < 1000:
            return total
        start = b"(" + batch[-1][0]
