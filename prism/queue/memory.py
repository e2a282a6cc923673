"""`InMemoryWorkQueue`: the `WorkQueue` contract on one asyncio event loop.

Used by a stage process that serves its own queue (the default deployment) and by tests. Not
thread-safe: call it from the event loop that runs the server and the worker. Items live in
the process, so "redelivery" only happens through `nack`; a crashed process loses its queue
(the Redis implementation is the durable one).
"""

from __future__ import annotations

import asyncio
import collections
import dataclasses
import heapq
import logging
import math
import time
from collections.abc import AsyncIterator, Callable
from typing import Any

from prism.queue.base import (
    DuplicateTask,
    QueueClosed,
    QueueFull,
    TaskEvent,
    TaskState,
    UnknownTask,
    WorkItem,
    WorkQueue,
)

__all__ = ["InMemoryWorkQueue"]

log = logging.getLogger(__name__)

# Heap entry: (-priority, deadline key (inf when none), cost, sequence number, task id).
_Entry = tuple[int, float, int, int, str]


@dataclasses.dataclass(eq=False)
class _Record:
    """Everything the queue knows about one task (identity-compared)."""

    item: WorkItem
    seq: int
    last: TaskEvent
    entry: _Entry | None = None  # set while waiting in the heap
    delivered: bool = False  # handed out by get() and not yet acked/nacked
    watchers: set[asyncio.Queue[TaskEvent]] = dataclasses.field(default_factory=set)
    seen_terminal: bool = False  # some watcher has been handed the terminal event
    ttl_expired: bool = False
    ttl_handle: asyncio.TimerHandle | None = None
    history: collections.deque = dataclasses.field(default_factory=lambda: collections.deque(maxlen=10_000))

    @property
    def state(self) -> TaskState:
        return self.last.state


