"""The scheduler's view of its workers: who is alive (the registry), what is pending where (the
LoadBook), what each can do (profiled capacity), and the reaper that handles a worker that died.

A worker that stops heartbeating for `worker_ttl_s` is dead. Its tasks that had started
(TRANSFERRING, RUNNING, READY: their inputs or outputs lived in its memory) are failed with
UNAVAILABLE, which makes the pipeline retry their requests on live workers; the tasks still
waiting in its queues are moved to live workers of the same stage (at-least-once delivery).

With shared queues (`QueueOptions.shared_queues`) the workers of a stage take their tasks from
one queue, so the worker of a task is learnt from its events, and a dead worker's entries of a
shared queue (read ahead, or taken and not started) go back to it for another worker.
"""
from __future__ import annotations

import asyncio
import collections
import logging
from collections.abc import Iterable
from typing import Any

from prism.queue.base import SHARED, TaskState, UnknownTask, WorkQueue
from prism.runtime.backend import Backend
from services.scheduler.core import Instance, LoadBook, NoInstance, route
from services.scheduler.core.autoscale import capacity_from_profile

log = logging.getLogger(__name__)

#: Tokens per second assumed for a stage of a worker that reported none and has no profile yet.
DEFAULT_CAPACITY = {"encode": 2000.0, "prefill": 2000.0, "decode": 200.0}
#: Decode slots assumed of a decode stage that no live worker serves yet (shared queues).
STAND_IN_SLOTS = 8


