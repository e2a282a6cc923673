"""Wiring of the scheduler (front door): config -> served model, queue backend, cluster view,
policies -> pipeline -> public and admin servicers, with the registry, autoscaling and
request-lease loops running beside them."""
from __future__ import annotations

import asyncio
import logging

import grpc

from prism.runtime import metrics
from prism.runtime.backend import Backend
from prism.runtime.stagework import StageApp
from prism.runtime.telemetry import inject_trace_context
from prism.v1 import admin_pb2_grpc, prism_pb2_grpc
from services.scheduler.adapting import AdaptationLoop
from services.scheduler.admin import AdminServicer, Scaling
from services.scheduler.applier import ConfigApplier
from services.scheduler.auth import ApiKeyInterceptor
from services.scheduler.cluster import Cluster
from services.scheduler.config import SchedulerConfig
from services.scheduler.core import Admission, Limits, Placement
from services.scheduler.core.variants import Variant, VariantMix
from services.scheduler.intake import ServedModel
from services.scheduler.pipeline import Pipeline
from services.scheduler.servicer import PrismServicer

SERVICE_NAMES = ("prism.v1.PrismService", "prism.v1.SchedulerAdminService")

log = logging.getLogger(__name__)


async def build(config: SchedulerConfig, backend: Backend | None = None) -> StageApp:
    model = await asyncio.to_thread(ServedModel.load, config.served_name, config.model_dir, config.max_context)
    owns_backend = backend is None
    backend = backend or Backend(config.queue)
    policy = config.policy
    variant_list = config.variant_list()
    variants = mix = None
    if variant_list:  # each variant: its own processor, its own workers (registered under its name)
        variants = {name: await asyncio.to_thread(ServedModel.load, config.served_name, path, config.max_context)
                    for name, path, _ in variant_list}
        mix = VariantMix([Variant(name, accuracy, str(path)) for name, path, accuracy in variant_list])
    cluster = Cluster(backend, model.name, default_capacity=policy.capacity,
                      variants={name: path.resolve().name for name, path, _ in variant_list} or None)
    placement = Placement(policy.placement, colocate_below=policy.colocate_below,
                          stall_budget_s=policy.colocate_stall_ms / 1000)
    admission = Admission(Limits(queue_tokens=policy.queue_tokens, max_inflight=policy.max_inflight), placement)
    scaling = Scaling(cluster, policy)

    adaptation = None  # set below when --adapt

    def on_admit(cost) -> None:
        for stage in cost.stages:
            scaling.rates.arrived(stage, cost.cost(stage))
        if adaptation is not None:
            adaptation.arrived()

    def on_finish(adm, progress, final) -> None:
        t = final.timing
        scaling.slo.record(t.ttft_ms / 1000, t.tpot_ms / 1000 if t.tpot_ms else None,
                           adm.ttft_target_s, adm.tpot_target_s)
        metrics.TTFT.labels(model.name).observe(t.ttft_ms / 1000)
        metrics.E2E.labels(model.name).observe(t.e2e_ms / 1000)
        if final.usage.generated_tokens > 1:
            metrics.TPOT.labels(model.name).observe(t.tpot_ms / 1000)
        metrics.GENERATED.labels(model.name).inc(final.usage.generated_tokens)
        if adm.reduction is not None:
            metrics.REDUCTIONS.labels(model.name, adm.reduction.id).inc()

    pipeline = Pipeline(cluster, placement, admission, inject_trace=lambda: dict(inject_trace_context()),
                        max_attempts=policy.request_attempts, on_admit=on_admit, on_finish=on_finish)
    profile = None
    if config.selection_profile:
        from prism.profiling.schema import load as load_profile

        profile = load_profile(config.selection_profile)
    servicer = PrismServicer({model.name: model}, model.name, config.limits, pipeline, backend.store,
                             owner=config.server.worker_name, lease_s=config.request_lease_s, profile=profile,
                             selection_flow=config.selection_flow(), variants=variants, mix=mix,
                             load_price=config.selection_load_price(),
                             slowdown=config.selection_slowdown())
    applier = ConfigApplier(cluster, mix, inflight=lambda: [p.adm.variant for p in pipeline.inflight.values()
                                                             if p.adm is not None],
                            stop_delay_s=config.adapt.adapt_stop_delay_s)
    if config.adapt.adapt:
        served = {"pipeline": [name for name, _, _ in variant_list]} if variant_list else {}
        wanted = set(served.get("pipeline", ()))
        started = asyncio.get_running_loop().time()

        def ready() -> bool:  # every variant has a worker (or the start-up wait is over)
            live = {i.variant for i in cluster.instances if not i.draining}
            return (bool(live) and wanted <= live) or asyncio.get_running_loop().time() - started > config.worker_wait_s

        adaptation = AdaptationLoop(config.adapt.adapter(), applier, tick_s=min(1.0, config.adapt.adapt_period_s),
                                    served=served, ready=ready,
                                    live=lambda: frozenset(i.name for i in cluster.instances if not i.draining))
    admin = AdminServicer(cluster, pipeline, scaling, servicer.selector, adaptation)

    def register(server: grpc.aio.Server) -> None:
        prism_pb2_grpc.add_PrismServiceServicer_to_server(servicer, server)
        admin_pb2_grpc.add_SchedulerAdminServiceServicer_to_server(admin, server)

    loops: list[asyncio.Task] = []

    async def run() -> None:
        await cluster.start()
        loops.append(asyncio.create_task(scaling.run()))
        loops.append(asyncio.create_task(servicer.keep_leases(min(1.0, config.request_lease_s / 3))))
        if servicer.selector.enabled:
            loops.append(asyncio.create_task(servicer.selector.run()))
        if adaptation is not None:
            loops.append(asyncio.create_task(adaptation.run()))
        await asyncio.gather(*loops, return_exceptions=True)

    async def on_stop() -> None:
        for task in loops:
            task.cancel()
        await cluster.stop()
        await applier.close()
        await servicer.stop()
        if owns_backend:
            await backend.close()

    ring = config.key_ring()
    if ring.enabled:
        log.info("API keys required at the front door: %d keys (%s)", len(ring), ", ".join(k.name for k in ring.keys))
    else:
        log.warning("no API keys configured: the front door accepts any caller (set --api-keys-file or "
                    "PRISM_SCHEDULER_API_KEYS)")
    interceptors = (ApiKeyInterceptor(ring),) if ring.enabled else ()
    return StageApp(SERVICE_NAMES[0], register, None, run, on_stop,
                    {"servicer": servicer, "pipeline": pipeline, "cluster": cluster, "admin": admin, "applier": applier,
                     "adaptation": adaptation,
                     "scaling": scaling, "backend": backend}, SERVICE_NAMES[1:], interceptors)
