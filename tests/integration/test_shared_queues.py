"""Shared stage queues over a real redis-server (`QueueOptions.shared_queues`): every worker of
a stage reads one stream, so the stage's backlog is what an autoscaler such as KEDA watches
(XINFO GROUPS lag and pending), a stage may have no worker at all while work waits for one, and
the worker of each task is learnt from its events (the embeddings' and the KV's addresses are
bound late). Outputs stay token-exact against `model.generate`."""
from __future__ import annotations

import asyncio

import pytest
import redis.asyncio as aioredis

from prism.queue.base import TaskState, WorkItem
from prism.queue.redis_queue import GROUP, SHARED
from prism.runtime.backend import Backend, QueueOptions
from prism.v1 import admin_pb2
from services.scheduler.cluster import Cluster
from tests.conftest import png_bytes, random_image
from tests.integration.cluster import LocalCluster, chat, collect
from tests.oracle import Oracle

STAGES = ("encode", "prefill", "decode")


@pytest.fixture(scope="module")
def oracle(tiny_models) -> Oracle:
    return Oracle(tiny_models["llava"])


def shared(redis_url: str) -> QueueOptions:
    return QueueOptions(redis_url=redis_url, heartbeat_s=0.2, worker_ttl_s=1.0, shared_queues=True)


async def groups(client: aioredis.Redis, stage: str) -> dict:
    """KEDA's reading of a stage: lag and pending of group 'workers' on its shared stream."""
    key = f"prism:q:{stage}:{SHARED}"
    if not await client.exists(key):
        return {"lag": 0, "pending": 0}
    (group,) = await client.xinfo_groups(key)
    return {"lag": group["lag"], "pending": group["pending"]}


async def test_shared_queues_serve_exact_tokens_from_one_stream_per_stage(tiny_models, oracle, redis_url):
    layout = [("encode",), ("encode",), ("prefill",), ("decode",), ("decode",)]
    async with LocalCluster(tiny_models["llava"], layout, queue=shared(redis_url), slots=4) as c:
        cases = [(f"shared {i}", [png_bytes(70 + j) for j in range(i % 3)], 3 + i) for i in range(8)]
        async with asyncio.timeout(120):
            results = await asyncio.gather(*[collect(c.stub, chat(t, imgs, n)) for t, imgs, n in cases])
        for (text, imgs, n), (tokens, last) in zip(cases, results):
            assert tokens == oracle.chat(text, [random_image(70 + j) for j in range(len(imgs))], n), text
        client = aioredis.from_url(redis_url)
        try:
            queues = sorted(k.decode() for k in await client.keys("prism:q:*"))
            assert queues == [f"prism:q:{s}:{SHARED}" for s in ("decode", "encode", "prefill")]
            for stage in STAGES:
                assert await groups(client, stage) == {"lag": 0, "pending": 0}
                assert await client.xlen(f"prism:q:{stage}:{SHARED}") == 0
        finally:
            await client.aclose()
        took = {n: sum(c.worker(n, "decode").batch_sizes) for n in c.named(("decode",))}
        assert sum(took.values()) > 0
        status = await c.status()
        assert status.in_flight == 0 and all(s.queued == 0 for s in status.stages)


async def test_a_stage_with_no_worker_queues_its_work_until_one_starts(tiny_models, oracle, redis_url):
    """Scale from zero: the request is accepted with no decode worker alive; its decode task
    waits in the shared stream (lag 1: what activates a KEDA ScaledObject); a decode worker
    that starts later takes it and the caller gets exactly the oracle's tokens."""
    client = aioredis.from_url(redis_url)
    async with LocalCluster(tiny_models["llava"], [("encode",), ("prefill",)], queue=shared(redis_url)) as c:
        call = asyncio.create_task(collect(c.stub, chat("from zero", [png_bytes(3)], 7)))
        async with asyncio.timeout(30):
            while (await groups(client, "decode"))["lag"] < 1:
                assert not call.done(), call
                await asyncio.sleep(0.05)
        status = await c.status()
        decode = next(s for s in status.stages if s.stage == "decode")
        assert decode.queued == 1 and decode.actual_replicas == 0
        await c.add_worker(("decode",))
        tokens, last = await asyncio.wait_for(call, 60)
        assert tokens == oracle.chat("from zero", [random_image(3)], 7)
        assert last.finish_reason != 0
        for stage in STAGES:
            assert await groups(client, stage) == {"lag": 0, "pending": 0}
    await client.aclose()


async def test_a_drained_worker_stops_reading_the_shared_queue(tiny_models, oracle, redis_url):
    layout = [("prefill",), ("decode",), ("decode",)]
    async with LocalCluster(tiny_models["llava"], layout, queue=shared(redis_url), slots=2) as c:
        drained, other = c.named(("decode",))
        await c.admin.DrainWorker(admin_pb2.DrainWorkerRequest(name=drained))
        worker = c.worker(drained, "decode")
        async with asyncio.timeout(10):
            while not c.hosts[drained].apps["decode"].queue.closed:
                await asyncio.sleep(0.05)
        before = list(worker.batch_sizes)
        cases = [(f"after drain {i}", 4 + i) for i in range(4)]
        async with asyncio.timeout(60):  # a stall fails here, named
            results = await asyncio.gather(*[collect(c.stub, chat(t, [], n)) for t, n in cases])
        for (text, n), (tokens, _) in zip(cases, results):
            assert tokens == oracle.chat(text, [], n)
        assert list(worker.batch_sizes) == before  # every decode went to the other worker
        assert sum(c.worker(other, "decode").batch_sizes) >= len(cases)


async def test_reaper_fails_what_a_dead_reader_started_and_gives_back_the_rest(redis_url):
    backend = Backend(shared(redis_url))
    cluster = Cluster(backend, "m")
    doomed = Backend(shared(redis_url))
    try:
        queue = cluster.queue("decode", "anyone")
        for name in ("r1", "r2", "r3"):
            await queue.put(WorkItem(task_id=name, payload=b"x", cost=4))
        mine = doomed.queue("decode", "w-dead", consumer="w-dead")
        taken = await mine.get(timeout=1)
        await mine.set_state(taken.task_id, TaskState.RUNNING, worker="w-dead")
        assert (await mine.get(timeout=1)).task_id == "r2"  # taken, not started
        await doomed.client.aclose()  # the worker dies: nothing more from it
        touched = await cluster.reap("w-dead", ["decode"])
        assert touched == 2
        assert await queue.state("r1") is TaskState.FAILED
        events = [e async for e in queue.watch("r1")]
        assert events[-1].detail["code"] == "UNAVAILABLE"
        survivor = backend.queue("decode", "w-live", consumer="w-live")
        got = [await survivor.get(timeout=1), await survivor.get(timeout=1)]
        assert sorted((g.task_id, g.attempt) for g in got) == [("r2", 2), ("r3", 1)]
        names = {c["name"] for c in await backend.client.xinfo_consumers(f"prism:q:decode:{SHARED}", GROUP)}
        assert names == {b"w-live"}
    finally:
        doomed._client = None
        await doomed.close()
        await backend.close()
