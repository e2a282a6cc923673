"""The selection's view of the requests being served, built from plain request state.

The live selector (`services/scheduler/selector.py`, from its `Progress` and `Admitted`) and the
simulator (`prism/sim/selection.py`, from its simulated requests) describe each request being
served as a `Served` and use these functions for everything the program (`core.selection`) is
given, so both make the same decisions on the same state:

* `offered` -- a request's strategies: the profile's (``Profile.strategies_for``) at or above the
  caller's floor, the full request always (with accuracy 1.0 when the profile has none for it);
* `job_of` -- a request as a job: every strategy while its inputs may still change, else one
  fixed strategy of the work it still has (`remaining`);
* `new_job` -- an arrival as a job (before any work);
* `serving_order` -- requests a worker has begun first (stages do not preempt), in arrival
  order, then priority, earliest deadline, arrival (stage queues, `Flow`: each stage its running
  request first, `Served.running`, then priority, earliest deadline, arrival);
* `tick_changes` -- the periodic check: a job late even on its cheapest strategy is put on it
  (and constrains no one), the others are reassigned when a deadline is at risk;
* `LoadPrice` -- what a second of work costs in accuracy now: nothing while the arrivals' work
  fits the stages, `scale` x (offered load - 1) beyond (the program's `price`);
* `Slowdown` -- how much later than the program predicted requests finish (its model's error,
  from the requests served), by which the measured capacities are divided.

Pure: no gRPC, Redis or torch.
"""
from __future__ import annotations

import dataclasses
import math
from collections import deque
from collections.abc import Collection, Iterable, Mapping, Sequence
from dataclasses import dataclass

import numpy as np

from services.scheduler.core.selection import FULL, Capacity, Flow, Job, Strategy, diagnose, reassign

__all__ = ["LoadPrice", "Served", "Slowdown", "arrival_price", "job_of", "new_job", "offered", "remaining", "serving_order",
           "tick_changes"]


@dataclass(frozen=True)
class Served:
    """A request being served, as the selection sees it."""

    request_id: str
    deadline: float | None
    """Absolute, on the clock of `now` (None: none)."""
    priority: int
    floor: float
    """The caller's accuracy floor."""
    max_new_tokens: int
    media_tokens: int
    """Encoder tokens of the inputs served now."""
    prompt_tokens: int
    """Prefill tokens of the inputs served now."""
    current: str = FULL
    """The strategy served now."""
    options: Mapping[str, Strategy] | None = None
    """Its strategies by id (`offered`) when its inputs may be reduced; None: served as sent."""
    reassignable: bool = False
    """Its inputs may still change (no worker began encoding them, no reassignment pending)."""
    begun: bool = False
    """A worker began on it (encoding started, encoded, or a token made)."""
    encoded: bool = False
    prefilled: bool = False
    generated: int = 0
    """Tokens made so far."""
    encoding: bool = False
    """A worker is encoding its inputs now (started, not done)."""
    prefilling: bool = False
    """A worker is running its prompt pass now (started, no first token yet)."""

    @property
    def running(self) -> frozenset[str]:
        """The stages a worker is on for it now (`Job.running`)."""
        return frozenset(stage for stage, on in (
            ("encode", self.encoding and not self.encoded), ("prefill", self.prefilling and not self.prefilled),
            ("decode", self.prefilled and self.generated < self.max_new_tokens)) if on)


def offered(strategies: Iterable[Strategy], floor: float, *, media_tokens: int, prompt_tokens: int,
            decode_tokens: int) -> dict[str, Strategy]:
    """The strategies a request may be served with: `strategies` (the profile's, in order) at or
    above `floor`, and the full request always (accuracy 1.0, the reference, when the profile
    has none for it; its tokens are the full request's)."""
    by_id = {s.id: s for s in strategies}
    if FULL not in by_id:
        by_id[FULL] = Strategy(FULL, 1.0, encode_tokens=media_tokens, prefill_tokens=prompt_tokens,
                               decode_tokens=decode_tokens)
    return {sid: s for sid, s in by_id.items() if sid == FULL or s.accuracy >= floor}


def remaining(s: Served) -> Strategy:
    """The work `s` still has, as one fixed strategy."""
    return Strategy(FULL, 0.0, encode_tokens=0 if s.encoded else s.media_tokens,
                    prefill_tokens=0 if s.prefilled else s.prompt_tokens,
                    decode_tokens=max(0, s.max_new_tokens - s.generated))


