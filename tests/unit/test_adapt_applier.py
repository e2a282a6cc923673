"""The ConfigApplier (services/scheduler/applier.py) against a fake cluster and fake worker admin
channels: a variant left out is parked at once (one thread on one cpu a kept worker holds) and
drained later; a stop with no kept worker's cpus known is not parked until they are; a variant
brought back is unparked and given its cores again."""
from __future__ import annotations

import asyncio
from dataclasses import dataclass

from prism.v1 import worker_pb2
from services.scheduler.applier import ConfigApplier
from services.scheduler.core.adapt import Action

ALLOWED = [0, 1]


@dataclass
class Inst:
    name: str
    address: str
    variant: str
    stages: tuple = ("encode", "prefill", "decode")
    draining: bool = False


class FakeCluster:
    def __init__(self, *insts: Inst) -> None:
        self.instances = list(insts)

    async def drain(self, name: str) -> None:
        next(i for i in self.instances if i.name == name).draining = True


class FakeChannel:
    """Answers GetCompute and SetCompute for one worker; records every share set."""

    def __init__(self) -> None:
        self.share = worker_pb2.ComputeShare(threads=1, cpus=ALLOWED, max_batch=4)
        self.sets: list[tuple[int, list[int], int]] = []

    def unary_unary(self, path, request_serializer=None, response_deserializer=None, **_):
        async def call(request, timeout=None):
            if path.endswith("GetCompute"):
                return worker_pb2.GetComputeResponse(share=self.share, allowed_cpus=ALLOWED)
            s = request.share
            self.share = worker_pb2.ComputeShare(threads=s.threads, cpus=list(s.cpus), max_batch=s.max_batch)
            self.sets.append((s.threads, list(s.cpus), s.max_batch))
            return worker_pb2.SetComputeResponse(applied=self.share)
        return call


def make(*insts: Inst):
    channels = {i.address: FakeChannel() for i in insts}
    applier = ConfigApplier(FakeCluster(*insts), channel_for=channels.__getitem__, stop_delay_s=5.0,
                            clock=lambda: 0.0)
    return applier, channels


def run(coro):
    return asyncio.run(coro)


def test_a_variant_left_out_is_parked_on_a_kept_cpu_at_once_and_drained_later():
    applier, ch = make(Inst("w-a", "a:1", "a"), Inst("w-b", "b:1", "b"))
    run(applier.apply([Action("start", "pipeline", "a", 1), Action("set_cores", "pipeline", "a", 2),
                       Action("start", "pipeline", "b", 1), Action("set_cores", "pipeline", "b", 1)]))
    assert ch["a:1"].sets == [(2, [0, 1], 4)] and ch["b:1"].sets == [(1, [0], 4)]
    done = run(applier.apply([Action("set_cores", "pipeline", "a", 1), Action("stop", "pipeline", "b", 0, 1)]))
    assert done[-1] == "w-b: parked on cpu 0 until drained"
    assert ch["a:1"].sets[-1] == (1, [0], 4) and ch["b:1"].sets[-1] == (1, [0], 4)
    assert applier.parked == {("pipeline", "b")} and applier.pending_stops == {("pipeline", "b"): 0.0}
    assert run(applier.settle(now=1.0)) == []  # within the stop delay: kept, parked, not set again
    assert len(ch["b:1"].sets) == 2
    assert run(applier.settle(now=6.0)) == ["w-b: drained"]
    assert applier.parked == set() and applier.pending_stops == {} and "b:1" not in applier.cpus


def test_a_stop_is_parked_only_once_a_kept_worker_has_cpus_and_unparked_when_brought_back():
    a, b = Inst("w-a", "a:1", "a"), Inst("w-b", "b:1", "b")
    applier, ch = make(a, b)
    applier.cluster.instances = [b]  # a's worker is still starting
    run(applier.apply([Action("start", "pipeline", "a", 1), Action("set_cores", "pipeline", "a", 1),
                       Action("stop", "pipeline", "b", 0, 1)]))
    assert applier.parked == set() and ch["b:1"].sets == []  # no kept cpu known: b keeps its share
    assert run(applier.settle(now=1.0)) == []
    applier.cluster.instances = [a, b]  # a is up (the loop's catch-up sets its cores)
    run(applier.apply([Action("set_cores", "pipeline", "a", 1)]))
    assert run(applier.settle(now=1.0)) == ["w-b: parked on cpu 0 until drained"]
    assert applier.parked == {("pipeline", "b")} and ch["b:1"].sets == [(1, [0], 4)]
    done = run(applier.apply([Action("start", "pipeline", "b", 1), Action("set_cores", "pipeline", "b", 2)]))
    assert "pipeline/b: stop cancelled, its workers kept" in done
    assert applier.parked == set() and ch["b:1"].sets[-1] == (2, [0, 1], 4)
