"""The scheduler's adaptation loop (issue 7): the thin driver between the adaptation core
(`services.scheduler.core.adapt.Adapter`: forecast, integer program, hysteresis) and the live
system (`services.scheduler.applier.ConfigApplier`: SetCompute in place, routing weights,
replica targets, drains).

* every admitted request is counted (`arrived`), feeding the Adapter's rate forecaster;
* every `tick_s` the loop calls `Adapter.step`, which re-solves once its period has passed;
  a configuration it returns is turned into ordered actions by `diff` (start and scale up, set
  cores and batch, set shares, drain last) and applied; nothing in flight is dropped (see the
  applier);
* the first configuration also drains the variants running before it that it leaves out;
* a variant left out loses its traffic at once but keeps its workers until the applier's
  `settle` (called every tick) drains them: once the configuration's variants are live and after
  the applier's stop delay; one brought back before then restarts nothing;
* workers that appear later (started for the configuration, or restarted) get its cores and
  batch bound set on them at the next tick;
* a failed application is counted and logged; the Adapter then forgets the configuration it
  adopted (the live system may be half-way), so the next re-solve applies a whole one again;
* cost is kept as the integral over time (core-seconds) of the cores allocated: the applied
  configuration's cores plus those of variants left out whose workers are not drained yet,
  except workers the applier has parked (shrunk in place to one thread on a cpu the
  configuration already holds: no core beyond the configuration's is allocated to them).

Its state is what the admin API's ``GetStatus.adaptation`` and the ``prism_adapt_*`` metrics show.
"""
from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

from services.scheduler.core.adapt import Action, Adapter, PipelineConfig, diff

log = logging.getLogger(__name__)


class Applies(Protocol):
    async def apply(self, actions: Any) -> list[str]: ...

    # optional: ``async settle(now) -> list[str]`` (deferred drains) and ``pending_stops``
    # ({(stage, variant): since}), see services.scheduler.applier.ConfigApplier


@dataclass
class LoopState:
    """What the loop did so far (GetStatus.adaptation)."""

    solves: int = 0
    changes: int = 0
    errors: int = 0
    forecast_rps: float = 0.0
    last_reason: str = ""
    last_actions: list[str] = field(default_factory=list)
    core_seconds: float = 0.0


