"""Adaptation's controller: a load forecast, a re-solve on a schedule, hysteresis, and the diff
the runtime applies. Pure: an injectable clock, no I/O.

`RateForecaster` -- arrivals are counted in windows of `window_s`; the forecast fits a straight
line (least squares) to the rates of the last `windows` complete windows (windows with no arrival
since the first one count as zero) and reads it at ``now + horizon``; it returns ``max(that,
the last complete window's rate) * (1 + margin)``: it follows a ramp ahead of time, never plans
below what just happened, and keeps a safety margin. Before any complete window the rate seen
so far in the current one is used.

`Adapter` -- every `period_s` it forecasts the rate and re-solves (`solve_pipeline`, or
`solve_variants` per stage). A new configuration replaces the current one when (a) the current
cannot carry the forecast for lack of capacity -- at once --, (b) the current has the capacity
but misses the SLO at that rate (a batch bound too large for the rate to fill in time) and the
same new configuration is proposed for `stable_steps` solves in a row, or (c) it differs and is
better by at least `min_gain` of objective (cores) for `stable_steps` solves in a row (no
flapping on noise; scaling down waits). At rate 0 nothing waits for a batch to fill
(`batch_wait_ms`), so an idle pipeline keeps its configuration. `diff` lists the
actions from one configuration to the next in an order that never drops capacity below what is
needed: start what is new and scale up first, then set cores and batch sizes (in place, between
batches; a new worker's too), then traffic shares, and stop or scale down last; a stopped worker
drains (finishes what it holds) before it exits, so no request is dropped.
"""
from __future__ import annotations

import math
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np

from services.scheduler.core.adapt_model import (
    Bounds,
    Infeasible,
    PipelineConfig,
    StageChoice,
    VariantProfile,
    Weights,
    batch_wait_ms,
)
from services.scheduler.core.adapt_solve import solve_pipeline, solve_variants

__all__ = ["Action", "Adapter", "AdapterSettings", "RateForecaster", "carries", "diff", "shortfall"]


class RateForecaster:
    """Arrival-rate forecast (module docstring): `observe` arrivals, `forecast` the rate."""

    def __init__(self, window_s: float = 5.0, windows: int = 6, margin: float = 0.1) -> None:
        if not window_s > 0 or windows < 1 or margin < 0:
            raise ValueError("RateForecaster: window_s > 0, windows >= 1 and margin >= 0 are required")
        self.window_s, self.windows, self.margin = float(window_s), int(windows), float(margin)
        self._counts: dict[int, float] = {}
        self._first: int | None = None

    def observe(self, now_s: float, count: float = 1.0) -> None:
        """Records `count` arrivals at `now_s`."""
        w = math.floor(now_s / self.window_s)
        self._counts[w] = self._counts.get(w, 0.0) + count
        self._first = w if self._first is None else min(self._first, w)
        for old in [k for k in self._counts if k < w - 4 * self.windows]:
            del self._counts[old]

    def rates(self, now_s: float) -> list[tuple[float, float]]:
        """(window centre, requests/s) of the last complete windows, oldest first."""
        if self._first is None:
            return []
        cur = math.floor(now_s / self.window_s)
        lo = max(self._first, cur - self.windows)
        return [((w + 0.5) * self.window_s, self._counts.get(w, 0.0) / self.window_s) for w in range(lo, cur)]

    def forecast(self, now_s: float, horizon_s: float = 0.0) -> float:
        """Requests/s expected at ``now_s + horizon_s`` (module docstring)."""
        pts = self.rates(now_s)
        if not pts:
            if self._first is None:
                return 0.0
            cur = math.floor(now_s / self.window_s)
            elapsed = max(now_s - cur * self.window_s, 1e-3)
            return self._counts.get(cur, 0.0) / elapsed * (1 + self.margin)
        last = pts[-1][1]
        if len(pts) == 1:
            pred = last
        else:
            t, r = np.array(pts).T
            slope, icpt = np.polyfit(t, r, 1)
            pred = float(slope * (now_s + horizon_s) + icpt)
        return max(pred, last, 0.0) * (1 + self.margin)


def shortfall(config: PipelineConfig, variants: Mapping[str, Sequence[VariantProfile]], rate_rps: float,
              slo_ms: float, headroom: float = 0.0) -> str | None:
    """Why `config` does not carry `rate_rps` within `slo_ms` on the latency model: ``"capacity"``
    (a stage's workers, plus `headroom`, serve fewer requests/s than they get), ``"latency"``
    (capacity enough, the end-to-end latency over the SLO: a mix's traffic split in proportion to
    its shares, the slowest variant counting), or None when it carries it."""
    total = 0.0
    for stage in config.stages:
        by_name = {v.name: v for v in variants[stage]}
        workers = config.workers(stage)
        shares = [w.share_rps for w in workers]
        base = sum(s for s in shares if s) or 0.0
        worst = 0.0
        for w in workers:
            frac = 1.0 if w.share_rps is None or base <= 0 else w.share_rps / base
            r = rate_rps * frac
            service = by_name[w.variant].latency_ms(w.batch, w.cores)
            if w.replicas * 1000.0 * w.batch / service < r * (1 + headroom) - 1e-9:
                return "capacity"
            if r > 0 or len(workers) == 1:
                worst = max(worst, service + batch_wait_ms(w.batch, r))
        total += worst
    return None if total <= slo_ms + 1e-9 else "latency"


