"""The scheduler over real workers in this process (queues in memory): batching across requests
with token-exact outputs, text-only requests bypassing the encoder, a request's images spread
over two encoders, colocated versus split placement, admission refusals, the admin API."""
from __future__ import annotations

import asyncio

import grpc
import pytest

from prism.v1 import admin_pb2, common_pb2
from services.scheduler.config import Policy
from tests.conftest import png_bytes, random_image
from tests.integration.cluster import LocalCluster, chat, collect
from tests.oracle import Oracle


@pytest.fixture(scope="module")
def oracle(tiny_models) -> Oracle:
    return Oracle(tiny_models["llava"])


SPLIT2 = [("encode",), ("encode",), ("prefill",), ("decode",)]


async def test_batches_form_across_requests_and_outputs_stay_exact(tiny_models, oracle):
    async with LocalCluster(tiny_models["llava"], SPLIT2, slots=8) as c:
        requests = [(f"picture {i}", [png_bytes(10 + i)] if i % 2 == 0 else [], 3 + i) for i in range(8)]
        results = await asyncio.gather(*[collect(c.stub, chat(t, imgs, n)) for t, imgs, n in requests])
        for (text, imgs, n), (tokens, last) in zip(requests, results):
            assert tokens == oracle.chat(text, [random_image(10 + int(text.split()[1]))] if imgs else [], n)
            assert last.finish_reason in (common_pb2.FINISH_REASON_LENGTH, common_pb2.FINISH_REASON_STOP)
        encoders = c.named(("encode",))
        enc_batches = [b for name in encoders for b in c.worker(name, "encode").batch_sizes]
        dec_batches = list(c.worker(c.named(("decode",))[0], "decode").batch_sizes)
        pre_batches = list(c.worker(c.named(("prefill",))[0], "prefill").batch_sizes)
        assert max(dec_batches) > 1, dec_batches
        assert max(pre_batches) > 1, pre_batches
        assert sum(enc_batches) == 4  # the four image requests, no text-only one
        status = await c.status()
        assert status.in_flight == 0 and all(s.pending_tokens == 0 for s in status.stages)


async def test_encoder_batches_images_of_several_requests(tiny_models, oracle):
    import threading

    async with LocalCluster(tiny_models["llava"], [("encode",), ("prefill",), ("decode",)], slots=8) as c:
        name = c.named(("encode",))[0]
        encoder, host = c.worker(name, "encode"), c.hosts[name]
        release = threading.Event()
        blocker = asyncio.create_task(host.ctx.compute.run(release.wait, 30))  # the tower is busy
        tasks = [asyncio.create_task(collect(c.stub, chat(f"img {i}", [png_bytes(20 + i)], 3))) for i in range(5)]
        book = c.parts["cluster"].book
        for _ in range(6000):  # until all five encode tasks are queued (the tower is still busy)
            if sum(1 for _, stage in book if stage == "encode") == 5:
                break
            await asyncio.sleep(0.01)
        await asyncio.sleep(0.1)
        release.set()
        await blocker
        results = await asyncio.gather(*tasks)
        for i, (tokens, _) in enumerate(results):
            assert tokens == oracle.chat(f"img {i}", [random_image(20 + i)], 3)
        # What the worker took before the tower freed up, then all the rest in one tower call:
        # five requests' images in two tower calls.
        assert len(encoder.batch_sizes) == 2 and sum(encoder.batch_sizes) == 5, list(encoder.batch_sizes)


async def test_a_burst_of_image_requests_books_its_prefill_and_decode_at_once(tiny_models, oracle):
    """While their images wait for a busy encoder, the requests' prefill (and decode) load is
    already booked where they will go, so the burst spreads over both prefill workers instead of
    every request picking the one that looks idle."""
    import threading

    layout = [("encode",), ("prefill",), ("prefill",), ("decode",)]
    async with LocalCluster(tiny_models["llava"], layout, slots=8) as c:
        host = c.hosts[c.named(("encode",))[0]]
        release = threading.Event()
        blocker = asyncio.create_task(host.ctx.compute.run(release.wait, 30))  # the tower is busy
        tasks = [asyncio.create_task(collect(c.stub, chat(f"burst {i}", [png_bytes(30 + i)], 3))) for i in range(4)]
        book = c.parts["cluster"].book
        for _ in range(6000):  # until all four encode tasks are queued (the tower is still busy)
            if sum(1 for _, stage in book if stage == "encode") == 4:
                break
            await asyncio.sleep(0.01)
        prefills = c.named(("prefill",))
        booked = {name: [rid for rid, stage in book.requests_on(name) if stage == "prefill"] for name in prefills}
        decode = c.named(("decode",))[0]
        assert sorted(len(v) for v in booked.values()) == [2, 2], booked
        assert book.slots_used(decode) == 4
        release.set()
        await blocker
        results = await asyncio.gather(*tasks)
        for i, (tokens, _) in enumerate(results):
            assert tokens == oracle.chat(f"burst {i}", [random_image(30 + i)], 3)
        assert sorted(sum(c.worker(n, "prefill").batch_sizes) for n in prefills) == [2, 2]
        assert len(book) == 0  # nothing left booked


