"""Applying a pipeline configuration to the running workers: the thin adapter between the
adaptation core's actions (`services.scheduler.core.adapt.diff`) and the live system.

* ``set_cores`` / ``set_batch``: each live worker of the variant serving the stage changes its
  compute share in place (`WorkerAdminService.SetCompute`, applied between batches);
* ``set_share``: the variant mix's routing weights (requests pinning no variant);
* ``start`` / ``scale``: the replicas wanted per (stage, variant), handed to `on_replicas` (the
  launcher's scale loop, or an operator's hook); the count is also kept in `replicas`;
* ``stop``: weights first, scale later. The variant takes no more traffic at once (weight 0),
  but its workers keep running; `settle` (the loop calls it every tick) DRAINS them later (they
  finish what they took; they are never killed) once (a) every variant the configuration keeps
  has a live worker of each stage it serves, (b) no request of the variant is in flight, and
  (c) it has been out for `stop_delay_s`. A configuration that brings the variant back before
  then cancels the stop: its workers were never touched, nothing restarts. Workers above a
  lowered replica count are drained by `settle` under the same (a).
* parking: a variant left out is at once shrunk in place (SetCompute: one thread, affinity to
  ONE cpu that a kept variant's worker was given by ``set_cores``) while it waits for its drain,
  so that it holds no core the configuration does not already pay for. Such a stop is
  ``parked``; the adaptation loop counts the cores of pending stops that are NOT parked (no kept
  worker's cpus known yet, e.g. the kept variant still starting) on top of the configuration's.
  A parked worker still finishes what it took, on that shared cpu. A configuration bringing it
  back sets its cores again (``start`` comes with ``set_cores``).

None of these fails or loses a request in flight: shares change between batches, routing
weights only steer new requests, a variant is never drained while the configuration's other
variants have no live worker to take the traffic (the launcher's workers may still be starting),
and a drained worker finishes its work.
"""
from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterable
from typing import Any

import grpc

from prism.v1 import worker_pb2, worker_pb2_grpc
from services.scheduler.cluster import Cluster
from services.scheduler.core.variants import VariantMix

log = logging.getLogger(__name__)

PIPELINE = "pipeline"  # a variant of the whole path: every stage of its workers