def carries(config: PipelineConfig, variants: Mapping[str, Sequence[VariantProfile]], rate_rps: float,
            slo_ms: float, headroom: float = 0.0) -> bool:
    """Whether `config` carries `rate_rps` within `slo_ms` on the latency model: each stage's
    workers have the capacity (plus `headroom`) and the end-to-end latency fits (`shortfall`)."""
    return shortfall(config, variants, rate_rps, slo_ms, headroom) is None


@dataclass(frozen=True)
class Action:
    """One step of applying a configuration: ``kind`` is ``start`` (workers of a variant new to
    the stage), ``scale`` (replicas), ``set_cores`` (in place, between batches), ``set_batch``,
    ``set_share`` (traffic in requests/s) or ``stop`` (drain, then stop); `value` the new value."""

    kind: str
    stage: str
    variant: str
    value: float | int
    old: float | int | None = None
    choice: StageChoice | None = None  # start: the workers to start (cores, batch, share)

    def __str__(self) -> str:
        if self.kind == "start" and self.choice is not None:
            c = self.choice
            return f"{self.stage}: start {self.variant} with {c.replicas} replicas of {c.cores} cores, batch {c.batch}"
        what = {"start": "start {v} with {x} replicas", "scale": "scale {v} to {x} replicas",
                "set_cores": "set cores of {v} to {x}", "set_batch": "set max batch of {v} to {x}",
                "set_share": "send {x} req/s to {v}", "stop": "drain and stop {v}"}[self.kind]
        return f"{self.stage}: " + what.format(v=self.variant, x=self.value)


_ORDER = {"start": 0, "scale_up": 1, "set_cores": 2, "set_batch": 3, "set_share": 4, "scale": 5, "stop": 6}


def diff(old: PipelineConfig | None, new: PipelineConfig) -> list[Action]:
    """The actions taking `old` (None: nothing running) to `new`, in a safe order (module docstring):
    a start or scale-up comes before any change of cores, batch or share, and every scale-down or
    stop comes last. Core changes list the cores per replica."""
    acts: list[tuple[int, Action]] = []
    for stage in new.stages:
        before = {w.variant: w for w in (old.workers(stage) if old and stage in old.stages else ())}
        after = {w.variant: w for w in new.workers(stage)}
        for name, w in after.items():
            o = before.get(name)
            if o is None:
                acts.append((_ORDER["start"], Action("start", stage, name, w.replicas, choice=w)))
                acts.append((_ORDER["set_cores"], Action("set_cores", stage, name, w.cores)))
                acts.append((_ORDER["set_batch"], Action("set_batch", stage, name, w.batch)))
            else:
                if w.replicas != o.replicas:
                    order = _ORDER["scale_up"] if w.replicas > o.replicas else _ORDER["scale"]
                    acts.append((order, Action("scale", stage, name, w.replicas, o.replicas)))
                if w.cores != o.cores:
                    acts.append((_ORDER["set_cores"], Action("set_cores", stage, name, w.cores, o.cores)))
                if w.batch != o.batch:
                    acts.append((_ORDER["set_batch"], Action("set_batch", stage, name, w.batch, o.batch)))
            if w.share_rps is not None and (o is None or o.share_rps is None
                                            or abs(w.share_rps - o.share_rps) > 1e-6):
                acts.append((_ORDER["set_share"], Action("set_share", stage, name, round(w.share_rps, 6),
                                                         None if o is None else o.share_rps)))
        for name, o in before.items():
            if name not in after:
                acts.append((_ORDER["stop"], Action("stop", stage, name, 0, o.replicas)))
    if old is not None:
        for stage in old.stages:
            if stage not in new.stages:
                acts += [(_ORDER["stop"], Action("stop", stage, w.variant, 0, w.replicas)) for w in old.workers(stage)]
    return [a for _, a in sorted(acts, key=lambda pa: pa[0])]  # stable: stage order within a kind