def job_of(s: Served, seq: int) -> Job:
    """`s` as a job of the program (`seq`: its place in acceptance order)."""
    if s.reassignable and s.options and s.current in s.options:
        return Job(s.request_id, tuple(s.options.values()), s.deadline, s.floor, True, s.current, s.priority, seq,
                   s.running)
    return Job(s.request_id, (remaining(s),), s.deadline, 0.0, False, FULL, s.priority, seq, s.running)


def new_job(request_id: str, options: Mapping[str, Strategy] | None, deadline: float | None, floor: float,
            priority: int, seq: int, *, media_tokens: int, prompt_tokens: int, max_new_tokens: int) -> Job:
    """An arrival as a job: its strategies (`offered`), or with None its full request only."""
    if options is None:
        full = Strategy(FULL, 0.0, encode_tokens=media_tokens, prefill_tokens=prompt_tokens,
                        decode_tokens=max_new_tokens)
        return Job(request_id, (full,), deadline, 0.0, True, FULL, priority, seq)
    return Job(request_id, tuple(options.values()), deadline, floor, True, FULL, priority, seq)


def serving_order(jobs: Sequence[Job], begun: Collection[str], flow: Flow | None = None) -> list[str]:
    """The order the program assumes (module docstring); `begun`: the request ids a worker has
    begun on. Under a `flow` of stage queues (not strict) each stage serves what it is running
    first (`Job.running`), then the queue's order: priority, earliest deadline, arrival."""
    queues = flow is not None and not flow.strict

    def key(job: Job):
        if job.request_id in begun and not queues:
            return (0, 0, 0.0, job.seq)
        return (1, -job.priority, job.deadline if job.deadline is not None else math.inf, job.seq)

    return [j.request_id for j in sorted(jobs, key=key)]


def tick_changes(jobs: Sequence[Job], now: float, capacity: Capacity, *, order: Sequence[str],
                 flow: Flow | None = None, time_limit_s: float | None = None, price: float = 0.0) -> dict[str, str]:
    """{request id: new strategy id} for the reassignable jobs when a deadline is at risk at
    `capacity` (the program's fast path keeps the current assignment when every deadline is met)."""
    late = {m.request_id for m in diagnose(jobs, now, capacity, order=order, flow=flow)}
    fixed, changes = [], {}
    for job in jobs:
        if job.request_id in late:
            cheapest = min(job.allowed, key=lambda s: (s.seconds(capacity), -s.accuracy)).id
            if cheapest != job.current:
                changes[job.request_id] = cheapest
            job = dataclasses.replace(job, deadline=None, reassignable=False, current=cheapest)
        fixed.append(job)
    result = reassign(fixed, now, capacity, order=order, time_limit_s=time_limit_s, flow=flow, price=price)
    if result.feasible and not result.fast_path:
        changes.update({rid: result.choice[rid] for rid in result.changed})
    return changes


def arrival_price(load_price: "LoadPrice | None", now: float, job: Job, capacity: Capacity) -> float:
    """`job` (an arrival) counted in the offered load; the price of work now (0 without pricing)."""
    if load_price is None:
        return 0.0
    full = next(s for s in job.strategies if s.id == FULL)
    load_price.arrived(now, full.stage_seconds(capacity))
    return load_price.price(now)


