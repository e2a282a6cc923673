"""The scheduler's operator side: the autoscaling loop (desired replicas per stage from token
load, profiled capacity and SLO attainment, ModServe-style) and the admin gRPC service that
reports queues, in-flight requests and replicas, and drains workers.

The desired replica counts are also written to Redis (hash ``{namespace}:autoscale``, fields
``<stage>.desired`` / ``<stage>.actual``) for Kubernetes autoscalers (KEDA's redis scaler) and
read by `prism up`'s local supervisor, which starts and stops worker processes to match.
"""
from __future__ import annotations

import asyncio
import logging
import math
import time

import grpc

from prism.queue.base import SHARED
from prism.runtime import metrics
from prism.v1 import admin_pb2, admin_pb2_grpc
from services.scheduler.cluster import Cluster
from services.scheduler.config import Policy
from services.scheduler.core import STAGES, Autoscaler, RateTracker, ScalePolicy, SloTracker
from services.scheduler.pipeline import Pipeline

log = logging.getLogger(__name__)

class Scaling:
    """Feeds the autoscaler with measured load and SLO attainment; keeps its latest answer."""

    def __init__(self, cluster: Cluster, policy: Policy):
        self.cluster = cluster
        self.policy = policy
        self.rates = RateTracker(window_s=policy.autoscale_window_s)
        self.slo = SloTracker(window_s=policy.autoscale_window_s)
        self.autoscaler: Autoscaler | None = None
        self.desired: dict[str, int] = {}
        self.actual: dict[str, int] = {}
        self.load: dict[str, float] = {}
        self.capacity: dict[str, float] = {}

    def _policies(self) -> dict[str, ScalePolicy]:
        p = self.policy
        return {stage: ScalePolicy(capacity=max(self.capacity.get(stage, 0.0), 1e-6), min_replicas=p.min_replicas,
                                   max_replicas=p.max_replicas, target_utilisation=p.target_utilisation,
                                   scale_in_cooldown_s=p.scale_in_cooldown_s, scale_out_cooldown_s=p.scale_out_cooldown_s)
                for stage in STAGES}

    def step(self, now: float | None = None) -> dict[str, int]:
        """One autoscaling decision from the current measures."""
        now = time.monotonic() if now is None else now
        live = [i for i in self.cluster.instances if not i.draining]
        self.actual = {s: sum(1 for i in live if s in i.stages) for s in STAGES}
        for stage in STAGES:
            caps = [i.cap(stage) for i in live if stage in i.stages]
            if caps:
                self.capacity[stage] = sum(caps) / len(caps)
            else:
                self.capacity.setdefault(stage, self.cluster.default_capacity[stage])
        if self.autoscaler is None:
            self.autoscaler = Autoscaler(self._policies())
        else:
            for stage, pol in self._policies().items():
                self.autoscaler.policies[stage] = pol
        self.load = {s: self.rates.arrival_rate(s, now) for s in STAGES}
        attainment = self.slo.stage_attainment(now)
        self.desired = dict(self.autoscaler.desired(now, self.load, attainment, self.actual))
        for stage in STAGES:
            metrics.REPLICAS.labels(stage, "desired").set(self.desired.get(stage, 0))
            metrics.REPLICAS.labels(stage, "actual").set(self.actual.get(stage, 0))
            metrics.PENDING_TOKENS.labels(stage).set(self.cluster.book.stage_pending(stage))
            share = attainment.get(stage, 1.0) if isinstance(attainment, dict) else float(attainment)
            metrics.SLO_ATTAINMENT.labels(stage).set(share)
        return self.desired

    async def publish(self) -> None:
        backend = self.cluster.backend
        if not backend.durable:
            return
        fields = {f"{s}.desired": self.desired.get(s, 0) for s in STAGES}
        fields.update({f"{s}.actual": self.actual.get(s, 0) for s in STAGES})
        fields.update({f"{s}.load_tokens_per_s": round(self.load.get(s, 0.0), 3) for s in STAGES})
        await backend.client.hset(f"{backend.options.namespace}:autoscale", mapping=fields)

    async def run(self, every_s: float = 1.0) -> None:
        while True:
            try:
                self.step()
                await self.publish()
            except Exception as exc:  # Redis restarting: the next round retries; the loop must live
                log.warning("autoscale step failed: %s", exc)
            await asyncio.sleep(every_s)


