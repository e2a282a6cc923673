"""The scheduler and its workers over a real redis-server (each part with its own connection,
as separate processes have): token-exact outputs under concurrent load with batching, a
cancelled stream freeing its slot, malformed queue messages and messages naming a vanished
request dead-lettered with a reason (never retried)."""
from __future__ import annotations

import asyncio

import pytest
import redis.asyncio as aioredis

from prism.queue.base import TaskState
from tests.conftest import png_bytes, random_image
from tests.integration.cluster import LocalCluster, chat, collect
from tests.oracle import Oracle


@pytest.fixture(scope="module")
def oracle(tiny_models) -> Oracle:
    return Oracle(tiny_models["llava"])


async def wait_until(predicate, timeout: float = 5.0) -> bool:
    loop = asyncio.get_running_loop()
    until = loop.time() + timeout
    while not await predicate():
        if loop.time() > until:
            return False
        await asyncio.sleep(0.02)
    return True


async def test_concurrent_requests_over_redis_are_exact_and_batched(tiny_models, oracle, redis_url):
    layout = [("encode",), ("encode",), ("prefill",), ("decode",)]
    async with LocalCluster(tiny_models["llava"], layout, redis_url=redis_url, slots=8) as c:
        cases = [(f"over redis {i}", [png_bytes(50 + j) for j in range(i % 3)], 3 + i) for i in range(8)]
        results = await asyncio.gather(*[collect(c.stub, chat(t, imgs, n)) for t, imgs, n in cases])
        for (text, imgs, n), (tokens, last) in zip(cases, results):
            images = [random_image(50 + j) for j in range(len(imgs))]
            assert tokens == oracle.chat(text, images, n), text
        decode = c.worker(c.named(("decode",))[0], "decode")
        assert max(decode.batch_sizes) > 1
        spread = [sum(c.worker(n, "encode").batch_sizes) for n in c.named(("encode",))]
        assert all(count > 0 for count in spread), spread  # both encoders took work
        status = await c.status()
        assert status.in_flight == 0 and all(s.queued == 0 for s in status.stages)


async def test_cancelled_stream_frees_its_decode_slot_over_redis(tiny_models, oracle, redis_url):
    async with LocalCluster(tiny_models["llava"], [("prefill",), ("decode",)], redis_url=redis_url, slots=2) as c:
        engine = c.engine(c.named(("decode",))[0], "decode")
        call = c.stub.Generate(chat("count forever", [], 400, ))
        seen = 0
        async with asyncio.timeout(60):  # a stall fails here, named, instead of at pytest's timeout
            async for message in call:
                seen += len(message.token_ids)
                if seen >= 3:
                    break
        call.cancel()

        async def freed() -> bool:
            return engine.free_slots == 2 and engine.num_active == 0

        assert await wait_until(freed, 5.0)
        async with asyncio.timeout(60):
            tokens, _ = await collect(c.stub, chat("again", [], 5))
        assert tokens == oracle.chat("again", [], 5)


async def test_malformed_and_orphaned_messages_are_dead_lettered_once(tiny_models, oracle, redis_url):
    async with LocalCluster(tiny_models["llava"], [("prefill",), ("decode",)], redis_url=redis_url) as c:
        client = aioredis.from_url(redis_url)
        prefill = c.named(("prefill",))[0]
        queue = c.parts["cluster"].queue("prefill", prefill)
        await queue.depth()  # the stream and its group exist
        stream = f"prism:q:prefill:{prefill}"
        # 1. Garbage: no task id, a non-numeric priority.
        await client.xadd(stream, {"payload": b"\x00\x01", "priority": b"high"})
        # 2. A well-formed message whose payload is not a PrefillRequest.
        from prism.queue.base import WorkItem

        await queue.put(WorkItem(task_id="not-a-proto", payload=b"\xff\xff\xff"))
        # 3. A message whose request vanished (its task record is gone).
        await queue.put(WorkItem(task_id="vanished", payload=b""))
        await client.delete("prism:task:vanished")

        async def three_dead() -> bool:
            return len(await queue.dead_letters()) >= 3

        assert await wait_until(three_dead, 10.0)
        letters = dict(await queue.dead_letters())
        reasons = list(letters.values())
        assert any("task_id" in r or "priority" in r for r in reasons), reasons
        assert "payload" in letters["not-a-proto"]
        assert "vanished" in letters["vanished"]
        assert await queue.state("not-a-proto") is TaskState.FAILED
        # The worker goes on serving, and nothing is retried.
        tokens, _ = await collect(c.stub, chat("still serving", [], 4))
        assert tokens == oracle.chat("still serving", [], 4)
        await asyncio.sleep(0.5)
        assert len(await queue.dead_letters()) == 3
        assert await queue.depth() == 0
        await client.aclose()


async def test_redis_restart_under_load_loses_no_request(tiny_models, oracle, redis_proc):
    """Redis restarted (SIGTERM, AOF flushed) while four requests are in their stages: every
    client connection rides it out and each stream is complete and exact."""
    layout = [("encode",), ("prefill",), ("decode",)]
    async with LocalCluster(tiny_models["llava"], layout, redis_url=redis_proc.url, slots=4) as c:
        cases = [(f"restart {i}", [png_bytes(70 + i)] if i % 2 else [], 24) for i in range(4)]
        tasks = [asyncio.create_task(collect(c.stub, chat(t, imgs, n))) for t, imgs, n in cases]
        await asyncio.sleep(0.3)
        await asyncio.to_thread(redis_proc.restart)
        results = await asyncio.gather(*tasks)
        for (text, imgs, n), (tokens, _) in zip(cases, results):
            assert tokens == oracle.chat(text, [random_image(70 + int(text.split()[1]))] if imgs else [], n), text
        # And the deployment goes on serving.
        tokens, _ = await collect(c.stub, chat("after the restart", [], 5))
        assert tokens == oracle.chat("after the restart", [], 5)