@dataclass(frozen=True)
class AdapterSettings:
    """How the `Adapter` re-solves (module docstring)."""

    slo_ms: float  # end-to-end latency objective
    period_s: float = 10.0  # seconds between re-solves
    horizon_s: float = 10.0  # the forecast looks this far ahead
    min_gain: float = 0.5  # objective units (cores) a change must save to be worth it
    stable_steps: int = 2  # consecutive solves proposing the same better config before a change
    mode: str = "pipeline"  # "pipeline": solve_pipeline; "variants": solve_variants per stage
    time_limit_s: float | None = None  # per program

    def __post_init__(self) -> None:
        if not self.slo_ms > 0 or not self.period_s > 0 or self.horizon_s < 0 or self.min_gain < 0:
            raise ValueError("AdapterSettings: slo_ms and period_s must be > 0, horizon_s and min_gain >= 0")
        if self.stable_steps < 1 or self.mode not in ("pipeline", "variants"):
            raise ValueError("AdapterSettings: stable_steps >= 1 and mode 'pipeline' or 'variants' are required")


@dataclass
class Adapter:
    """The re-solving controller; `step` returns a configuration to apply, or None."""

    variants: Mapping[str, Sequence[VariantProfile]]
    settings: AdapterSettings
    bounds: Bounds = field(default_factory=Bounds)
    weights: Weights = field(default_factory=Weights)
    forecaster: RateForecaster = field(default_factory=RateForecaster)
    clock: Callable[[], float] = time.monotonic
    combinations: Sequence[Mapping[str, str]] | None = None  # variants that may run together (solve_pipeline)
    current: PipelineConfig | None = None
    last_solve_s: float | None = None
    last_reason: str = ""  # why the last step changed or kept the configuration
    _pending: PipelineConfig | None = field(default=None, repr=False)
    _pending_count: int = field(default=0, repr=False)

    def observe(self, count: float = 1.0, now_s: float | None = None) -> None:
        """Records arrivals (requests entering the pipeline)."""
        self.forecaster.observe(self.clock() if now_s is None else now_s, count)

    def solve(self, rate_rps: float) -> PipelineConfig:
        """The best configuration at `rate_rps` (raises `Infeasible`)."""
        s = self.settings
        if s.mode == "pipeline":
            return solve_pipeline(self.variants, rate_rps, s.slo_ms, self.bounds, self.weights,
                                  combinations=self.combinations, time_limit_s=s.time_limit_s)
        if len(self.variants) != 1:
            raise ValueError("mode 'variants' adapts one stage (or the pipeline as one stage)")
        (stage, vs), = self.variants.items()
        return solve_variants(vs, rate_rps, s.slo_ms, self.bounds, self.weights, stage=stage,
                              time_limit_s=s.time_limit_s)

    def step(self, now_s: float | None = None) -> PipelineConfig | None:
        """Re-solves when `period_s` has passed since the last solve; the new configuration when
        it should be applied (it is then `current`), else None (`last_reason` says why)."""
        now = self.clock() if now_s is None else now_s
        if self.last_solve_s is not None and now - self.last_solve_s < self.settings.period_s:
            return None
        self.last_solve_s = now
        rate = self.forecaster.forecast(now, self.settings.horizon_s)
        try:
            new = self.solve(rate)
        except Infeasible as exc:
            self.last_reason = f"infeasible at {rate:.2f} req/s: {exc.reason}"
            return None
        return self.consider(new, rate)

    def consider(self, new: PipelineConfig, rate_rps: float) -> PipelineConfig | None:
        """The hysteresis rule on a freshly solved `new` (module docstring)."""
        cur = self.current
        short = None if cur is None else shortfall(cur, self.variants, rate_rps, self.settings.slo_ms)
        if cur is None or short == "capacity":
            self._adopt(new, "no configuration" if cur is None else f"current cannot carry {rate_rps:.2f} req/s")
            return new
        if _same(cur, new):
            self._pending, self._pending_count = None, 0
            self.last_reason = "unchanged"
            return None
        current_obj = self.weights.cost * cur.cost_cores - self.weights.accuracy * cur.expected_accuracy
        gain = current_obj - new.objective
        if short is None and gain < self.settings.min_gain:
            self._pending, self._pending_count = None, 0
            self.last_reason = f"gain {gain:.3f} < min_gain {self.settings.min_gain}"
            return None
        if self._pending is not None and _same(self._pending, new):
            self._pending_count += 1
        else:
            self._pending, self._pending_count = new, 1
        why = f"over the slo at {rate_rps:.2f} req/s" if short else f"better by {gain:.3f}"
        if self._pending_count < self.settings.stable_steps:
            self.last_reason = f"{why}, seen {self._pending_count}/{self.settings.stable_steps}"
            return None
        self._adopt(new, f"{why} for {self.settings.stable_steps} solves")
        return new

    def _adopt(self, new: PipelineConfig, reason: str) -> None:
        self.current, self._pending, self._pending_count, self.last_reason = new, None, 0, reason


def _key(c: PipelineConfig) -> dict:
    return {s: sorted((w.variant, w.batch, w.replicas, w.cores, round(w.share_rps or 0.0, 3))
                      for w in c.workers(s)) for s in c.stages}


def _same(a: PipelineConfig, b: PipelineConfig) -> bool:
    """Equal workers (variant, batch, replicas, cores) and shares within 1e-3 req/s."""
    return _key(a) == _key(b)
