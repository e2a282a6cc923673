"""Stage work queues: task states, work items and the `WorkQueue` interface (`base`), and the
in-memory implementation (`memory`). No gRPC, no protobuf."""

from prism.queue.base import (
    TERMINAL_STATES,
    DuplicateTask,
    QueueClosed,
    QueueError,
    QueueFull,
    TaskEvent,
    TaskState,
    UnknownTask,
    WorkItem,
    WorkQueue,
)
from prism.queue.memory import InMemoryWorkQueue

__all__ = [
    "TERMINAL_STATES",
    "DuplicateTask",
    "InMemoryWorkQueue",
    "QueueClosed",
    "QueueError",
    "QueueFull",
    "TaskEvent",
    "TaskState",
    "UnknownTask",
    "WorkItem",
    "WorkQueue",
]
