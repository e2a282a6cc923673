"""Adaptation's controller: the rate forecast on synthetic ramps, the adapter's schedule and
hysteresis with an injected clock, and the diff the runtime applies."""
from __future__ import annotations

import pytest

from services.scheduler.core.adapt import (
    Action,
    Adapter,
    AdapterSettings,
    Bounds,
    LatencyModel,
    PipelineConfig,
    RateForecaster,
    StageChoice,
    VariantProfile,
    Weights,
    carries,
    diff,
    shortfall,
)


def feed(f: RateForecaster, rate_of, start: int, end: int) -> None:
    """Arrivals second by second: rate_of(t) arrivals during second t."""
    for t in range(start, end):
        f.observe(t + 0.5, rate_of(t))


def test_forecast_constant_rate():
    f = RateForecaster(window_s=5, windows=4, margin=0.1)
    feed(f, lambda t: 10, 0, 40)
    assert f.forecast(40.0, 30.0) == pytest.approx(11.0)


def test_forecast_follows_a_ramp_ahead():
    f = RateForecaster(window_s=10, windows=4, margin=0.0)
    feed(f, lambda t: 2 + t // 10, 0, 60)  # window k (centre 10k + 5) runs at 2 + k req/s
    assert [r for _, r in f.rates(60.0)] == [4.0, 5.0, 6.0, 7.0]
    # the line through the last four windows, read at 60 + 20 s: 2 + (80 - 5) / 10
    assert f.forecast(60.0, 20.0) == pytest.approx(9.5)


def test_forecast_on_a_falling_ramp_keeps_the_last_window():
    f = RateForecaster(window_s=10, windows=3, margin=0.2)
    feed(f, lambda t: 20 - t // 10 * 4, 0, 40)  # 20, 16, 12, 8
    assert f.forecast(40.0, 30.0) == pytest.approx(8 * 1.2)


def test_forecast_counts_silent_windows_and_starts_from_the_current_window():
    f = RateForecaster(window_s=10, windows=3, margin=0.0)
    assert f.forecast(0.0) == 0.0
    f.observe(1.0, 4)
    f.observe(3.0, 4)
    assert f.forecast(4.0) == pytest.approx(2.0)  # 8 arrivals in the first 4 s
    assert [r for _, r in f.rates(40.0)] == [0.0, 0.0, 0.0]
    assert f.forecast(40.0, 10.0) == 0.0
    with pytest.raises(ValueError):
        RateForecaster(window_s=0)


# -- diff --------------------------------------------------------------------------------------------------


def config(stages, mixes=None, acc=0.9):
    cores = sum(w.cost_cores for s, c in stages.items() for w in (mixes or {}).get(s, (c,)))
    return PipelineConfig(stages, acc, cores, 100.0, mixes=mixes or {})


def test_diff_orders_start_and_scale_up_before_changes_and_stops_last():
    old = config({"encode": StageChoice("e", 1, 2, 2), "prefill": StageChoice("small", 4, 3, 1)})
    new = config({"encode": StageChoice("e", 2, 1, 4), "prefill": StageChoice("large", 4, 2, 2)})
    assert [str(a) for a in diff(old, new)] == [
        "prefill: start large with 2 replicas of 2 cores, batch 4",
        "encode: set cores of e to 4",
        "prefill: set cores of large to 2",
        "encode: set max batch of e to 2",
        "prefill: set max batch of large to 4",
        "encode: scale e to 1 replicas",
        "prefill: drain and stop small",
    ]
    assert diff(new, new) == []
    up = diff(old, config({"encode": StageChoice("e", 1, 5, 2), "prefill": StageChoice("small", 4, 3, 1)}))
    assert up == [Action("scale", "encode", "e", 5, 2)]


def test_diff_of_mixes_sets_shares():
    a, b = StageChoice("a", 1, 1, 2, 6.0), StageChoice("b", 1, 1, 1, 4.0)
    old = config({"p": a}, {"p": (a, b)})
    a2 = StageChoice("a", 1, 2, 2, 8.0)
    new = config({"p": a2}, {"p": (a2, StageChoice("b", 1, 1, 1, 2.0))})
    assert [str(x) for x in diff(old, new)] == ["p: scale a to 2 replicas", "p: send 8.0 req/s to a",
                                                "p: send 2.0 req/s to b"]
    assert [x.kind for x in diff(None, new)] == ["start", "start", "set_cores", "set_cores", "set_batch",
                                                "set_batch", "set_share", "set_share"]


# -- adapter -------------------------------------------------------------------------------------------------


class Clock:
    def __init__(self) -> None:
        self.t = 0.0

    def __call__(self) -> float:
        return self.t


SMALL = VariantProfile("small", "prefill", 0.7, LatencyModel({1: {1: 100.0}}))  # 10 req/s per worker
LARGE = VariantProfile("large", "prefill", 0.9, LatencyModel({1: {1: 200.0}}))  # 5 req/s per worker


def adapter(clock, **kw):
    settings = AdapterSettings(**{"slo_ms": 1000.0, "period_s": 10.0, "horizon_s": 0.0, "min_gain": 0.5,
                                  "stable_steps": 2, **kw})
    return Adapter({"prefill": [SMALL, LARGE]}, settings,
                   Bounds(max_replicas={"*": 8}, batches={"*": (1,)}, cores={"*": (1,)}, total_cores=8, headroom=0.0),
                   Weights(accuracy=20.0), RateForecaster(window_s=10, windows=2, margin=0.0), clock)


def run_rate(a: Adapter, clock: Clock, rate: int, seconds: int):
    """`rate` arrivals a second for `seconds`, stepping every second; the configurations adopted."""
    out = []
    for _ in range(seconds):
        a.observe(rate, now_s=clock.t + 0.5)
        clock.t += 1.0
        new = a.step()
        if new is not None:
            out.append((clock.t, new))
    return out


def test_adapter_schedule_hysteresis_and_scale_up_at_once():
    clock = Clock()
    a = adapter(clock)
    adopted = run_rate(a, clock, 10, 30)
    # t=1: first solve on the partial window (10 req/s): large x2 (objective 2 - 18) beats small x1 (1 - 14)
    assert [(t, c.stages["prefill"].variant, c.stages["prefill"].replicas) for t, c in adopted] == [(1.0, "large", 2)]
    assert a.last_solve_s == 21.0  # every 10 s
    # load doubles: the current config cannot carry it, the change comes at the next solve (t=41),
    # and the forecast extrapolates the ramp: windows 20-30 s at 10 and 30-40 s at 20 req/s, read at 41 s
    adopted = run_rate(a, clock, 20, 20)
    assert [(t, c.stages["prefill"].variant, c.stages["prefill"].replicas) for t, c in adopted] == [(41.0, "large", 6)]
    assert a.last_reason == "current cannot carry 26.00 req/s"


def test_adapter_scales_down_only_after_stable_solves():
    clock = Clock()
    a = adapter(clock)
    run_rate(a, clock, 20, 30)
    assert a.current.stages["prefill"].replicas == 4
    # load halves: the window 30-40 s reads 10 req/s at t=41 (proposed once), again at t=51: changed
    adopted = run_rate(a, clock, 10, 30)
    assert [(t, c.stages["prefill"].replicas) for t, c in adopted] == [(51.0, 2)]
    assert a.last_reason == "better by 2.000 for 2 solves"
    run_rate(a, clock, 10, 10)
    assert a.last_reason == "unchanged"


def test_adapter_ignores_small_gains_and_reports_infeasible():
    clock = Clock()
    a = adapter(clock, min_gain=100.0, stable_steps=1)
    run_rate(a, clock, 20, 12)
    assert a.current.stages["prefill"].replicas == 4
    run_rate(a, clock, 10, 30)
    assert a.current.stages["prefill"].replicas == 4 and a.last_reason.startswith("gain")
    b = adapter(Clock())
    b.observe(500, now_s=0.5)  # far beyond 8 workers
    assert b.step(1.0) is None and b.last_reason.startswith("infeasible at 500.00 req/s: capacity")
    assert b.current is None


def test_adapter_variants_mode_and_carries():
    clock = Clock()
    a = adapter(clock, mode="variants")
    a.observe(45, now_s=0.5)
    new = a.step(1.0)  # 45 req/s: large carries 5 per worker, small 10; one large and four small are best
    mix = {w.variant: (w.replicas, w.share_rps) for w in new.workers("prefill")}
    assert mix == {"small": (4, 40.0), "large": (1, 5.0)}
    assert new.expected_accuracy == pytest.approx((40 * 0.7 + 5 * 0.9) / 45)
    assert carries(new, a.variants, 45.0, 1000.0)
    assert not carries(new, a.variants, 60.0, 1000.0)
    with pytest.raises(ValueError, match="mode"):
        AdapterSettings(slo_ms=1.0, mode="both")


# batch 2 on one core: 150 ms a batch, 13.3 req/s; batch 1: 100 ms, 10 req/s
BATCHED = VariantProfile("batched", "prefill", 0.9, LatencyModel({1: {1: 100.0, 2: 150.0}}))


def batched_adapter(clock, **kw):
    settings = AdapterSettings(**{"slo_ms": 400.0, "period_s": 10.0, "horizon_s": 0.0, "min_gain": 0.5,
                                  "stable_steps": 2, "mode": "variants", **kw})
    return Adapter({"prefill": [BATCHED]}, settings,
                   Bounds(max_replicas={"*": 1}, batches={"*": (1, 2)}, cores={"*": (1,)}, total_cores=1, headroom=0.0),
                   Weights(accuracy=10.0), RateForecaster(window_s=10, windows=2, margin=0.0), clock)


def test_shortfall_names_capacity_or_latency_and_an_idle_pipeline_owes_no_batch_wait():
    b2 = PipelineConfig({"prefill": StageChoice("batched", 2, 1, 1)}, 0.9, 1, 150.0)
    variants = {"prefill": [BATCHED]}
    assert shortfall(b2, variants, 0.0, 400.0) is None  # nothing arrives: nothing waits (was: infinite wait)
    assert carries(b2, variants, 0.0, 400.0)
    assert shortfall(b2, variants, 4.0, 400.0) is None  # 150 + 1000/4 = 400 ms: fits; at 3 req/s it does not
    assert shortfall(b2, variants, 3.0, 400.0) == "latency"
    assert shortfall(b2, variants, 10.0, 400.0) is None  # 150 + 100 ms
    assert shortfall(b2, variants, 14.0, 400.0) == "capacity"  # 13.3 req/s at most


def test_adapter_keeps_its_configuration_when_the_load_stops():
    """The flap of the live run: solved for 12 req/s (batch 2), then nothing arrives; before,
    the forecast of 0 req/s made any batch above 1 'unable to carry' and the adapter switched."""
    clock = Clock()
    a = batched_adapter(clock)
    adopted = run_rate(a, clock, 12, 10)
    assert [(t, c.stages["prefill"].batch) for t, c in adopted] == [(1.0, 2)]
    adopted = run_rate(a, clock, 0, 40)
    assert adopted == [] and a.current.stages["prefill"].batch == 2
    assert a.last_reason == "unchanged" or a.last_reason.startswith("gain")


def test_adapter_waits_stable_solves_when_only_the_latency_misses():
    """A rate the batch bound cannot fill in time (latency, not capacity): the smaller batch is
    adopted only once it was proposed `stable_steps` solves in a row."""
    clock = Clock()
    a = batched_adapter(clock)
    run_rate(a, clock, 12, 10)
    adopted = run_rate(a, clock, 3, 30)  # 3 req/s: batch 2 takes 150 + 333 ms > 400 ms
    assert [(t, c.stages["prefill"].batch) for t, c in adopted] == [(31.0, 1)]
    assert a.last_reason == "over the slo at 3.00 req/s for 2 solves"