class AdminServicer(admin_pb2_grpc.SchedulerAdminServiceServicer):
    def __init__(self, cluster: Cluster, pipeline: Pipeline, scaling: Scaling, selector=None, adaptation=None):
        self.cluster, self.pipeline, self.scaling = cluster, pipeline, scaling
        self.selector = selector
        self.adaptation = adaptation  # services.scheduler.adapting.AdaptationLoop, or None

    async def GetStatus(self, request, context: grpc.aio.ServicerContext) -> admin_pb2.GetStatusResponse:
        book = self.cluster.book
        out = admin_pb2.GetStatusResponse(in_flight=len(self.pipeline.inflight), placements=self.pipeline.placements)
        attainment = self.scaling.slo.stage_attainment()
        for stage in STAGES:
            if self.cluster.shared:  # one queue for the stage, whoever serves it (maybe nobody yet)
                queued = await self.cluster.queue(stage, SHARED).depth()
            else:
                queued = sum([await self.cluster.queue(stage, inst.name).depth()
                              for inst in self.cluster.instances if stage in inst.stages])
            pol = self.scaling.policy
            out.stages.append(admin_pb2.StageStatus(
                stage=stage, queued=queued, pending_tokens=book.stage_pending(stage),
                load_tokens_per_s=self.scaling.load.get(stage, 0.0),
                capacity_tokens_per_s=self.scaling.capacity.get(stage, 0.0),
                desired_replicas=self.scaling.desired.get(stage, 0), actual_replicas=self.scaling.actual.get(stage, 0),
                min_replicas=pol.min_replicas, max_replicas=pol.max_replicas,
                slo_attainment=attainment.get(stage, 1.0) if isinstance(attainment, dict) else float(attainment)))
        for inst in self.cluster.instances:
            out.workers.append(admin_pb2.WorkerStatus(
                name=inst.name, address=inst.address, stages=sorted(inst.stages), live=True, draining=inst.draining,
                pending_tokens={s: book.pending(s, inst.name) for s in inst.stages},
                decode_slots=inst.decode_slots, decode_active=book.slots_used(inst.name)))
        dead = 0
        for stage in STAGES:
            for inst in self.cluster.instances:
                if stage in inst.stages:
                    dead += len(await self.cluster.queue(stage, inst.name).dead_letters(1000))
                    break
        out.dead_letters = dead
        if self.selector is not None and self.selector.enabled:
            out.selection.CopyFrom(selection_status(self.selector.stats))
        if self.adaptation is not None:
            out.adaptation.CopyFrom(adaptation_status(self.adaptation))
        return out

    async def ListRequests(self, request, context: grpc.aio.ServicerContext) -> admin_pb2.ListRequestsResponse:
        limit = request.limit or 100
        if limit < 0:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, "limit: must be >= 0")
        now = time.time()
        out = admin_pb2.ListRequestsResponse()
        for rid, progress in list(self.pipeline.inflight.items())[:limit]:
            stage = next((s for s, _ in reversed(list(progress.tasks.values()))), "")
            out.requests.append(admin_pb2.InFlightRequest(
                request_id=rid, stage=stage, placement=progress.placement,
                instances={s: i for s, i in progress.tasks.values()}, attempt=progress.attempt,
                generated_tokens=len(progress.tokens),
                age_ms=(now - progress.started) * 1000 if math.isfinite(progress.started) else 0.0))
        return out

    async def DrainWorker(self, request, context: grpc.aio.ServicerContext) -> admin_pb2.DrainWorkerResponse:
        if not request.name:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, "name: required")
        try:
            moved = await self.cluster.drain(request.name)
        except KeyError:
            await context.abort(grpc.StatusCode.NOT_FOUND, f"name: no worker {request.name!r} is registered")
        return admin_pb2.DrainWorkerResponse(moved_tasks=moved)


def selection_status(stats) -> admin_pb2.SelectionStatus:
    """The selector's counters and its recent decision times."""
    times = sorted(stats.decision_s)

    def q(f: float) -> float:
        return times[min(len(times) - 1, int(f * len(times)))] * 1000 if times else 0.0

    return admin_pb2.SelectionStatus(decisions=stats.decisions, decision_p50_ms=q(0.5), decision_p99_ms=q(0.99),
                                     decision_max_ms=times[-1] * 1000 if times else 0.0, fitted=stats.fitted,
                                     refused=stats.refused, reassigned=stats.reassigned, lost_races=stats.lost_races,
                                     load_price=stats.price, offered_load=stats.offered_load,
                                     slowdown=stats.slowdown)


def adaptation_status(loop) -> admin_pb2.AdaptationStatus:
    """The adaptation loop's state and the configuration it applied last."""
    st, cfg = loop.state, loop.applied
    out = admin_pb2.AdaptationStatus(solves=st.solves, changes=st.changes, forecast_rps=st.forecast_rps,
                                     last_reason=st.last_reason, core_seconds=loop.core_seconds(), errors=st.errors,
                                     last_actions=st.last_actions)
    for row in loop.workers():
        out.workers.append(admin_pb2.AdaptedWorkers(**row))
    if cfg is not None:
        out.expected_accuracy, out.cost_cores, out.latency_ms = cfg.expected_accuracy, cfg.cost_cores, cfg.latency_ms
    return out