class Cluster:
    def __init__(self, backend: Backend, model: str, *, refresh_s: float = 0.25,
                 default_capacity: dict[str, float] | None = None, profile_window: int = 32,
                 variants: dict[str, str] | None = None):
        self.backend = backend
        self.model = model
        #: Variant name -> the model name its workers register (a deployment of several
        #: variants); None: every worker of `model` is ours, of variant "".
        self.variants = dict(variants) if variants else None
        self.refresh_s = refresh_s
        self.default_capacity = dict(default_capacity or DEFAULT_CAPACITY)
        self.book = LoadBook()
        self.instances: list[Instance] = []
        self.infos: dict[str, Any] = {}
        self._profiles: dict[tuple[str, str], collections.deque] = {}
        self._cpu_profiles: dict[tuple[str, str], collections.deque] = {}
        self._profile_window = profile_window
        self._task: asyncio.Task | None = None
        self._stopping = False  # set by `stop`: the refresh loop ends
        self._reaping: set[str] = set()
        self.shared = backend.options.shared_queues

    # ---- registry ----------------------------------------------------------------------
    async def start(self) -> None:
        await self.refresh()
        self._task = asyncio.create_task(self._loop())

    async def stop(self) -> None:
        self._stopping = True
        if self._task is not None:
            self._task.cancel()
            try:
                await self._task
            except asyncio.CancelledError:
                pass

    async def _loop(self) -> None:
        # The flag, not only the cancellation, ends the loop: a cancellation landing inside a
        # Redis call may come out of the client as another error (caught below), and the loop
        # would then sleep on with the cancellation spent (a hang of `stop` seen in CI).
        while not self._stopping:
            await asyncio.sleep(self.refresh_s)
            try:
                await self.refresh()
            except Exception as exc:  # Redis restarting: keep the last view, retry next round
                if not self._stopping:
                    log.warning("registry refresh failed: %s", exc)

    async def refresh(self) -> None:
        registry = self.backend.registry
        live = [w for w in await registry.live() if self.serves(w)]
        self.infos = {w.name: w for w in live}
        self.instances = [self._instance(w) for w in live]
        dead = [n for n in await registry.known() if n not in self.infos and n not in self._reaping]
        for name in dead:
            info = await registry.get(name)
            if info is not None and not self.serves(info):
                continue
            self._reaping.add(name)
            try:
                await self.reap(name, info.stages if info is not None else frozenset(("encode", "prefill", "decode")))
                await registry.forget(name)
            finally:
                self._reaping.discard(name)

    def serves(self, w: Any) -> bool:
        """Whether registered worker `w` is one of this deployment's (its model and variant)."""
        if self.variants is None:
            return w.model == self.model
        return self.variants.get(getattr(w, "variant", "")) == w.model

    def _instance(self, w: Any) -> Instance:
        cap = {}
        for stage in w.stages:
            cap[stage] = (w.capacity.get(stage) or self.profiled(w.name, stage) or self.stage_profile(stage)
                          or self.default_capacity[stage])
        return Instance(name=w.name, address=w.address, stages=frozenset(w.stages), capacity=cap,
                        decode_slots=w.decode_slots if "decode" in w.stages else 0, draining=w.draining,
                        variant=getattr(w, "variant", ""))

    # ---- profiles ----------------------------------------------------------------------
    def record(self, instance: str, stage: str, tokens: int, seconds: float, cpu_seconds: float = 0.0) -> None:
        """A measured (tokens, seconds) of a stage's compute on an instance; `cpu_seconds`: the
        worker process's CPU time during it (0: not measured), for ``profiled(cpu=True)``."""
        for profiles, spent in ((self._profiles, seconds), (self._cpu_profiles, cpu_seconds)):
            if tokens > 0 and spent > 0:
                profiles.setdefault((instance, stage), collections.deque(maxlen=self._profile_window)).append(
                    (tokens, spent))

    def samples(self, instance: str, stage: str, *, cpu: bool = False) -> list[tuple[int, float]]:
        """The recent (tokens, seconds) measured of `stage` on `instance` (`cpu`: CPU seconds),
        oldest first."""
        return list((self._cpu_profiles if cpu else self._profiles).get((instance, stage), ()))

    def profiled(self, instance: str, stage: str, *, cpu: bool = False) -> float:
        """Tokens per second of `stage` on `instance` as measured (0: not measured); `cpu`: per CPU
        second, what it does with the cores to itself, whoever else was competing for them."""
        samples = self.samples(instance, stage, cpu=cpu)
        return capacity_from_profile(samples) if samples else 0.0

    def stage_profile(self, stage: str) -> float:
        """Tokens/s of a stage measured on any instance (same model, likely the same kind of
        device): what an instance not profiled yet is assumed to do, before the default."""
        samples = [x for (_, st), xs in self._profiles.items() if st == stage for x in xs]
        return capacity_from_profile(samples) if samples else 0.0

    # ---- queues ------------------------------------------------------------------------
    def queue(self, stage: str, instance: str) -> WorkQueue:
        return self.backend.queue(stage, instance)

    def records(self, stage: str) -> WorkQueue:
        """A handle for operations on task records by id (state, cancel) whatever worker's queue
        holds them: in Redis the records are shared by the namespace; it touches no worker's
        stream. (In memory each queue keeps its own records; nothing outlives the process.)"""
        return self.backend.queue(stage, "scheduler")

    @property
    def routable(self) -> list[Instance]:
        """The instances to plan on: the live ones and, with shared queues, a stand-in for the
        stages no live worker serves (their tasks wait in the shared queue until one starts, as
        when an autoscaler brings a stage up from zero), assumed to have the default capacity."""
        if not self.shared:
            return self.instances
        missing = {"encode", "prefill", "decode"} - {s for i in self.instances if not i.draining for s in i.stages}
        if not missing:
            return self.instances
        stand_in = Instance(name=SHARED, address="", stages=frozenset(missing),
                            capacity={s: self.stage_profile(s) or self.default_capacity[s] for s in missing},
                            decode_slots=STAND_IN_SLOTS if "decode" in missing else 0)
        return [*self.instances, stand_in]

    async def address_of(self, name: str) -> str:
        """The address of live worker `name` (the registry is read again when this view lacks it:
        a worker that just started may have taken a task from a shared queue already)."""
        if name not in self.infos:
            await self.refresh()
        info = self.infos.get(name)
        if info is None:
            raise NoInstance("any", f"worker {name!r} is not live")
        return info.address

    async def reap(self, name: str, stages: Iterable[str]) -> int:
        """Handle a dead worker: fail its started tasks (their requests are retried), move its
        waiting ones to live workers. Returns the number of tasks failed or moved."""
        touched = 0
        tasks = list(self.book.requests_on(name))
        if self.shared:
            from prism.queue.redis_reclaim import consumer_tasks

            booked = set(tasks)
            for stage in stages:  # what it took from the shared queues, maybe not booked to it yet
                tasks += [(t, stage) for t in await consumer_tasks(
                    self.backend.client, namespace=self.backend.options.namespace, stage=stage,
                    instance=SHARED, consumer=name) if (t, stage) not in booked]
        for task_id, stage in tasks:
            queue = self.queue(stage, name)
            try:
                state = await queue.state(task_id)
                if state is not None and not state.terminal and state is not TaskState.QUEUED:
                    await queue.set_state(task_id, TaskState.FAILED, code="UNAVAILABLE",
                                          message=f"worker {name} was lost", lost_worker=name)
                    touched += 1
            except UnknownTask:
                pass
        if self.shared:  # the entries it had read, taken or not: back to the shared queue
            from prism.queue.redis_reclaim import move_tasks

            for stage in stages:
                moved = await move_tasks(self.backend.client, namespace=self.backend.options.namespace,
                                         stage=stage, from_instance=SHARED, consumer=name,
                                         route=lambda item: SHARED)
                touched += len(moved)
        elif self.backend.durable:
            from prism.queue.redis_reclaim import move_tasks

            for stage in stages:
                try:
                    moved = await move_tasks(self.backend.client, namespace=self.backend.options.namespace,
                                             stage=stage, from_instance=name, route=self._router(stage, name))
                except NoInstance as exc:
                    log.error("cannot move the %s tasks of dead worker %s: %s", stage, name, exc)
                    continue
                touched += len(moved)
        log.warning("worker %s is gone: %d of its tasks failed over", name, touched)
        return touched

    async def drain(self, name: str) -> int:
        """Stop routing to `name` and move its waiting tasks to other workers."""
        registry = self.backend.registry
        if not await registry.set_draining(name, True):
            raise KeyError(name)
        await self.refresh()
        if not self.backend.durable or self.shared:  # a draining worker puts back what it read ahead
            return 0
        from prism.queue.redis_reclaim import move_tasks

        info = await registry.get(name)
        moved = 0
        for stage in info.stages if info is not None else ():
            # Only entries never delivered: what the worker took, it finishes while draining.
            moved += len(await move_tasks(self.backend.client, namespace=self.backend.options.namespace,
                                          stage=stage, from_instance=name, route=self._router(stage, name),
                                          min_idle_ms=10**12))
        return moved

    def _router(self, stage: str, away_from: str):
        """`move_tasks`'s route: the least loaded other live instance of `stage`, booked there."""
        variant = next((i.variant for i in self.instances if i.name == away_from), None)
        if variant is None and away_from in self.infos:
            variant = getattr(self.infos[away_from], "variant", "")
        # only to a worker of the same variant: another variant's layers cannot take its inputs
        peers = [i for i in self.instances if variant is None or i.variant == variant]

        def choose(item) -> str:
            target = route(stage, peers, self.book, exclude=(away_from,))
            self.book.move(item.task_id, stage, target.name, from_instance=away_from)
            return target.name

        return choose
