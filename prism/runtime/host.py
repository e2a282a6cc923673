"""A worker process hosting one or more stages (encode, prefill, decode) on one gRPC server.

Every stage takes its work from its own queue (`Backend.queue(stage, instance)`), so the
scheduler routes tasks to an instance by putting them there. Co-hosted stages share the compute
thread and the loaded weights, and hand data to each other in memory: a prefill task whose
embeddings were encoded by this same process takes the tensors from the local encoder, and a
decode task whose KV is held by the local prefill copies each layer straight into its slot, with
no serialization. The process registers itself (stages, address, slots) in the worker registry
and heartbeats; a worker that stops heartbeating is declared dead by the scheduler, which moves
its queued tasks and retries its requests elsewhere.
"""
from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from prism.queue.base import SHARED
from prism.runtime.backend import Backend, QueueOptions
from prism.runtime.stagework import ComputeThread, StageApp

log = logging.getLogger(__name__)

__all__ = ["HostContext", "LocalPeers", "ModelCache", "StageSpec", "WorkerHost"]


class LocalPeers:
    """The stage workers of this process, by stage, and the address they serve on: how a
    downstream stage recognises an upstream worker that lives in the same process."""

    def __init__(self) -> None:
        self.address = ""
        self.workers: dict[str, Any] = {}

    def local(self, stage: str, address: str) -> Any | None:
        """The co-hosted worker of `stage` when `address` is this process, else None."""
        if address and address == self.address:
            return self.workers.get(stage)
        return None


class ModelCache:
    """Loaded checkpoints by (parts, attention), so co-hosted stages share weights."""

    def __init__(self) -> None:
        self._loaded: dict[tuple, Any] = {}

    def get(self, options: Any, parts: frozenset[str], attn: str | None = None) -> Any:
        from prism.models.loading import attention_implementation

        import torch

        resolved = attn or attention_implementation(torch.device(options.device))
        key = (str(options.model_dir), options.dtype, options.device, resolved)
        cached = self._loaded.get(key)
        if cached is not None and parts <= cached[0]:
            return cached[1]
        want = parts | (cached[0] if cached else frozenset())
        loaded = options.load(want, resolved)
        self._loaded[key] = (want, loaded)
        return loaded


@dataclass
class HostContext:
    """What a stage's `build` gets from the process hosting it."""

    backend: Backend
    instance: str
    compute: ComputeThread
    models: ModelCache = field(default_factory=ModelCache)
    peers: LocalPeers = field(default_factory=LocalPeers)

    def queue(self, stage: str, max_depth: int):
        """The queue this worker takes `stage`'s tasks from: its own, or the stage's shared one
        (read as consumer `instance`)."""
        return self.backend.queue(stage, self.instance, max_depth=max_depth, consumer=self.instance)

    async def load(self, options: Any, parts: frozenset[str], attn: str | None = None) -> Any:
        return await self.compute.run(self.models.get, options, parts, attn)


@dataclass(frozen=True)
class StageSpec:
    """One stage to host: its name, its config and its `build(config, host) -> StageApp`."""

    stage: str
    config: Any
    build: Callable[[Any, HostContext], Awaitable[StageApp]]
    #: Reported to the registry: decode slots (decode only) and profiled tokens/s (0: unknown).
    slots: int = 0
    capacity: float = 0.0


