"""Autoscaling: how many replicas each stage wants (after ModServe, arXiv 2502.00937).

Per stage, from its load in tokens per second (`RateTracker.arrival_rates`) and profiled
capacity per instance (`capacity_from_profile`):

* base = ceil(load / (capacity x target_utilisation)), clamped to [min_replicas, max_replicas];
* SLO trigger: when the stage's SLO attainment over the window is below ``slo_target`` while it
  is the bottleneck (highest utilisation = load / (actual replicas x capacity)), one replica
  more than base, and never fewer than it has while the SLO is missed (bounded by max);
* scale-out happens at once (to the target), then not again for ``scale_out_cooldown_s``;
* scale-in happens only after the target has stayed below the actual count for
  ``scale_in_cooldown_s`` (hysteresis), one replica at a time, at most one step per
  ``scale_in_cooldown_s`` since the last change in either direction;
* actual counts outside [min, max] are brought inside at once.

`Autoscaler` holds only timestamps (when each stage last changed, since when its load has been
low); given the same calls with the same ``now`` it returns the same answers.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

__all__ = ["Autoscaler", "ScalePolicy", "capacity_from_profile", "task_share_s"]

_EPS = 1e-9


@dataclass(frozen=True)
class ScalePolicy:
    """Scaling bounds and targets for one stage."""

    capacity: float
    """Profiled tokens per second of one instance of the stage."""
    min_replicas: int = 1
    max_replicas: int = 8
    target_utilisation: float = 0.8
    slo_target: float = 0.99
    scale_in_cooldown_s: float = 300.0
    scale_out_cooldown_s: float = 30.0

    def __post_init__(self) -> None:
        if not self.capacity > 0:
            raise ValueError("capacity must be > 0 tokens/s")
        if not 0 <= self.min_replicas <= self.max_replicas:
            raise ValueError("need 0 <= min_replicas <= max_replicas")
        if not 0 < self.target_utilisation <= 1:
            raise ValueError("target_utilisation must be in (0, 1]")
        if not 0 <= self.slo_target <= 1:
            raise ValueError("slo_target must be in [0, 1]")
        if self.scale_in_cooldown_s < 0 or self.scale_out_cooldown_s < 0:
            raise ValueError("cooldowns must be >= 0")

    def clamp(self, n: int) -> int:
        """`n` brought into [min_replicas, max_replicas]."""
        return min(self.max_replicas, max(self.min_replicas, n))

    def base(self, load: float) -> int:
        """Replicas for `load` tokens/s at the target utilisation, clamped."""
        need = math.ceil(max(0.0, load) / (self.capacity * self.target_utilisation) - _EPS)
        return self.clamp(need)


class Autoscaler:
    """Desired replica counts per stage with SLO trigger, hysteresis and cooldowns."""

    def __init__(self, policies: Mapping[str, ScalePolicy]) -> None:
        self.policies = dict(policies)
        self._last_out: dict[str, float] = {}  # stage -> time of its last scale-out
        self._last_change: dict[str, float] = {}  # stage -> time of its last change
        self._low_since: dict[str, float] = {}  # stage -> since when target < actual
        self.reasons: dict[str, str] = {}
        """Why each stage got its last answer (for logs)."""

    def utilisation(self, stage: str, load: float, actual: int) -> float:
        """load / (actual x capacity); inf with load and no replica, 0 without load."""
        if load <= 0:
            return 0.0
        if actual <= 0:
            return math.inf
        return load / (actual * self.policies[stage].capacity)

    def desired(
        self,
        now: float,
        stage_load_tokens_per_s: Mapping[str, float],
        slo_attainment: Mapping[str, float] | float,
        actual: Mapping[str, int],
    ) -> dict[str, int]:
        """Desired replicas for every stage with a policy.

        `slo_attainment` is per stage (`SloTracker.stage_attainment`) or one fraction for all;
        a stage missing from it counts as meeting its SLO, one missing from `actual` has 0
        replicas and one missing from the load has none.
        """
        loads = {s: max(0.0, float(stage_load_tokens_per_s.get(s, 0.0))) for s in self.policies}
        have = {s: max(0, int(actual.get(s, 0))) for s in self.policies}
        util = {s: self.utilisation(s, loads[s], have[s]) for s in self.policies}
        hot = [s for s in self.policies if loads[s] > 0]
        bottleneck = max(hot, key=lambda s: (util[s], s)) if hot else None

        out: dict[str, int] = {}
        for stage, pol in self.policies.items():
            cur = have[stage]
            target = pol.base(loads[stage])
            why = f"load {loads[stage]:.0f} tok/s -> {target}"
            if isinstance(slo_attainment, (int, float)):
                att = float(slo_attainment)
            else:
                att = slo_attainment.get(stage, 1.0)
            if stage == bottleneck and att < pol.slo_target:
                target = pol.clamp(max(target + 1, cur))
                why += f"; SLO {att:.3f} < {pol.slo_target:g} at the bottleneck -> {target}"
            out[stage], self.reasons[stage] = self._step(stage, pol, now, cur, target, why)
        return out

    def _step(
        self, stage: str, pol: ScalePolicy, now: float, cur: int, target: int, why: str
    ) -> tuple[int, str]:
        if cur < pol.min_replicas or cur > pol.max_replicas:
            self._low_since.pop(stage, None)
            self._mark(stage, now, out=cur < pol.min_replicas)
            return pol.clamp(cur), f"{why}; {cur} outside [{pol.min_replicas}, {pol.max_replicas}]"
        if target > cur:
            self._low_since.pop(stage, None)
            last = self._last_out.get(stage)
            if last is not None and now - last < pol.scale_out_cooldown_s:
                return cur, f"{why}; scale-out cooldown ({now - last:.0f}/{pol.scale_out_cooldown_s:g} s)"
            self._mark(stage, now, out=True)
            return target, f"{why}; scale out {cur} -> {target}"
        if target == cur:
            self._low_since.pop(stage, None)
            return cur, why
        since = self._low_since.setdefault(stage, now)
        if now - since < pol.scale_in_cooldown_s:
            return cur, f"{why}; low for {now - since:.0f}/{pol.scale_in_cooldown_s:g} s"
        last = self._last_change.get(stage)
        if last is not None and now - last < pol.scale_in_cooldown_s:
            return cur, f"{why}; scale-in cooldown ({now - last:.0f}/{pol.scale_in_cooldown_s:g} s)"
        self._mark(stage, now, out=False)
        return cur - 1, f"{why}; scale in {cur} -> {cur - 1}"

    def _mark(self, stage: str, now: float, *, out: bool) -> None:
        self._last_change[stage] = now
        if out:
            self._last_out[stage] = now


def capacity_from_profile(samples: Iterable[tuple[float, float]]) -> float:
    """Tokens per second from measured (tokens, seconds) samples: the median of per-sample rates.

    Samples with non-positive seconds or negative tokens are ignored (timer glitches); the
    median shrugs off the odd slow (GC, compile) or fast (cache) run.

    Raises:
        ValueError: no usable sample.
    """
    rates = [tokens / seconds for tokens, seconds in samples
             if seconds > 0 and tokens >= 0 and math.isfinite(tokens) and math.isfinite(seconds)]
    if not rates:
        raise ValueError("capacity_from_profile needs at least one sample with seconds > 0")
    return float(statistics.median(rates))


def task_share_s(tokens: float, batch_s: float, batch_tokens: float = 0.0) -> float:
    """One task's share of its batch's compute, `batch_s` seconds over `batch_tokens` tokens: its
    `tokens` of them (all of it when the batch's tokens are unknown, or fewer than the task's).
    A (tokens, share) sample then measures the batch's throughput, not a batch-size fraction of it."""
    if batch_tokens > 0 and 0 <= tokens <= batch_tokens:
        return batch_s * tokens / batch_tokens
    return batch_s