async def test_text_only_requests_never_touch_the_encoder(tiny_models, oracle):
    async with LocalCluster(tiny_models["llava"], [("encode",), ("prefill",), ("decode",)]) as c:
        encoder = c.worker(c.named(("encode",))[0], "encode")
        results = await asyncio.gather(*[collect(c.stub, chat(f"just text {i}", [], 4)) for i in range(4)])
        for i, (tokens, _) in enumerate(results):
            assert tokens == oracle.chat(f"just text {i}", [], 4)
        assert list(encoder.batch_sizes) == []
        assert c.parts["cluster"].book.stage_pending("encode") == 0


async def test_images_of_one_request_are_encoded_on_two_encoders(tiny_models, oracle):
    async with LocalCluster(tiny_models["llava"], SPLIT2) as c:
        tokens, _ = await collect(c.stub, chat("two pictures", [png_bytes(3), png_bytes(4)], 5))
        assert tokens == oracle.chat("two pictures", [random_image(3), random_image(4)], 5)
        per_encoder = [sum(c.worker(n, "encode").batch_sizes) for n in c.named(("encode",))]
        assert per_encoder == [1, 1]  # one encode task (one image) on each encoder


async def test_adaptive_placement_takes_colocated_path_when_idle_and_reports_it(tiny_models, oracle):
    layout = [("encode", "prefill", "decode"), ("encode",), ("prefill",), ("decode",)]
    async with LocalCluster(tiny_models["llava"], layout, placement="adaptive") as c:
        tokens, last = await collect(c.stub, chat("alone", [png_bytes(5)], 4))
        assert tokens == oracle.chat("alone", [random_image(5)], 4)
        assert last.placement.path == "colocated" and last.placement.attempts == 1
        assert c.parts["pipeline"].placements == {"split": 0, "colocated": 1}
        status = await c.status()
        assert dict(status.placements) == {"split": 0, "colocated": 1}


async def test_split_placement_over_a_colocated_worker_still_exact(tiny_models, oracle):
    layout = [("encode", "prefill", "decode"), ("encode",), ("prefill",), ("decode",)]
    async with LocalCluster(tiny_models["llava"], layout, placement="split") as c:
        results = await asyncio.gather(*[collect(c.stub, chat(f"s {i}", [png_bytes(30 + i)], 4)) for i in range(3)])
        for i, (tokens, _) in enumerate(results):
            assert tokens == oracle.chat(f"s {i}", [random_image(30 + i)], 4)
        assert c.parts["pipeline"].placements["split"] == 3


async def test_admission_refuses_early_what_cannot_meet_its_deadline(tiny_models):
    policy = Policy(decode_capacity=10.0)  # 10 tokens/s: 500 tokens cannot finish in 1 s
    async with LocalCluster(tiny_models["llava"], [("encode", "prefill", "decode")], policy=policy) as c:
        request = chat("long", [], 300)
        request.slo.deadline_ms = 1000
        call = c.stub.Generate(request)
        with pytest.raises(grpc.aio.AioRpcError) as err:
            async for _ in call:
                pass
        assert err.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert "deadline" in err.value.details()
        # Not even an idle system could make it: no retry hint.
        assert "retry-after-ms" not in dict(await call.trailing_metadata() or ())
        assert c.parts["cluster"].book.inflight == 0  # nothing was queued


