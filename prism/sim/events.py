"""The simulator's clock: a heap of timed callbacks, run in time order.

Events at the same time run in the order they were scheduled (a sequence number breaks ties),
so a run is a pure function of its inputs: no wall clock, no randomness here. A scheduled
event can be cancelled through the handle `at`/`after` return (it stays in the heap and is
skipped when popped).
"""
from __future__ import annotations

import heapq
import math
from collections.abc import Callable

__all__ = ["Clock", "Handle"]


class Handle:
    """A scheduled event; `cancel()` keeps it from running."""

    __slots__ = ("time", "cancelled")

    def __init__(self, time: float) -> None:
        self.time = time
        self.cancelled = False

    def cancel(self) -> None:
        self.cancelled = True


class Clock:
    """Simulated time in seconds and the events still to run."""

    def __init__(self, start: float = 0.0) -> None:
        self.now = float(start)
        self._heap: list[tuple[float, int, Handle, Callable[[], None]]] = []
        self._seq = 0
        self.events_run = 0

    def at(self, time: float, fn: Callable[[], None]) -> Handle:
        """Runs `fn()` at `time` (never before now: a time in the past means now)."""
        if math.isnan(time):
            raise ValueError("event time is NaN")
        t = max(float(time), self.now)
        handle = Handle(t)
        self._seq += 1
        heapq.heappush(self._heap, (t, self._seq, handle, fn))
        return handle

    def after(self, delay_s: float, fn: Callable[[], None]) -> Handle:
        """Runs `fn()` `delay_s` seconds from now."""
        if delay_s < 0:
            raise ValueError(f"delay must be >= 0, got {delay_s}")
        return self.at(self.now + delay_s, fn)

    def __len__(self) -> int:
        return len(self._heap)

    def run(self, until: float = math.inf) -> float:
        """Runs events in time order until none is left or the next is after `until`;
        returns the time reached (now)."""
        heap = self._heap
        while heap and heap[0][0] <= until:
            t, _, handle, fn = heapq.heappop(heap)
            if handle.cancelled:
                continue
            self.now = t
            self.events_run += 1
            fn()
        if until != math.inf and until > self.now and not heap:
            self.now = until
        return self.now
