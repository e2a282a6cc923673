"""The scheduler's adaptation loop (services/scheduler/adapting.py) with a fake clock and a fake
applier: it re-solves on the Adapter's schedule, applies exactly the diff (and, the first time,
drains the running variants the configuration leaves out), keeps cost as core-seconds, retries a
failed application with a whole configuration, and shows its state in the admin status."""
from __future__ import annotations

import asyncio

import pytest

from services.scheduler.adapting import AdaptationLoop
from services.scheduler.admin import adaptation_status
from services.scheduler.core.adapt import (
    Adapter, AdapterSettings, Bounds, LatencyModel, RateForecaster, VariantProfile, Weights)

STAGE = "pipeline"


class Clock:
    def __init__(self) -> None:
        self.t = 0.0

    def __call__(self) -> float:
        return self.t


class FakeApplier:
    def __init__(self) -> None:
        self.calls: list[list[str]] = []
        self.fail = 0

    async def apply(self, actions):
        if self.fail:
            self.fail -= 1
            raise RuntimeError("worker gone")
        self.calls.append([str(a) for a in actions])
        return [str(a) for a in actions]


def make_loop(clock: Clock, applier: FakeApplier) -> AdaptationLoop:
    # big: 100 ms a request (10 req/s on its one core), accuracy 0.9; small: 20 ms (50 req/s), 0.7
    variants = {STAGE: [VariantProfile("big", STAGE, 0.9, LatencyModel({1: {1: 100.0}})),
                        VariantProfile("small", STAGE, 0.7, LatencyModel({1: {1: 20.0}}))]}
    settings = AdapterSettings(slo_ms=500.0, period_s=10.0, horizon_s=0.0, min_gain=0.5, stable_steps=1, mode="variants")
    bounds = Bounds(max_replicas={"*": 1}, batches={"*": (1,)}, cores={"*": (1,)}, total_cores=1, headroom=0.0)
    adapter = Adapter(variants, settings, bounds, Weights(accuracy=10.0, cost=1.0),
                      RateForecaster(window_s=1.0, windows=2, margin=0.0), clock=clock)
    return AdaptationLoop(adapter, applier, tick_s=1.0, clock=clock, served={STAGE: ["big", "small"]})


def run(coro):
    return asyncio.run(coro)


def feed(loop: AdaptationLoop, clock: Clock, rate: int, start: int, end: int) -> None:
    """`rate` arrivals in each second from `start` to `end`; the clock ends at `end`."""
    for second in range(start, end):
        clock.t = second + 0.5
        loop.arrived(rate)
    clock.t = float(end)


def test_loop_applies_the_first_configuration_and_drains_what_it_leaves_out():
    clock, applier = Clock(), FakeApplier()
    loop = make_loop(clock, applier)
    feed(loop, clock, 5, 0, 2)  # 5 req/s: big (10 req/s) carries it, and is the more accurate
    run(loop.tick())
    assert applier.calls == [[f"{STAGE}: start big with 1 replicas of 1 cores, batch 1",
                              f"{STAGE}: set cores of big to 1", f"{STAGE}: set max batch of big to 1",
                              f"{STAGE}: send 5.0 req/s to big", f"{STAGE}: drain and stop small"]]
    assert (loop.state.solves, loop.state.changes, loop.state.last_reason) == (1, 1, "no configuration")
    assert loop.workers() == [{"stage": STAGE, "variant": "big", "replicas": 1, "cores": 1, "max_batch": 1,
                               "share_rps": 5.0}]


def test_loop_waits_for_the_period_then_moves_the_peak_to_the_cheaper_variant():
    clock, applier = Clock(), FakeApplier()
    loop = make_loop(clock, applier)
    feed(loop, clock, 5, 0, 2)
    run(loop.tick())
    for second in range(2, 12):  # 20 req/s for ten seconds: more than big's 10 req/s
        feed(loop, clock, 20, second, second + 1)
        if second < 11:
            assert run(loop.tick()) is None  # not due before the period
    assert loop.state.solves == 1
    done = run(loop.tick())
    assert done == [f"{STAGE}: start small with 1 replicas of 1 cores, batch 1", f"{STAGE}: set cores of small to 1",
                    f"{STAGE}: set max batch of small to 1", f"{STAGE}: send 20.0 req/s to small",
                    f"{STAGE}: drain and stop big"]
    assert loop.state.forecast_rps == pytest.approx(20.0)
    assert loop.state.last_reason == "current cannot carry 20.00 req/s"
    assert (loop.state.solves, loop.state.changes) == (2, 2)
    clock.t = 17.0
    assert loop.core_seconds() == pytest.approx(15.0)  # one core from the first application (t=2)
    status = adaptation_status(loop)
    assert (status.solves, status.changes, status.core_seconds) == (2, 2, 15.0)
    assert [(w.stage, w.variant, w.replicas, w.cores, w.max_batch, w.share_rps) for w in status.workers] == [
        (STAGE, "small", 1, 1, 1, 20.0)]
    assert status.cost_cores == 1 and status.expected_accuracy == pytest.approx(0.7)
    assert list(status.last_actions) == done


