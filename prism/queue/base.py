"""Work-queue contract: task states, work items, task events and the `WorkQueue` interface.

This module is pure Python (no gRPC, no protobuf, no Redis) so that engines, workers and tests
can depend on it freely. The in-memory implementation lives in `prism.queue.memory`; a Redis
Streams implementation will implement the same interface later.

Delivery model (what every implementation guarantees)
------------------------------------------------------
* **At-least-once delivery.** `get()` hands an item to one consumer and records it as
  *delivered* (pending). The consumer calls `ack(task_id)` once it no longer needs the queue to
  keep the delivery (normally after it has set a terminal state, or READY for outputs held for
  pickup). An implementation that outlives its consumers (Redis) redelivers unacknowledged
  items to another consumer, with `attempt` incremented; `nack()` asks for that explicitly.
  Consumers must therefore tolerate seeing a task twice.
* **Explicit task states.** A task's lifecycle is tracked separately from its delivery:
  QUEUED on `put`, then whatever the worker reports with `set_state` (TRANSFERRING, RUNNING,
  READY, ...) until a terminal state (DONE, FAILED, CANCELLED). Terminal states are final:
  `set_state` on a finished task is a no-op that returns False, which is how a worker loses a
  race against `cancel` gracefully.
* **Ordering.** Higher `priority` first; within a priority, earliest deadline first (items
  without a deadline after every item with one); then the smaller `cost` (short requests
  first); then first in, first out.
* **Dead letters.** A message that cannot be processed (undecodable, or naming a request
  that no longer exists) is dead-lettered with a reason: FAILED, acked, never retried, and
  listed by `dead_letters()`. Redelivery past the maximum attempts dead-letters too.
* **Events.** `watch(task_id)` yields the current state first, then every change, and ends
  after the terminal event. Any number of watchers may follow one task.
* **Bounded memory.** Terminal task records are forgotten once every watcher has seen the
  terminal state, or after a TTL when nobody watched, and never while a delivery is unacked.

Detail conventions for `set_state(..., **detail)` and `TaskEvent.detail`:
``code`` (a gRPC status code name such as ``"DEADLINE_EXCEEDED"``) and ``message`` on FAILED
and CANCELLED; anything else is stage-specific (``first_token``, ``compute_ms``...). Keep the
values JSON-serialisable so that a Redis implementation can carry them.
"""

from __future__ import annotations

import abc
import enum
import time
from collections.abc import AsyncIterator, Mapping
from dataclasses import dataclass, field
from typing import Any

__all__ = [
    "SHARED",
    "TERMINAL_STATES",
    "DuplicateTask",
    "QueueClosed",
    "QueueError",
    "QueueFull",
    "TaskEvent",
    "TaskState",
    "UnknownTask",
    "WorkItem",
    "WorkQueue",
]


SHARED = "shared"
"""The instance name of a stage's shared queue (``q:{stage}:shared`` in Redis), read by every
worker of the stage as a consumer of its own; never a worker's name."""


class TaskState(enum.IntEnum):
    """Lifecycle of a task in a stage queue.

    The values equal the numbers of the proto enum `prism.v1.TaskState`, so
    ``stages_pb2.TaskState.Value(...) == TaskState.X`` and ``int(state)`` can be put straight
    into a response message.
    """

    QUEUED = 1
    """Waiting in the stage queue (also after a redelivery)."""
    TRANSFERRING = 2
    """Taken by a worker, pulling its inputs from the upstream stage."""
    RUNNING = 3
    """Computing."""
    READY = 4
    """The output is ready for the downstream stage to pull."""
    DONE = 5
    """Finished; the output was consumed."""
    FAILED = 6
    """Failed; the event detail says why (``code``, ``message``)."""
    CANCELLED = 7
    """Cancelled by the caller."""

    @property
    def terminal(self) -> bool:
        """True for DONE, FAILED and CANCELLED: no further change can happen."""
        return self in TERMINAL_STATES


