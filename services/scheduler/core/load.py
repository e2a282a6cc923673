"""The scheduler's own account of work: pending tokens, decode slots, rates and SLO attainment.

Everything here is plain Python with O(1) (amortised) updates, so that a routing decision never
walks the queued requests:

* `LoadBook` -- pending tokens per (stage, instance) and per stage, decode slot occupancy per
  instance, the tasks each instance holds (to reclaim a dead worker's work) and the number of
  requests in flight.
* `RateTracker` -- arrival and completion rates per stage in tokens per second over a sliding
  window (the autoscaler's load signal).
* `SloTracker` -- the fraction of finished requests that met their TTFT and TPOT targets over
  a sliding window (the autoscaler's SLO signal).

Both trackers take an injectable ``clock`` and accept an explicit ``now`` on every call, so
tests and simulations are deterministic.
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Callable, Iterator
from dataclasses import dataclass

__all__ = ["STAGES", "LoadBook", "RateTracker", "SloOutcome", "SloTracker"]

STAGES = ("encode", "prefill", "decode")
"""The stages, in pipeline order."""

Clock = Callable[[], float]


class LoadBook:
    """Pending work per (stage, instance), as the scheduler assigned it.

    A *task* is one (request_id, stage) pair. A task normally lives on one instance; the
    encode task of a request whose media items were split over several encoders has one *part*
    per encoder (``add`` the same task again with another instance). Every method is O(1) in
    the number of queued requests (O(parts) of the one task touched, normally 1 or 2).

    Decode parts occupy one decode slot each on their instance from ``add`` until ``finish``
    (or ``move``); ``slots_used`` may exceed an instance's slot count when requests wait for a
    slot, which is exactly what routing needs to see.
    """

    __slots__ = ("_tasks", "_pending", "_stage", "_on", "_slots", "_requests")

    def __init__(self) -> None:
        self._tasks: dict[tuple[str, str], dict[str, int]] = {}  # task -> {instance: cost}
        self._pending: dict[tuple[str, str], int] = {}  # (stage, instance) -> tokens
        self._stage: dict[str, int] = {}  # stage -> tokens
        self._on: dict[str, dict[tuple[str, str], None]] = {}  # instance -> ordered task set
        self._slots: dict[str, int] = {}  # instance -> decode parts held
        self._requests: dict[str, int] = {}  # request id -> live parts

    # -- updates -------------------------------------------------------------------------

    def add(self, request_id: str, stage: str, instance: str, cost: int) -> None:
        """Records `cost` pending tokens of `request_id`'s `stage` task on `instance`.

        Adding the same (request, stage, instance) again replaces its cost (idempotent under
        redelivery); adding it with another instance adds a part (split encode).
        """
        if cost < 0:
            raise ValueError(f"cost must be >= 0, got {cost}")
        key = (request_id, stage)
        parts = self._tasks.get(key)
        if parts is None:
            parts = self._tasks[key] = {}
        old = parts.get(instance)
        if old is None:
            self._on.setdefault(instance, {})[key] = None
            self._requests[request_id] = self._requests.get(request_id, 0) + 1
            if stage == "decode":
                self._slots[instance] = self._slots.get(instance, 0) + 1
            old = 0
        parts[instance] = cost
        self._bump(stage, instance, cost - old)

    def finish(self, request_id: str, stage: str, instance: str | None = None) -> int:
        """Removes the task (or only its part on `instance`); returns the tokens removed.

        Idempotent: finishing an unknown or already finished task does nothing and returns 0.
        """
        key = (request_id, stage)
        parts = self._tasks.get(key)
        if not parts:
            return 0
        names = [instance] if instance is not None else list(parts)
        removed = 0
        for name in names:
            cost = parts.pop(name, None)
            if cost is None:
                continue
            removed += cost
            self._bump(stage, name, -cost)
            self._drop_index(key, name)
        if not parts:
            del self._tasks[key]
        return removed

    def finish_request(self, request_id: str) -> int:
        """Finishes every stage of `request_id` (cancel, failure); returns the tokens removed."""
        return sum(self.finish(request_id, stage) for stage in STAGES)

    def set_remaining(self, request_id: str, stage: str, tokens: int, instance: str | None = None) -> None:
        """Sets what is left of a running task (e.g. decode progress); unknown tasks are ignored.

        With a split task and no `instance`, every part is set to `tokens`.
        """
        if tokens < 0:
            raise ValueError(f"tokens must be >= 0, got {tokens}")
        parts = self._tasks.get((request_id, stage))
        if not parts:
            return
        for name in [instance] if instance is not None else list(parts):
            old = parts.get(name)
            if old is not None:
                parts[name] = tokens
                self._bump(stage, name, tokens - old)

    def move(
        self, request_id: str, stage: str, new_instance: str, *, from_instance: str | None = None
    ) -> bool:
        """Moves the task (or only its part on `from_instance`) to `new_instance`.

        Parts that land on an instance already holding a part are merged (costs added).
        Returns True when something moved (False: unknown task, or already there).
        """
        key = (request_id, stage)
        parts = self._tasks.get(key)
        if not parts:
            return False
        names = [from_instance] if from_instance is not None else list(parts)
        names = [name for name in names if name in parts and name != new_instance]
        if not names:
            return False
        moved = 0
        for name in names:
            cost = parts.pop(name)
            moved += cost
            self._bump(stage, name, -cost)
            self._drop_index(key, name)
        self.add(request_id, stage, new_instance, parts.get(new_instance, 0) + moved)
        return True

    # -- queries -------------------------------------------------------------------------

    def pending(self, stage: str, instance: str) -> int:
        """Pending tokens of `stage` on `instance`."""
        return self._pending.get((stage, instance), 0)

    def stage_pending(self, stage: str) -> int:
        """Pending tokens of `stage` over all instances."""
        return self._stage.get(stage, 0)

    def slots_used(self, instance: str) -> int:
        """Decode tasks assigned to `instance` (running or waiting for a slot)."""
        return self._slots.get(instance, 0)

    def free_slots(self, instance: str, decode_slots: int) -> int:
        """Free decode slots on an instance with `decode_slots` slots (never negative)."""
        return max(0, decode_slots - self._slots.get(instance, 0))

    def requests_on(self, instance: str) -> list[tuple[str, str]]:
        """The (request_id, stage) tasks with work on `instance`, oldest first."""
        return list(self._on.get(instance, ()))

    def parts(self, request_id: str, stage: str) -> dict[str, int]:
        """{instance: pending tokens} of one task (a copy; empty when unknown)."""
        return dict(self._tasks.get((request_id, stage), {}))

    @property
    def inflight(self) -> int:
        """Requests with at least one unfinished task."""
        return len(self._requests)

    def __contains__(self, task: object) -> bool:
        return task in self._tasks

    def __len__(self) -> int:
        """Number of unfinished tasks."""
        return len(self._tasks)

    def __iter__(self) -> Iterator[tuple[str, str]]:
        return iter(list(self._tasks))

    # -- internals -----------------------------------------------------------------------

    def _bump(self, stage: str, instance: str, delta: int) -> None:
        if delta:
            key = (stage, instance)
            self._pending[key] = self._pending.get(key, 0) + delta
            self._stage[stage] = self._stage.get(stage, 0) + delta

    def _drop_index(self, key: tuple[str, str], instance: str) -> None:
        on = self._on.get(instance)
        if on is not None:
            on.pop(key, None)
            if not on:
                del self._on[instance]
        if key[1] == "decode":
            left = self._slots.get(instance, 0) - 1
            if left > 0:
                self._slots[instance] = left
            else:
                self._slots.pop(instance, None)
        request_id = key[0]
        left = self._requests.get(request_id, 0) - 1
        if left > 0:
            self._requests[request_id] = left
        else:
            self._requests.pop(request_id, None)


class _Window:
    """Sum of (time, value) samples over the last `window_s` seconds (amortised O(1))."""

    __slots__ = ("window_s", "samples", "total")

    def __init__(self, window_s: float) -> None:
        self.window_s = window_s
        self.samples: deque[tuple[float, float]] = deque()
        self.total = 0.0

    def add(self, now: float, value: float) -> None:
        self.samples.append((now, value))
        self.total += value
        self.evict(now)

    def evict(self, now: float) -> None:
        horizon = now - self.window_s
        samples = self.samples
        while samples and samples[0][0] <= horizon:
            self.total -= samples.popleft()[1]
        if not samples:
            self.total = 0.0  # no float drift on an empty window


class RateTracker:
    """Arrival and completion rates per stage, in tokens per second over a sliding window.

    The rate is the tokens recorded in the last `window_s` seconds divided by `window_s`
    (a steady stream reads its true rate once the tracker has run for one window; earlier it
    reads low, which errs towards not scaling on start-up noise).
    """

    def __init__(self, window_s: float = 30.0, clock: Clock = time.monotonic) -> None:
        if window_s <= 0:
            raise ValueError("window_s must be > 0")
        self.window_s = window_s
        self._clock = clock
        self._arrived: dict[str, _Window] = {}
        self._completed: dict[str, _Window] = {}

    def arrived(self, stage: str, tokens: float, now: float | None = None) -> None:
        """Records `tokens` of work arriving at `stage`."""
        self._win(self._arrived, stage).add(self._now(now), tokens)

    def completed(self, stage: str, tokens: float, now: float | None = None) -> None:
        """Records `tokens` of work completed by `stage`."""
        self._win(self._completed, stage).add(self._now(now), tokens)

    def arrival_rate(self, stage: str, now: float | None = None) -> float:
        """Tokens per second that arrived at `stage` over the window."""
        return self._rate(self._arrived, stage, now)

    def completion_rate(self, stage: str, now: float | None = None) -> float:
        """Tokens per second that `stage` completed over the window."""
        return self._rate(self._completed, stage, now)

    def arrival_rates(self, now: float | None = None) -> dict[str, float]:
        """{stage: arrival tokens/s} for every stage seen (the autoscaler's load input)."""
        now = self._now(now)
        return {stage: self._rate(self._arrived, stage, now) for stage in self._arrived}

    def _now(self, now: float | None) -> float:
        return self._clock() if now is None else now

    def _win(self, table: dict[str, _Window], stage: str) -> _Window:
        win = table.get(stage)
        if win is None:
            win = table[stage] = _Window(self.window_s)
        return win

    def _rate(self, table: dict[str, _Window], stage: str, now: float | None) -> float:
        win = table.get(stage)
        if win is None:
            return 0.0
        win.evict(self._now(now))
        return max(0.0, win.total) / self.window_s


@dataclass(frozen=True)
class SloOutcome:
    """Whether one finished request met its targets (True when it had no target)."""

    ttft_ok: bool
    tpot_ok: bool

    @property
    def ok(self) -> bool:
        """Both targets met."""
        return self.ttft_ok and self.tpot_ok


class SloTracker:
    """Fraction of finished requests that met their TTFT and TPOT targets, over a window.

    A request without a target counts as meeting it. With no finished request in the window
    every attainment reads 1.0 (nothing missed).
    """

    def __init__(self, window_s: float = 60.0, clock: Clock = time.monotonic) -> None:
        if window_s <= 0:
            raise ValueError("window_s must be > 0")
        self.window_s = window_s
        self._clock = clock
        self._all = _Window(window_s)  # value 1 per request
        self._ttft = _Window(window_s)  # value 1 per request meeting TTFT
        self._tpot = _Window(window_s)
        self._both = _Window(window_s)

    def record(
        self,
        ttft_s: float,
        tpot_s: float | None,
        ttft_target_s: float | None = None,
        tpot_target_s: float | None = None,
        now: float | None = None,
    ) -> SloOutcome:
        """Records one finished request and returns whether it met its targets."""
        t = self._clock() if now is None else now
        ttft_ok = ttft_target_s is None or ttft_s <= ttft_target_s
        tpot_ok = tpot_target_s is None or tpot_s is None or tpot_s <= tpot_target_s
        self._all.add(t, 1.0)
        self._ttft.add(t, 1.0 if ttft_ok else 0.0)
        self._tpot.add(t, 1.0 if tpot_ok else 0.0)
        self._both.add(t, 1.0 if ttft_ok and tpot_ok else 0.0)
        return SloOutcome(ttft_ok, tpot_ok)

    def attainment(self, now: float | None = None) -> float:
        """Fraction of requests in the window that met both targets."""
        return self._fraction(self._both, now)

    def ttft_attainment(self, now: float | None = None) -> float:
        """Fraction of requests in the window that met their TTFT target."""
        return self._fraction(self._ttft, now)

    def tpot_attainment(self, now: float | None = None) -> float:
        """Fraction of requests in the window that met their TPOT target."""
        return self._fraction(self._tpot, now)

    def stage_attainment(self, now: float | None = None) -> dict[str, float]:
        """Attainment attributed to stages: TTFT misses to encode and prefill, TPOT to decode.

        This is the per-stage input `Autoscaler.desired` takes.
        """
        ttft = self.ttft_attainment(now)
        return {"encode": ttft, "prefill": ttft, "decode": self.tpot_attainment(now)}

    def count(self, now: float | None = None) -> int:
        """Finished requests in the window."""
        self._all.evict(self._clock() if now is None else now)
        return len(self._all.samples)

    def _fraction(self, win: _Window, now: float | None) -> float:
        t = self._clock() if now is None else now
        self._all.evict(t)
        win.evict(t)
        n = len(self._all.samples)
        return 1.0 if n == 0 else min(1.0, max(0.0, win.total / n))