def test_a_failed_application_is_counted_and_a_whole_configuration_applied_next():
    clock, applier = Clock(), FakeApplier()
    loop = make_loop(clock, applier)
    applier.fail = 1
    feed(loop, clock, 5, 0, 2)
    assert run(loop.tick()) is None
    assert (loop.state.errors, loop.state.changes, loop.applied) == (1, 0, None)
    assert loop.state.last_reason == "applying failed: worker gone"
    assert loop.adapter.current is None
    feed(loop, clock, 5, 2, 12)
    done = run(loop.tick())
    assert done[0] == f"{STAGE}: start big with 1 replicas of 1 cores, batch 1"
    assert done[-1] == f"{STAGE}: drain and stop small"
    assert (loop.state.errors, loop.state.changes) == (1, 1)
    assert loop.core_seconds(14.0) == pytest.approx(2.0)  # cost counts from the configuration's application


def test_workers_appearing_later_get_the_configurations_cores_and_batch():
    clock, applier = Clock(), FakeApplier()
    loop = make_loop(clock, applier)
    names = {"w1"}
    loop.live = lambda: frozenset(names)
    feed(loop, clock, 5, 0, 2)
    run(loop.tick())
    clock.t = 3.0
    assert run(loop.tick()) is None  # same workers: nothing to do
    names.add("w2")
    assert run(loop.tick()) == [f"{STAGE}: set cores of big to 1", f"{STAGE}: set max batch of big to 1"]
    assert run(loop.tick()) is None
    assert (loop.state.solves, loop.state.changes) == (1, 1)


class DeferringApplier(FakeApplier):
    """Stops are deferred as the ConfigApplier defers them: `settle` drains when told to."""

    def __init__(self) -> None:
        super().__init__()
        self.pending_stops: dict = {}
        self.ready = False
        self.settled: list[float] = []

    async def apply(self, actions):
        for a in actions:
            if a.kind == "stop":
                self.pending_stops[(a.stage, a.variant)] = 0.0
            elif a.kind == "start":
                self.pending_stops.pop((a.stage, a.variant), None)
        return await super().apply(actions)

    async def settle(self, now):
        self.settled.append(now)
        if self.ready:
            self.pending_stops.clear()
        return []


def test_a_variant_left_out_costs_its_cores_until_it_is_drained():
    clock, applier = Clock(), DeferringApplier()
    loop = make_loop(clock, applier)
    feed(loop, clock, 5, 0, 2)
    run(loop.tick())  # t=2: big applied; small (never configured) left out: no cores of its own known
    assert applier.settled == [2.0]
    for second in range(2, 12):
        feed(loop, clock, 20, second, second + 1)
        run(loop.tick())  # t=12: small takes over, big keeps its worker (pending stop)
    assert loop.applied.stages[STAGE].variant == "small" and ("pipeline", "big") in applier.pending_stops
    clock.t = 15.0
    run(loop.tick())
    assert loop.cores_now() == 2 and loop.core_seconds() == pytest.approx(10.0 + 3 * 2)
    applier.ready = True
    clock.t = 16.0
    run(loop.tick())  # drained at t=16: from then on, small's core only
    clock.t = 20.0
    assert loop.cores_now() == 1 and loop.core_seconds() == pytest.approx(10.0 + 4 * 2 + 4 * 1)


def test_a_variant_left_out_and_parked_on_the_configurations_cores_costs_nothing_more():
    clock, applier = Clock(), DeferringApplier()
    loop = make_loop(clock, applier)
    feed(loop, clock, 5, 0, 2)
    run(loop.tick())
    for second in range(2, 12):
        feed(loop, clock, 20, second, second + 1)
        run(loop.tick())  # t=12: small takes over, big pending
    assert ("pipeline", "big") in applier.pending_stops
    applier.parked = {("pipeline", "big")}  # the ConfigApplier shrank it onto small's cpu
    clock.t = 15.0
    assert loop.cores_now() == 1 and loop.core_seconds() == pytest.approx(10.0 + 3 * 1)
    applier.parked = set()  # not parked (no kept cpu known): its core counts again
    assert loop.cores_now() == 2