TERMINAL_STATES: frozenset[TaskState] = frozenset(
    {TaskState.DONE, TaskState.FAILED, TaskState.CANCELLED}
)


class QueueError(Exception):
    """Base class of the queue's errors."""


class QueueFull(QueueError):
    """`put` was refused: the queue holds its maximum number of waiting items."""


class DuplicateTask(QueueError):
    """`put` was refused: a live task (not terminal, or still delivered) has this id."""


class QueueClosed(QueueError):
    """`put` was refused: the queue is closed."""


class UnknownTask(QueueError, KeyError):
    """The task id is not known (never put, or already forgotten)."""

    def __str__(self) -> str:  # KeyError quotes its argument; keep a plain message.
        return str(self.args[0]) if self.args else "unknown task"


@dataclass(frozen=True)
class WorkItem:
    """One unit of work for a stage worker.

    Items are immutable; implementations return a copy with a new `attempt` on redelivery.
    """

    task_id: str
    """The request id (`TaskHeader.request_id`); unique among live tasks of a queue."""
    payload: bytes
    """The serialized task proto (e.g. an `EncodeRequest`); opaque to the queue."""
    priority: int = 0
    """Priority class: higher is served first."""
    deadline_unix_ms: int = 0
    """Absolute deadline in Unix epoch milliseconds; 0 means none. Within a priority class,
    earlier deadlines are served first; implementations may fail items that are already past
    their deadline instead of delivering them."""
    enqueued_at: float = field(default_factory=time.time)
    """When the item was created, Unix epoch seconds (for queue-wait metrics)."""
    trace_context: Mapping[str, str] = field(default_factory=dict)
    """W3C trace context (``traceparent``, ``tracestate``) to continue the caller's trace."""
    attempt: int = 1
    """Delivery attempt, 1 on the first delivery, incremented on each redelivery."""
    cost: int = 0
    """Work size in tokens (image tokens for the encoder, prompt tokens for prefill, tokens to
    generate for decode). Within a priority class and deadline, cheaper items go first (short
    requests favoured, as in ModServe); routing and autoscaling add it up as pending load."""
    attrs: Mapping[str, str] = field(default_factory=dict)
    """Small routing facts readable without parsing the payload: ``upstream`` (the worker
    holding this task's input), ``strategy`` (the modality strategy), ``placement``
    (``split`` or ``colocated``)."""

    def __post_init__(self) -> None:
        if not isinstance(self.task_id, str) or not self.task_id:
            raise ValueError("task_id must be a non-empty string")
        if not isinstance(self.payload, (bytes, bytearray, memoryview)):
            raise TypeError(f"payload must be bytes, not {type(self.payload).__name__}")
        if isinstance(self.payload, (bytearray, memoryview)):
            object.__setattr__(self, "payload", bytes(self.payload))
        if self.deadline_unix_ms < 0:
            raise ValueError("deadline_unix_ms must be >= 0 (0 means none)")
        if self.attempt < 1:
            raise ValueError("attempt must be >= 1")
        if self.cost < 0:
            raise ValueError("cost must be >= 0")
        object.__setattr__(self, "trace_context", dict(self.trace_context))
        object.__setattr__(self, "attrs", {str(k): str(v) for k, v in self.attrs.items()})


@dataclass(frozen=True)
class TaskEvent:
    """A task's state at one moment, as reported by `WorkQueue.watch`."""

    task_id: str
    state: TaskState
    detail: Mapping[str, Any] = field(default_factory=dict)
    """What came with the change: ``code``/``message`` on failure, stage-specific data
    (``first_token``, ``compute_ms``...) otherwise."""
    at: float = field(default_factory=time.time)
    """When the change happened, Unix epoch seconds."""