class InMemoryWorkQueue(WorkQueue):
    """A bounded priority work queue with task states and watchers, backed by a heap.

    Args:
        max_depth: most items waiting to be delivered; `put` raises QueueFull beyond it.
        terminal_ttl_s: how long a finished task's record is kept when no watcher has seen
            its terminal state (so a late `watch`/`state` still finds it).
        max_attempts: deliveries per task; `nack` of the last one fails the task.
        drop_expired: when True, `get` does not deliver items already past their deadline but
            marks them FAILED with ``code="DEADLINE_EXCEEDED"``.
        clock: wall clock in Unix seconds (deadlines and event times); injectable for tests.

    `close()` fails the items still waiting with ``code="UNAVAILABLE"``: they cannot outlive
    the process, and failing them lets their callers retry on another worker at once.
    """

    def __init__(
        self,
        max_depth: int = 1024,
        *,
        terminal_ttl_s: float = 60.0,
        max_attempts: int = 3,
        drop_expired: bool = True,
        clock: Callable[[], float] = time.time,
    ) -> None:
        if max_depth < 1:
            raise ValueError(f"max_depth must be >= 1, got {max_depth}")
        if not terminal_ttl_s > 0:
            raise ValueError(f"terminal_ttl_s must be > 0, got {terminal_ttl_s}")
        if max_attempts < 1:
            raise ValueError(f"max_attempts must be >= 1, got {max_attempts}")
        self._max_depth = max_depth
        self._ttl = terminal_ttl_s
        self._max_attempts = max_attempts
        self._drop_expired = drop_expired
        self._clock = clock
        self._heap: list[_Entry] = []
        self._records: dict[str, _Record] = {}
        self._getters: collections.deque[asyncio.Future[None]] = collections.deque()
        self._dead: collections.deque[tuple[str, str]] = collections.deque(maxlen=1000)
        self._seq = 0
        self._closed = False

    # ------------------------------------------------------------------ introspection

    @property
    def max_depth(self) -> int:
        return self._max_depth

    @property
    def closed(self) -> bool:
        return self._closed

    @property
    def tracked_tasks(self) -> int:
        """Task records held (waiting, delivered, or terminal and not yet forgotten)."""
        return len(self._records)

    @property
    def delivered_count(self) -> int:
        """Deliveries not yet acked or nacked."""
        return sum(1 for r in self._records.values() if r.delivered)

    def watcher_count(self, task_id: str | None = None) -> int:
        """Attached watchers of one task, or of all tasks when `task_id` is None."""
        if task_id is None:
            return sum(len(r.watchers) for r in self._records.values())
        rec = self._records.get(task_id)
        return len(rec.watchers) if rec is not None else 0

    # ------------------------------------------------------------------ WorkQueue

    async def put(self, item: WorkItem) -> None:
        if self._closed:
            raise QueueClosed("the queue is closed")
        old = self._records.get(item.task_id)
        if old is not None:
            if not old.state.terminal or old.delivered:
                raise DuplicateTask(f"task {item.task_id!r} is already in the queue")
            self._forget(old)
        if len(self._heap) >= self._max_depth:
            raise QueueFull(f"queue is full ({self._max_depth} waiting items)")
        self._seq += 1
        rec = _Record(
            item=item,
            seq=self._seq,
            last=TaskEvent(item.task_id, TaskState.QUEUED, {}, self._clock()),
        )
        rec.history.append(rec.last)
        self._records[item.task_id] = rec
        self._push(rec)

    async def get(self, timeout: float | None = None) -> WorkItem | None:
        loop = asyncio.get_running_loop()
        until = None if timeout is None else loop.time() + max(0.0, timeout)
        while True:
            if self._closed:
                return None
            item = self._pop_ready()
            if item is not None:
                return item
            remaining = None if until is None else until - loop.time()
            if remaining is not None and remaining <= 0:
                return None
            waiter: asyncio.Future[None] = loop.create_future()
            self._getters.append(waiter)
            try:
                if remaining is None:
                    await waiter
                else:
                    await asyncio.wait_for(waiter, remaining)
            except asyncio.TimeoutError:  # not the builtin before Python 3.11
                pass  # loop once more: an item may have arrived at the last moment
            except asyncio.CancelledError:
                # We may have been woken for an item we will not take: pass the wake-up on.
                if waiter.done() and not waiter.cancelled():
                    self._wake_one()
                raise
            finally:
                if not waiter.done():
                    waiter.cancel()
                try:
                    self._getters.remove(waiter)
                except ValueError:
                    pass  # already popped by _wake_one

    async def ack(self, task_id: str) -> bool:
        rec = self._records.get(task_id)
        if rec is None or not rec.delivered:
            return False
        rec.delivered = False
        self._maybe_forget(rec)
        return True

    async def nack(self, task_id: str, **detail: Any) -> bool:
        rec = self._records.get(task_id)
        if rec is None or not rec.delivered or rec.state.terminal:
            return False
        rec.delivered = False
        if rec.item.attempt >= self._max_attempts:
            self._dead.append((task_id, f"gave up after {rec.item.attempt} attempts"))
            self._set(
                rec,
                TaskState.FAILED,
                {
                    "code": "ABORTED",
                    "message": f"gave up after {rec.item.attempt} attempts",
                    **detail,
                },
            )
            return True
        rec.item = dataclasses.replace(rec.item, attempt=rec.item.attempt + 1)
        self._set(rec, TaskState.QUEUED, {"attempt": rec.item.attempt, **detail})
        if self._closed:
            self._set(rec, TaskState.FAILED, {"code": "UNAVAILABLE", "message": "queue closed"})
        else:
            self._push(rec)  # keeps its original sequence number: back near the front
        return True

    async def set_state(self, task_id: str, state: TaskState, **detail: Any) -> bool:
        state = TaskState(state)
        if state is TaskState.QUEUED:
            raise ValueError("QUEUED is set by put() and nack() only")
        rec = self._records.get(task_id)
        if rec is None:
            raise UnknownTask(f"unknown task {task_id!r}")
        if rec.state.terminal:
            return False
        if rec.entry is not None:  # a worker reporting on a task it was never handed
            self._remove_from_heap(rec)
        self._set(rec, state, detail)
        return True

    async def state(self, task_id: str) -> TaskState | None:
        rec = self._records.get(task_id)
        return rec.state if rec is not None else None

    async def watch(self, task_id: str, *, replay: bool = False) -> AsyncIterator[TaskEvent]:
        rec = self._records.get(task_id)
        if rec is None:
            raise UnknownTask(f"unknown task {task_id!r}")
        events: asyncio.Queue[TaskEvent] = asyncio.Queue()
        for event in (rec.history if replay else (rec.last,)):
            events.put_nowait(event)
        rec.watchers.add(events)
        try:
            while True:
                event = await events.get()
                if event.state.terminal:
                    rec.seen_terminal = True
                yield event
                if event.state.terminal:
                    return
        finally:
            rec.watchers.discard(events)
            self._maybe_forget(rec)

    async def cancel(self, task_id: str, *, if_queued: bool = False, **detail: Any) -> bool:
        rec = self._records.get(task_id)
        if rec is None or rec.state.terminal or (if_queued and rec.state is not TaskState.QUEUED):
            return False
        if rec.entry is not None:
            self._remove_from_heap(rec)
        self._set(rec, TaskState.CANCELLED, {"code": "CANCELLED", "message": "cancelled", **detail})
        return True

    async def is_cancelled(self, task_id: str) -> bool:
        rec = self._records.get(task_id)
        return rec is not None and rec.state is TaskState.CANCELLED

    async def dead_letter(self, task_id: str, reason: str) -> bool:
        rec = self._records.get(task_id)
        if rec is None:
            return False
        if rec.entry is not None:
            self._remove_from_heap(rec)
        self._dead.append((task_id, reason))
        log.warning("dead-lettered %s: %s", task_id, reason)
        rec.delivered = False
        if not rec.state.terminal:
            self._set(rec, TaskState.FAILED, {"code": "ABORTED", "message": f"dead-lettered: {reason}"})
        else:
            self._maybe_forget(rec)
        return True

    async def dead_letters(self, limit: int = 100) -> list[tuple[str, str]]:
        return list(self._dead)[-limit:] if limit > 0 else []

    async def depth(self) -> int:
        return len(self._heap)

    async def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        waiting = [self._records[entry[-1]] for entry in sorted(self._heap)]
        self._heap.clear()
        for rec in waiting:
            rec.entry = None
            self._set(rec, TaskState.FAILED, {"code": "UNAVAILABLE", "message": "queue closed"})
        while self._getters:
            waiter = self._getters.popleft()
            if not waiter.done():
                waiter.set_result(None)

    # ------------------------------------------------------------------ internals

    def _push(self, rec: _Record) -> None:
        deadline = rec.item.deadline_unix_ms
        rec.entry = (-rec.item.priority, float(deadline) if deadline > 0 else math.inf, rec.item.cost,
                     rec.seq, rec.item.task_id)
        heapq.heappush(self._heap, rec.entry)
        self._wake_one()

    def _remove_from_heap(self, rec: _Record) -> None:
        # O(n), n <= max_depth; cancellation is rare next to put/get.
        self._heap.remove(rec.entry)  # type: ignore[arg-type]
        heapq.heapify(self._heap)
        rec.entry = None

    def _pop_ready(self) -> WorkItem | None:
        """Pops the best deliverable item, failing expired ones on the way."""
        while self._heap:
            entry = heapq.heappop(self._heap)
            rec = self._records[entry[-1]]
            rec.entry = None
            deadline = rec.item.deadline_unix_ms
            if self._drop_expired and deadline > 0 and deadline <= self._clock() * 1000.0:
                self._set(
                    rec,
                    TaskState.FAILED,
                    {"code": "DEADLINE_EXCEEDED", "message": "deadline passed while queued"},
                )
                continue
            rec.delivered = True
            return rec.item
        return None

    def _wake_one(self) -> None:
        while self._getters:
            waiter = self._getters.popleft()
            if not waiter.done():
                waiter.set_result(None)
                return

    def _set(self, rec: _Record, state: TaskState, detail: dict[str, Any]) -> None:
        event = TaskEvent(rec.item.task_id, state, dict(detail), self._clock())
        rec.last = event
        rec.history.append(event)
        for events in rec.watchers:
            events.put_nowait(event)
        if state.terminal:
            loop = asyncio.get_running_loop()
            rec.ttl_handle = loop.call_later(self._ttl, self._on_ttl, rec)
            self._maybe_forget(rec)

    def _on_ttl(self, rec: _Record) -> None:
        rec.ttl_handle = None
        rec.ttl_expired = True
        self._maybe_forget(rec)

    def _maybe_forget(self, rec: _Record) -> None:
        if not rec.state.terminal or rec.delivered:
            return
        if rec.ttl_expired or (rec.seen_terminal and not rec.watchers):
            self._forget(rec)

    def _forget(self, rec: _Record) -> None:
        if rec.ttl_handle is not None:
            rec.ttl_handle.cancel()
            rec.ttl_handle = None
        if self._records.get(rec.item.task_id) is rec:
            del self._records[rec.item.task_id]