class WorkerHost:
    """Builds and serves the stages of one process; registers it and heartbeats."""

    def __init__(self, specs: Sequence[StageSpec], server_config: Any, queue: QueueOptions, *,
                 model_name: str, threads: int = 0, variant: str = "", backend: Backend | None = None, handle_signals: bool = True):
        if not specs:
            raise ValueError("stages: at least one stage to host")
        if queue.shared_queues and server_config.worker_name == SHARED:
            raise ValueError(f"worker_name: {SHARED!r} names the stages' shared queues; choose another")
        self.specs = list(specs)
        self.server_config = server_config
        self.queue_options = queue
        self.model_name = model_name
        self.variant = variant
        self.handle_signals = handle_signals
        self._owns_backend = backend is None
        self.backend = backend or Backend(queue)
        self.ctx = HostContext(self.backend, server_config.worker_name, ComputeThread("worker", threads))
        self.apps: dict[str, StageApp] = {}
        self.server: Any = None
        self._workers: list[asyncio.Task] = []
        self._heartbeat: contextlib.AbstractAsyncContextManager | None = None
        self._follower: asyncio.Task | None = None

    @property
    def name(self) -> str:
        return self.ctx.instance

    @property
    def address(self) -> str:
        return self.server.address

    async def start(self) -> "WorkerHost":
        from prism.queue.registry import Heartbeat, WorkerInfo
        from prism.runtime.server import StageServer

        from prism.models.loading import ENCODER, LANGUAGE

        parts = frozenset(ENCODER if s.stage == "encode" else LANGUAGE for s in self.specs)
        if len(self.specs) > 1:  # load once what every co-hosted stage needs
            await self.ctx.load(self.specs[0].config.model, parts)
        for spec in self.specs:
            app = await spec.build(spec.config, self.ctx)
            self.apps[spec.stage] = app
            self.ctx.peers.workers[spec.stage] = app.parts.get("worker")
        from prism.runtime import workeradmin

        self.server = StageServer(
            self.server_config, service_names=[*(a.service_name for a in self.apps.values()), workeradmin.SERVICE_NAME],
            registrars=[*(a.register for a in self.apps.values()), workeradmin.register(self.ctx.compute)],
            drain_hooks=[self.drain_workers],
            handle_signals=self.handle_signals)
        await self.server.start()
        self.ctx.peers.address = self.server.address
        for app in self.apps.values():
            if app.run_worker is not None:
                self._workers.append(asyncio.create_task(app.run_worker()))
        info = WorkerInfo(
            name=self.name, address=self.server.address, model=self.model_name,
            stages=frozenset(s.stage for s in self.specs),
            capacity={s.stage: s.capacity for s in self.specs if s.capacity > 0},
            decode_slots=sum(s.slots for s in self.specs if s.stage == "decode"), pid=os.getpid(),
            started_at=time.time(), variant=self.variant)
        self._heartbeat = Heartbeat(self.backend.registry, info, ttl_s=self.queue_options.worker_ttl_s,
                                    every_s=self.queue_options.heartbeat_s)
        await self._heartbeat.__aenter__()
        if self.queue_options.shared_queues:
            self._follower = asyncio.create_task(self._follow_drain())
        return self

    async def _follow_drain(self) -> None:
        """With shared queues nobody routes to a worker, so an operator's drain (the registry's
        flag, set by the scheduler's DrainWorker) must stop this worker from reading: it closes
        its queues, puts back what it read ahead and finishes what it took."""
        while True:
            await asyncio.sleep(self.queue_options.heartbeat_s)
            try:
                info = await self.backend.registry.get(self.name)
            except Exception as exc:  # noqa: BLE001 - the registry restarting: ask again next beat
                log.debug("drain flag of %s unreadable: %s", self.name, exc)
                continue
            if info is not None and info.draining:
                log.info("worker %s was marked draining: it stops taking work", self.name)
                for app in self.apps.values():
                    if app.queue is not None:
                        await app.queue.close()
                return

    async def drain_workers(self) -> None:
        """Stop taking work (close the queues) and finish what was taken."""
        if self._heartbeat is not None:
            try:
                await self._heartbeat.set_draining(True)  # kept across re-registrations
            except Exception as exc:  # the registry may be unreachable; draining goes on
                log.warning("could not mark %s draining: %s", self.name, exc)
        for app in self.apps.values():
            if app.queue is not None:
                await app.queue.close()
        if self._workers:
            await asyncio.gather(*self._workers, return_exceptions=True)

    async def stop(self) -> None:
        """Drain and stop: deregisters (a clean exit), closes the backend."""
        if self.server is not None:
            await self.server.drain()
        await self._shutdown()

    async def _shutdown(self) -> None:
        if self._follower is not None:
            self._follower.cancel()
        for task in self._workers:
            if not task.done():
                task.cancel()
        if self._heartbeat is not None:
            hb, self._heartbeat = self._heartbeat, None
            await hb.__aexit__(None, None, None)
        for app in self.apps.values():
            if app.on_stop is not None:
                await app.on_stop()
        self.ctx.compute.shutdown()
        if self._owns_backend:
            await self.backend.close()

    async def serve(self) -> None:
        """Serve until SIGTERM (then drain and stop)."""
        await self.start()
        try:
            await self.server.wait()
        finally:
            await self._shutdown()