class WorkQueue(abc.ABC):
    """A stage's work queue. All methods are coroutines (a Redis implementation does I/O)."""

    @abc.abstractmethod
    async def put(self, item: WorkItem) -> None:
        """Enqueues `item` and records its task as QUEUED.

        Raises:
            QueueFull: the queue already holds its maximum number of waiting items.
            DuplicateTask: a live task (not terminal, or delivered and not acked) has this id.
                A finished task's id may be reused.
            QueueClosed: the queue was closed.
        """

    @abc.abstractmethod
    async def get(self, timeout: float | None = None) -> WorkItem | None:
        """Takes the next item (see the module docstring for the order) and records it as
        delivered. Waits up to `timeout` seconds (None: forever) for one.

        Returns None on timeout or once the queue is closed.
        """

    @abc.abstractmethod
    async def ack(self, task_id: str) -> bool:
        """Acknowledges the delivery of `task_id`: it will not be redelivered.

        Returns False (and does nothing) when the task has no unacknowledged delivery.
        """

    @abc.abstractmethod
    async def nack(self, task_id: str, **detail: Any) -> bool:
        """Gives a delivered task back for redelivery (attempt + 1, state QUEUED) — e.g. a
        worker that must stop before it could start the task. Past the implementation's
        maximum number of attempts the task is marked FAILED instead.

        Returns False when the task has no unacknowledged delivery or is already terminal.
        """

    @abc.abstractmethod
    async def set_state(self, task_id: str, state: TaskState, **detail: Any) -> bool:
        """Records a new state (and detail) for a task and notifies its watchers. Setting the
        same state again with new detail is allowed (a progress event).

        Returns False, changing nothing, when the task is already terminal. A task still
        waiting in the queue is taken out of it (it was handled elsewhere).

        Raises:
            UnknownTask: the task is not known.
            ValueError: `state` is QUEUED (only `put`/`nack` queue a task).
        """

    @abc.abstractmethod
    async def state(self, task_id: str) -> TaskState | None:
        """The task's current state, or None when it is unknown or forgotten."""

    @abc.abstractmethod
    def watch(self, task_id: str, *, replay: bool = False) -> AsyncIterator[TaskEvent]:
        """Follows a task: yields its current state first, then each change, and stops after
        the terminal event. With `replay`, yields every event the task has had from its start
        instead of only the current one (a consumer of progress events, e.g. decode tokens,
        that attaches after the work began misses none; up to 10,000 events are kept). Closing the iterator early (``aclose()``, cancellation, or garbage
        collection after ``break``) detaches the watcher.

        The iterator raises UnknownTask on its first step when the task is unknown.
        """

    @abc.abstractmethod
    async def cancel(self, task_id: str, *, if_queued: bool = False, **detail: Any) -> bool:
        """Cancels a task. A queued task is removed from the queue and marked CANCELLED; a
        delivered one is marked CANCELLED and its worker sees `is_cancelled(task_id)`, stops,
        and acks it. With `if_queued`, atomically only while the task is still QUEUED (no worker
        has started it: the scheduler reassigning work not begun).

        Returns False when the task is unknown or already terminal (or, with `if_queued`,
        started).
        """

    @abc.abstractmethod
    async def is_cancelled(self, task_id: str) -> bool:
        """True when the task was cancelled (workers poll this between steps)."""

    @abc.abstractmethod
    async def dead_letter(self, task_id: str, reason: str) -> bool:
        """Gives up on a delivered or waiting task for good: marks it FAILED (``code`` from the
        reason's kind, default ``"ABORTED"``; ``message`` = reason) unless already terminal,
        acks it, and records ``(task_id, reason)`` in the dead-letter list.

        Returns False when the task is unknown.
        """

    @abc.abstractmethod
    async def dead_letters(self, limit: int = 100) -> list[tuple[str, str]]:
        """The most recent dead letters, newest last: ``(task_id, reason)``."""

    @abc.abstractmethod
    async def depth(self) -> int:
        """Number of items waiting to be delivered (not counting delivered ones)."""

    @abc.abstractmethod
    async def close(self) -> None:
        """Stops the queue: waiting and future `get` calls return None and `put` raises
        QueueClosed. Delivered tasks can still be acked and have their states set, so a
        draining worker can finish its in-flight work. Idempotent."""
