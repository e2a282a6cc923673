"""Helpers shared by the queue tests."""
from __future__ import annotations

from prism.queue import WorkItem


def item(task_id: str, priority: int = 0, deadline: int = 0, **kw) -> WorkItem:
    return WorkItem(task_id=task_id, payload=task_id.encode(), priority=priority,
                    deadline_unix_ms=deadline, **kw)


class FakeClock:
    """A settable wall clock (Unix seconds)."""

    def __init__(self, now: float = 1_000_000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now