class LoadPrice:
    """The price of a second of work, in accuracy, from the offered load (MOSEL's point: under
    overload serving everyone's every input serves fewer people in time).

    Every arrival, admitted or not, adds its FULL request's work per stage (seconds at the
    capacities of the moment, `Strategy.stage_seconds`). The offered load of a stage is the rate
    at which that work arrives: over the arrivals of the last `window_s` seconds, the work of all
    but the first over the time since the first (at least `min_span_s`), the load the largest of
    them. Measured over the span the arrivals actually cover, not the nominal window, a burst is
    seen from its second arrival: averaged over a 10 s window, the first seconds of a burst look
    like no overload at all, and its first requests are served whole and hold the stages while
    the rest of it arrives. One arrival alone says nothing about a rate (load 0).

    The price is ``scale * max(0, load - 1)``: zero while the stages keep up (the program then
    reduces only to meet deadlines), and beyond, each queued or arriving request is served on the
    strategy whose accuracy less price x work is largest, never below its floor. With scale 1 a
    request at twice the load sheds an input when it costs less than one point of accuracy
    (0.01) per 10 ms. Pure and clocked by the caller; scale 0 turns it off."""

    def __init__(self, scale: float = 1.0, window_s: float = 10.0, min_span_s: float = 1.0) -> None:
        if not scale >= 0 or not window_s > 0 or not min_span_s > 0:
            raise ValueError(f"LoadPrice: scale must be >= 0, window_s and min_span_s > 0, got {scale}, "
                             f"{window_s}, {min_span_s}")
        self.scale, self.window_s = float(scale), float(window_s)
        self.min_span_s = min(float(min_span_s), self.window_s)
        self._arrivals: deque[tuple[float, Mapping[str, float]]] = deque()
        self._sums: dict[str, float] = {}  # per stage, the work of `_arrivals` (kept as they come and go)

    def arrived(self, now: float, work_s: Mapping[str, float]) -> None:
        """An arrival at `now` with `work_s` seconds of work per stage (its full request)."""
        if self.scale:
            work = dict(work_s)
            self._arrivals.append((now, work))
            for stage, sec in work.items():
                self._sums[stage] = self._sums.get(stage, 0.0) + sec
            self._trim(now)

    def _trim(self, now: float) -> None:
        while self._arrivals and self._arrivals[0][0] <= now - self.window_s:
            for stage, sec in self._arrivals.popleft()[1].items():
                self._sums[stage] -= sec
        if not self._arrivals:
            self._sums.clear()  # no float residue once the window is empty

    def load(self, now: float) -> float:
        """The offered load: the busiest stage's work arriving per second."""
        self._trim(now)
        if len(self._arrivals) < 2:
            return 0.0
        first_at, first = self._arrivals[0]
        span = max(now - first_at, self.min_span_s)
        return max((total - first.get(stage, 0.0) for stage, total in self._sums.items()), default=0.0) / span

    def price(self, now: float) -> float:
        """Accuracy per second of work (`reassign`'s price)."""
        return self.scale * max(0.0, self.load(now) - 1.0) if self.scale else 0.0


class Slowdown:
    """The program's error, closed-loop: each request served adds its actual e2e over the e2e the
    program predicted when it admitted it; the slowdown is the `quantile` (default the median) of
    the last `window` of these, within [`low`, `high`] (1.0 until `min_samples` are in). The live
    selector divides the measured stage capacities by it, so what the model leaves out
    (transfers between stages, the scheduler's own work, cores shared with other processes,
    queued requests pushed back by more urgent ones) is charged to the work, and an overloaded
    system refuses or reduces in time instead of serving late.

    Requests still in service that are already past their prediction count too (`value_with`):
    their elapsed over predicted time is a lower bound of their ratio. Counting only the requests
    that finished would hear first from the fastest ones, and learn that the model is optimistic
    one e2e too late, after admitting a burst on its word. Pure."""

    def __init__(self, window: int = 128, min_samples: int = 8, low: float = 1.0, high: float = 4.0,
                 quantile: float = 0.5) -> None:
        if window < 1 or not 1 <= min_samples <= window or not 0 < low <= high or not 0.0 <= quantile <= 1.0:
            raise ValueError(f"Slowdown: need window >= min_samples >= 1, 0 < low <= high and quantile in [0, 1], "
                             f"got {window}, {min_samples}, {low}, {high}, {quantile}")
        self.min_samples, self.low, self.high, self.quantile = min_samples, float(low), float(high), float(quantile)
        self._ratios: deque[float] = deque(maxlen=window)

    def served(self, predicted_s: float, actual_s: float) -> None:
        """A request served in `actual_s` seconds that the program predicted would take `predicted_s`."""
        if predicted_s > 0 and actual_s > 0 and math.isfinite(predicted_s) and math.isfinite(actual_s):
            self._ratios.append(actual_s / predicted_s)

    @property
    def samples(self) -> int:
        """Requests in the window."""
        return len(self._ratios)

    @property
    def value(self) -> float:
        """From the requests served only."""
        return self.value_with(())

    def value_with(self, overdue: Iterable[float]) -> float:
        """With `overdue`: the elapsed over predicted time of each request in service past its
        prediction (each > 1; lower bounds of their ratios)."""
        ratios = [*self._ratios, *(r for r in overdue if r > 1.0 and math.isfinite(r))]
        if len(ratios) < self.min_samples:
            return 1.0
        return min(self.high, max(self.low, float(np.quantile(ratios, self.quantile))))