async def test_back_pressure_when_a_stage_queue_passes_its_bound(tiny_models):
    policy = Policy(decode_queue_tokens=100)
    async with LocalCluster(tiny_models["llava"], [("encode", "prefill", "decode")], policy=policy) as c:
        long = chat("first one", [], 400)
        long.sampling.ignore_eos = True
        first = c.stub.Generate(long)
        async for _ in first:  # decoding: its 399 tokens to generate are pending in decode
            break
        call = c.stub.Generate(chat("second one", [], 4))
        with pytest.raises(grpc.aio.AioRpcError) as err:
            async for _ in call:
                pass
        assert err.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED and "decode" in err.value.details()
        assert int(dict(await call.trailing_metadata())["retry-after-ms"]) >= 50
        first.cancel()


async def test_admin_lists_requests_and_drains_a_worker(tiny_models, oracle):
    async with LocalCluster(tiny_models["llava"], [("prefill",), ("decode",), ("decode",)], slots=2) as c:
        call = c.stub.Generate(chat("count", [], 300, ))
        got = 0
        async for message in call:
            got += len(message.token_ids)
            if got >= 2:
                break
        listed = await c.admin.ListRequests(admin_pb2.ListRequestsRequest())
        assert len(listed.requests) == 1 and listed.requests[0].generated_tokens >= 2
        assert listed.requests[0].placement == "split"
        call.cancel()
        decoders = c.named(("decode",))
        await c.admin.DrainWorker(admin_pb2.DrainWorkerRequest(name=decoders[0]))
        await c.parts["cluster"].refresh()
        status = await c.status()
        drained = {w.name: w.draining for w in status.workers}
        assert drained[decoders[0]] is True and drained[decoders[1]] is False
        tokens, _ = await collect(c.stub, chat("after drain", [], 4))
        assert tokens == oracle.chat("after drain", [], 4)
        assert sum(c.worker(decoders[1], "decode").batch_sizes) > 0
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await c.admin.DrainWorker(admin_pb2.DrainWorkerRequest(name="nobody"))
        assert err.value.code() == grpc.StatusCode.NOT_FOUND


async def test_encode_and_prefill_are_profiled_by_each_tasks_share_of_its_batch(tiny_models, oracle, exporter):
    """A batched encode or prefill call reports its compute and its whole batch's tokens; each task
    is measured as its tokens over its share of that compute (its tokens over the batch's), so a
    sample is the batch's throughput, not a fraction of it by the batch's size."""
    import threading

    layout = [("encode",), ("prefill",), ("decode",)]
    async with LocalCluster(tiny_models["llava"], layout, slots=8, otel=True) as c:
        enc_name, pre_name = c.named(("encode",))[0], c.named(("prefill",))[0]
        releases = {name: threading.Event() for name in (enc_name, pre_name)}
        blockers = [asyncio.create_task(c.hosts[n].ctx.compute.run(ev.wait, 30)) for n, ev in releases.items()]
        requests = [(f"share {'word ' * 6 * i}{i}", [png_bytes(40 + i)], 3) for i in range(3)]
        tasks = [asyncio.create_task(collect(c.stub, chat(t, imgs, n))) for t, imgs, n in requests]
        book = c.parts["cluster"].book
        for _ in range(6000):  # all three encode tasks queued behind the busy tower
            if sum(1 for _, stage in book if stage == "encode") == 3:
                break
            await asyncio.sleep(0.01)
        await asyncio.sleep(0.1)
        releases[enc_name].set()
        encoder, prefill = c.worker(enc_name, "encode"), c.worker(pre_name, "prefill")
        for _ in range(6000):  # every image encoded; their prompt passes wait for the busy prefill
            if sum(encoder.batch_sizes) == 3:
                break
            await asyncio.sleep(0.01)
        await asyncio.sleep(0.3)
        releases[pre_name].set()
        await asyncio.gather(*blockers)
        results = await asyncio.gather(*tasks)
        for (text, _, n), (tokens, _) in zip(requests, results):
            assert tokens == oracle.chat(text, [random_image(40 + int(text.split()[-1]))], n)
        assert max(encoder.batch_sizes) > 1 and max(prefill.batch_sizes) > 1
        cluster = c.parts["cluster"]
        for stage, name, count in (("encode", enc_name, "prism.media_tokens"), ("prefill", pre_name, "prism.prompt_tokens")):
            spans = [s.attributes for s in exporter.get_finished_spans() if s.name == f"prism.{stage}"]
            assert len(spans) == 3 and any(a["prism.batch_size"] > 1 for a in spans)
            for cpu, key in ((False, "prism.compute_ms"), (True, "prism.compute_cpu_ms")):
                samples = sorted(cluster.samples(name, stage, cpu=cpu))
                expected = sorted((a[count], a[key] / 1000 * a[count] / a["prism.batch_tokens"]) for a in spans)
                assert [n for n, _ in samples] == [n for n, _ in expected]
                assert [s for _, s in samples] == pytest.approx([s for _, s in expected], rel=1e-9)
            for a in spans:  # a batch's shares add up to its compute
                assert a["prism.compute_cpu_ms"] > 0
                mates = [b for b in spans if b["prism.compute_ms"] == a["prism.compute_ms"]]
                assert sum(b[count] for b in mates) == a["prism.batch_tokens"]
        # The selection's program on cores the stages share counts work in CPU seconds (the
        # measured tokens per CPU second); on its own devices, in the measured wall-clock rates.
        from types import SimpleNamespace

        from services.scheduler.core.selection import Flow
        from services.scheduler.selector import Selector

        dec_name = c.named(("decode",))[0]
        names = {"encode": enc_name, "prefill": pre_name, "decode": dec_name}
        assert all(cluster.samples(n, stage, cpu=True) for stage, n in names.items())
        pipeline = SimpleNamespace(cluster=cluster)
        shared = Selector(None, pipeline, None, flow=Flow(parallelism=2)).capacity()
        assert shared == {stage: cluster.profiled(n, stage, cpu=True) for stage, n in names.items()}
        own = Selector(None, pipeline, None, flow=Flow()).capacity()
        by_name = {i.name: i for i in cluster.instances}
        assert own == {stage: by_name[n].capacity[stage] for stage, n in names.items()}