class AdaptationLoop:
    def __init__(self, adapter: Adapter, applier: Applies, *, tick_s: float = 1.0,
                 clock: Callable[[], float] | None = None,
                 on_change: Callable[[PipelineConfig], None] | None = None,
                 served: Mapping[str, Sequence[str]] | None = None,
                 live: Callable[[], frozenset[str]] | None = None, ready: Callable[[], bool] | None = None):
        if not tick_s > 0:
            raise ValueError("tick_s must be > 0")
        self.adapter, self.applier, self.tick_s = adapter, applier, tick_s
        self.clock = clock or adapter.clock or time.monotonic
        self.on_change = on_change
        #: The variants running per stage before the first configuration: those it leaves out are
        #: drained by the first change (else they would keep their share of the traffic).
        self.served = {k: list(v) for k, v in (served or {}).items()}
        #: The live workers' names: when they change (a worker started for the configuration, or
        #: restarted), the configuration's cores and batch bounds are set on them again.
        self.live = live
        #: Whether the system can be configured yet (the first solve waits for it in `run`).
        self.ready = ready
        self._live_at_apply: frozenset[str] | None = None
        self.state = LoopState()
        self.applied: PipelineConfig | None = None  # what the live system runs (as far as we know)
        self._since: float | None = None  # start of the current cost interval
        #: The choice each (stage, variant) had when it was last configured: the cores of a
        #: variant left out count until its workers are drained.
        self._last_choice: dict[tuple[str, str], Any] = {}

    def arrived(self, count: float = 1.0) -> None:
        """`count` requests entered the pipeline now."""
        self.adapter.observe(count, self.clock())

    def cores_now(self) -> int:
        """Cores allocated now: the applied configuration's and those of variants left out whose
        workers still run (the applier's pending stops), unless parked on the configuration's
        cores (the applier's ``parked``)."""
        if self.applied is None:
            return 0
        pending = getattr(self.applier, "pending_stops", {}) or {}
        parked = getattr(self.applier, "parked", set()) or set()
        lingering = sum(self._last_choice[key].cost_cores for key in pending
                        if key in self._last_choice and key not in parked)
        return self.applied.cost_cores + lingering

    def _account(self, now: float) -> None:
        if self._since is not None and self.applied is not None:
            self.state.core_seconds += self.cores_now() * max(0.0, now - self._since)
        self._since = now

    def core_seconds(self, now: float | None = None) -> float:
        """Cores allocated, integrated over time up to `now`."""
        now = self.clock() if now is None else now
        extra = self.cores_now() * max(0.0, now - self._since) if self.applied and self._since is not None else 0.0
        return self.state.core_seconds + extra

    async def _settle(self, now: float) -> list[str]:
        """The applier's deferred drains (when it has them)."""
        settle = getattr(self.applier, "settle", None)
        if settle is None or self.applied is None:
            return []
        try:
            return await settle(now)
        except Exception as exc:  # noqa: BLE001 - a worker gone mid-drain: the next tick tries again
            self.state.errors += 1
            log.warning("adaptation: draining what the configuration left out failed: %s", exc)
            return []

    async def tick(self, now: float | None = None) -> list[str] | None:
        """One round: re-solve if due and apply a new configuration. Returns the actions done
        when the configuration changed, else None."""
        now = self.clock() if now is None else now
        if self.applied is not None:
            self._account(now)  # the interval ending now, at the cores allocated during it
        done = await self._tick(now)
        await self._settle(now)
        return done

    async def _tick(self, now: float) -> list[str] | None:
        from prism.runtime import metrics

        before = self.adapter.last_solve_s
        new = self.adapter.step(now)
        if self.adapter.last_solve_s == before:  # not due yet
            return await self._catch_up()
        self.state.solves += 1
        self.state.forecast_rps = self.adapter.forecaster.forecast(now, self.adapter.settings.horizon_s)
        self.state.last_reason = self.adapter.last_reason
        metrics.ADAPT_FORECAST.set(self.state.forecast_rps)
        if new is None:
            metrics.ADAPT_SOLVES.labels("kept").inc()
            return await self._catch_up()
        actions = diff(self.applied, new)
        if self.applied is None:
            actions += [Action("stop", stage, name, 0, None) for stage, names in self.served.items()
                        if stage in new.stages for name in names
                        if name not in {w.variant for w in new.workers(stage)}]
        try:
            done = await self.applier.apply(actions)
        except Exception as exc:  # noqa: BLE001 - a worker gone mid-change: retry at the next re-solve
            self.state.errors += 1
            self.state.last_reason = f"applying failed: {exc}"
            self.adapter.current = None  # the next solve adopts (and applies) a whole configuration again
            metrics.ADAPT_SOLVES.labels("failed").inc()
            log.warning("adaptation: applying %s failed: %s", [str(a) for a in actions], exc)
            return None
        self._account(now)
        if self.applied is not None:
            for stage in self.applied.stages:
                self._last_choice.update({(stage, w.variant): w for w in self.applied.workers(stage)})
        self.applied = new
        for stage in new.stages:
            self._last_choice.update({(stage, w.variant): w for w in new.workers(stage)})
        self._live_at_apply = self.live() if self.live is not None else None
        self.state.changes += 1
        self.state.last_actions = [str(a) for a in actions]
        metrics.ADAPT_SOLVES.labels("changed").inc()
        self._export(new)
        log.info("adaptation (%s): %s", self.state.last_reason, "; ".join(self.state.last_actions))
        if self.on_change is not None:
            self.on_change(new)
        return done

    async def _catch_up(self) -> list[str] | None:
        """Sets the applied configuration's cores and batch bounds again when the live workers
        changed since it was applied (new workers start with their command line's share)."""
        if self.applied is None or self.live is None:
            return None
        live = self.live()
        if live == self._live_at_apply:
            return None
        self._live_at_apply = live
        acts = [Action(kind, stage, w.variant, value) for stage in self.applied.stages
                for w in self.applied.workers(stage) if w.replicas
                for kind, value in (("set_cores", w.cores), ("set_batch", w.batch))]
        try:
            return await self.applier.apply(acts)
        except Exception as exc:  # noqa: BLE001 - a worker still starting: try at the next tick
            self._live_at_apply = None
            log.warning("adaptation: setting new workers' compute failed: %s", exc)
            return None

    def _export(self, config: PipelineConfig) -> None:
        from prism.runtime import metrics

        metrics.ADAPT_WORKERS.clear()
        for row in self.workers():
            for kind in ("replicas", "cores", "max_batch", "share_rps"):
                metrics.ADAPT_WORKERS.labels(row["stage"], row["variant"], kind).set(row[kind])
        metrics.ADAPT_CORES.set(config.cost_cores)

    def workers(self) -> list[dict[str, Any]]:
        """The applied configuration as rows (stage, variant, replicas, cores, max_batch, share_rps)."""
        if self.applied is None:
            return []
        return [{"stage": stage, "variant": w.variant, "replicas": w.replicas, "cores": w.cores, "max_batch": w.batch,
                 "share_rps": round(float(w.share_rps or 0.0), 6)}
                for stage in self.applied.stages for w in self.applied.workers(stage)]

    async def run(self) -> None:
        while self.ready is not None and not self.ready():
            await asyncio.sleep(self.tick_s)
        while True:
            try:
                await self.tick()
            except Exception as exc:  # noqa: BLE001 - the loop must live (an infeasible forecast, Redis away)
                self.state.errors += 1
                log.warning("adaptation round failed: %s", exc)
            await asyncio.sleep(self.tick_s)