class ConfigApplier:
    def __init__(self, cluster: Cluster, mix: VariantMix | None = None, *,
                 channel_for: Callable[[str], grpc.aio.Channel] | None = None,
                 on_replicas: Callable[[str, str, int], Any] | None = None, timeout_s: float = 30.0,
                 inflight: Callable[[], Iterable[str]] | None = None, stop_delay_s: float = 0.0,
                 clock: Callable[[], float] | None = None):
        self.cluster, self.mix = cluster, mix
        #: The variants of the requests in flight (one per request), so that a variant is drained
        #: only once nothing of it is queued: a drained worker finishes what it took, but tasks
        #: still waiting in its own queue would have no other worker of their variant.
        self.inflight = inflight
        #: Seconds a variant left out of the configuration keeps its (idle) workers before they
        #: are drained: a configuration bringing it back meanwhile restarts nothing.
        self.stop_delay_s = stop_delay_s
        self.clock = clock or time.monotonic
        #: (stage, variant) left out of the configuration, not drained yet -> when it was left out.
        self.pending_stops: dict[tuple[str, str], float] = {}
        #: Pending stops whose workers are parked on a cpu of the kept configuration (docstring).
        self.parked: set[tuple[str, str]] = set()
        #: The cpus each worker (by address) was last given by `set_cores` or parking.
        self.cpus: dict[str, tuple[int, ...]] = {}
        self._channel_for = channel_for
        self._own: dict[str, grpc.aio.Channel] = {}
        self.on_replicas = on_replicas
        self.timeout_s = timeout_s
        #: Replicas wanted per (stage, variant), as the last configuration applied says.
        self.replicas: dict[tuple[str, str], int] = {}
        #: What was done, one line per action (the admin log, tests).
        self.log: list[str] = []

    def _channel(self, address: str) -> grpc.aio.Channel:
        if self._channel_for is not None:
            return self._channel_for(address)
        if address not in self._own:
            self._own[address] = grpc.aio.insecure_channel(address)
        return self._own[address]

    async def close(self) -> None:
        for channel in self._own.values():
            await channel.close()
        self._own.clear()

    def workers(self, stage: str, variant: str) -> list[Any]:
        """The live, non-draining instances of `variant` serving `stage` (any stage for a
        whole-pipeline variant)."""
        return [i for i in self.cluster.instances if not i.draining and i.variant == variant
                and (stage == PIPELINE or stage in i.stages)]

    async def set_compute(self, address: str, *, threads: int = 0, cpus: Iterable[int] = (),
                          max_batch: int = -1) -> worker_pb2.SetComputeResponse:
        """One worker's compute share, in place (returns once its compute thread applied it).
        `max_batch` < 0 keeps the worker's bound."""
        stub = worker_pb2_grpc.WorkerAdminServiceStub(self._channel(address))
        if max_batch < 0:
            current = await stub.GetCompute(worker_pb2.GetComputeRequest(), timeout=self.timeout_s)
            max_batch = current.share.max_batch
        share = worker_pb2.ComputeShare(threads=threads, cpus=list(cpus), max_batch=max_batch)
        return await stub.SetCompute(worker_pb2.SetComputeRequest(share=share), timeout=self.timeout_s)

    async def _cores(self, address: str, cores: int, index: int) -> list[int]:
        """`cores` CPUs for the `index`-th worker of a group: consecutive, rotated by the index
        so that workers on one machine spread over its cores."""
        stub = worker_pb2_grpc.WorkerAdminServiceStub(self._channel(address))
        allowed = list((await stub.GetCompute(worker_pb2.GetComputeRequest(), timeout=self.timeout_s)).allowed_cpus)
        cores = max(1, min(cores, len(allowed)))
        start = (index * cores) % len(allowed)
        return sorted((allowed + allowed)[start:start + cores])

    async def apply(self, actions: Iterable[Any]) -> list[str]:
        """Carries out `actions` (objects with kind, stage, variant, value, as `diff` makes them),
        in order; returns what was done. Stops only take the variant's traffic away; `settle`
        drains it later (module docstring)."""
        shares: dict[str, float] = {}
        stopped: set[str] = set()
        done: list[str] = []
        for a in actions:
            kind, stage, variant = a.kind, a.stage, a.variant
            if kind in ("set_cores", "set_batch"):
                for k, inst in enumerate(self.workers(stage, variant)):
                    if kind == "set_cores":
                        cpus = await self._cores(inst.address, int(a.value), k)
                        await self.set_compute(inst.address, threads=len(cpus), cpus=cpus)
                        self.cpus[inst.address] = tuple(cpus)
                    else:
                        await self.set_compute(inst.address, max_batch=int(a.value))
                    done.append(f"{inst.name}: {kind} {a.value}")
            elif kind == "set_share":
                shares[variant] = max(float(a.value), 0.0)
            elif kind in ("start", "scale"):
                self.replicas[(stage, variant)] = int(a.value)
                self.parked.discard((stage, variant))
                if self.pending_stops.pop((stage, variant), None) is not None:
                    done.append(f"{stage}/{variant}: stop cancelled, its workers kept")
                if self.on_replicas is not None:
                    await _maybe_await(self.on_replicas(stage, variant, int(a.value)))
                done.append(f"{stage}/{variant}: {int(a.value)} replicas")
            elif kind == "stop":
                self.replicas[(stage, variant)] = 0
                shares[variant] = 0.0  # no new request picks it; settle drains it later
                stopped.add(variant)
                self.pending_stops.setdefault((stage, variant), self.clock())
                done.append(f"{stage}/{variant}: out of the configuration, drained once the rest is live")
            else:
                raise ValueError(f"unknown action kind {kind!r}")
        kept = [v for v in shares if v not in stopped]
        if kept and not any(shares[v] for v in kept):  # solved for no traffic: the kept variants share it
            shares.update({v: 1.0 for v in kept})
        self._weigh(shares, done)
        for key in [k for k in self.pending_stops if k[1] in stopped]:
            done += await self._park(*key)
        for line in done:
            log.info("adaptation: %s", line)
        self.log += done
        return done

    async def _park(self, stage: str, variant: str) -> list[str]:
        """Shrinks the workers of a pending stop to one thread on one cpu a kept worker holds
        (module docstring); returns what was done (nothing when no kept worker's cpus are known)."""
        if (stage, variant) in self.parked:
            return []
        kept = {c for (s, v), n in self.replicas.items() if n > 0 and (s, v) not in self.pending_stops
                for inst in self.workers(s, v) for c in self.cpus.get(inst.address, ())}
        if not kept:
            return []
        cpu = min(kept)
        done = []
        for inst in self.workers(stage, variant):
            await self.set_compute(inst.address, threads=1, cpus=[cpu])
            self.cpus[inst.address] = (cpu,)
            done.append(f"{inst.name}: parked on cpu {cpu} until drained")
        self.parked.add((stage, variant))
        return done

    def live_for(self, stage: str, variant: str) -> bool:
        """Whether `variant` has a live, non-draining worker for `stage` (each of the stages, for
        a whole-pipeline variant)."""
        if stage != PIPELINE:
            return bool(self.workers(stage, variant))
        stages = {s for i in self.cluster.instances if i.variant == variant for s in i.stages}
        return bool(stages) and all(self.workers(s, variant) for s in stages)

    async def settle(self, now: float | None = None) -> list[str]:
        """Drains what the configuration left out or above its replica counts, once that is safe
        (module docstring); returns what was done."""
        now = self.clock() if now is None else now
        done: list[str] = []
        kept = [(stage, v) for (stage, v), n in self.replicas.items() if n > 0]
        if not all(self.live_for(stage, v) for stage, v in kept):
            return done  # a kept variant's workers are still starting: the old ones carry its traffic
        busy = set(self.inflight()) if self.inflight is not None else set()
        for (stage, variant), since in list(self.pending_stops.items()):
            if now - since < self.stop_delay_s or variant in busy:
                done += await self._park(stage, variant)  # the kept workers' cpus may be known now
                continue
            for inst in self.workers(stage, variant):
                await self.cluster.drain(inst.name)
                self.cpus.pop(inst.address, None)
                done.append(f"{inst.name}: drained")
            del self.pending_stops[(stage, variant)]
            self.parked.discard((stage, variant))
            if self.on_replicas is not None:
                await _maybe_await(self.on_replicas(stage, variant, 0))
        for stage, variant in kept:
            n, groups = self.replicas[(stage, variant)], {}
            for inst in self.workers(stage, variant):  # n of each kind of process (its stages)
                groups.setdefault(inst.stages, []).append(inst)
            for inst in [i for g in groups.values() for i in g[n:]]:  # its queued tasks go to the others
                await self.cluster.drain(inst.name)
                done.append(f"{inst.name}: drained (above {n} replicas)")
        for line in done:
            log.info("adaptation: %s", line)
        self.log += done
        return done

    def _weigh(self, shares: dict[str, float], done: list[str]) -> None:
        """The variant mix's weights with `shares` applied (kept when all would be 0)."""
        if self.mix is None:
            return
        weights = dict(self.mix.weights)
        weights.update({v: s for v, s in shares.items() if v in weights})
        if any(weights.values()) and weights != dict(self.mix.weights):
            self.mix.set_weights(weights)
            done.append(f"variant weights {weights}")


async def _maybe_await(value: Any) -> None:
    import inspect

    if inspect.isawaitable(value):
        await value