async def test_a_slow_ready_write_never_loses_the_first_token(tiny_models, oracle, monkeypatch):
    """Prefill records READY (with the first token) before it ends the KV stream: decode's pull
    ends the task (DONE, terminal) as soon as that stream does, and a READY written after it,
    e.g. over a slower queue connection, would be refused, losing the first token."""
    from prism.queue.base import TaskState
    from prism.queue.memory import InMemoryWorkQueue

    set_state = InMemoryWorkQueue.set_state

    async def slow_ready(self, task_id, state, **detail):
        if state is TaskState.READY and task_id.endswith("/prefill"):
            await asyncio.sleep(0.2)
        return await set_state(self, task_id, state, **detail)

    monkeypatch.setattr(InMemoryWorkQueue, "set_state", slow_ready)
    async with LocalCluster(tiny_models["llava"], [("encode",), ("prefill",), ("decode",)], slots=2) as c:
        tokens, last = await collect(c.stub, chat("slow ready", [png_bytes(7)], 5))
        assert tokens == oracle.chat("slow ready", [random_image(7)], 5)
        assert last.finish_reason == common_pb2.FINISH_REASON_LENGTH


async def test_decode_is_profiled_by_each_requests_share_of_its_batched_steps(tiny_models, oracle):
    """Decode capacity is measured as tokens over the request's share of the steps it was in
    (the worker's compute, split evenly over the batch), not over the wall time of its stream."""
    async with LocalCluster(tiny_models["llava"], [("prefill",), ("decode",)], slots=4) as c:
        loop = asyncio.get_running_loop()
        started = loop.time()
        results = await asyncio.gather(*(collect(c.stub, chat(f"share {i}", [], 7)) for i in range(3)))
        wall = loop.time() - started
        decoder = c.named(("decode",))[0]
        samples = c.parts["cluster"].samples(decoder, "decode")
        # one sample per request; the first token comes from prefill
        assert sorted(n for n, _ in samples) == sorted(len(t) - 1 for t, _ in results) and len(samples) == 3
        cpu = c.parts["cluster"].samples(decoder, "decode", cpu=True)  # the process's CPU time in those steps
        assert sorted(n for n, _ in cpu) == sorted(n for n, _ in samples) and all(s > 0 for _, s in cpu)
        worker = c.worker(decoder, "decode")
        assert max(worker.batch_sizes) > 1
        # three requests shared batched steps: their shares add up to less than the wall time
        assert 0 < sum(s for _, s in samples) < wall
        for (tokens, _), i in zip(results, range(3)):
            assert tokens == oracle.chat(f"share {i}", [], 7)
