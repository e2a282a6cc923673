"""Deadline-driven input reduction at admission, through the scheduler and real workers: a
request that would miss its deadline is served with the most accurate reduction its caller
allowed (above its floor) that fits, the response says exactly what was dropped, and the tokens
equal `model.generate` on the reduced inputs; nothing fits above the floor -> refused before any
work; a request allowing nothing is never changed."""
from __future__ import annotations

import grpc
import pytest

from prism.profiling.schema import AccuracyEntry, ModelInfo, Profile, StageCost, save
from prism.v1 import common_pb2
from services.scheduler.config import Policy
from tests.conftest import png_bytes, random_image
from tests.integration.cluster import LocalCluster, chat, collect
from tests.oracle import Oracle

# Assumed capacities (until profiled): encoding two 64-token images takes 1.28 s, one 0.64 s, so
# a 1 s deadline is met only with an image dropped.
POLICY = Policy(encode_capacity=100.0, prefill_capacity=2000.0, decode_capacity=400.0)
ACCURACY = {"full": 1.0, "drop_images:1": 0.8, "drop:image": 0.3}


@pytest.fixture(scope="module")
def oracle(tiny_models) -> Oracle:
    return Oracle(tiny_models["llava"])


@pytest.fixture
def profile(tmp_path, tiny_models):
    cost = {b: StageCost(ms_per_token=1.0, ms_per_call=1.0, tokens_per_call=1, samples=1) for b in (1,)}
    path = tmp_path / "profile.json"
    save(Profile(model=ModelInfo("llava", "llava", "float32", "cpu"),
                 costs={"encode": cost, "prefill": cost, "decode": cost},
                 accuracy={k: AccuracyEntry(v) for k, v in ACCURACY.items()}), path)
    return path


def request(floor: float, allow: bool = True):
    r = chat("compare the pictures", [png_bytes(81), png_bytes(82)], 6)
    r.slo.deadline_ms = 1000
    if allow:
        r.selection.drop_images = True
        r.selection.min_images = 1
        r.selection.accuracy_floor = floor
    return r


async def test_overloaded_request_served_with_reduced_inputs_reported_exactly(tiny_models, oracle, profile):
    layout = [("encode", "prefill", "decode")]
    async with LocalCluster(tiny_models["llava"], layout, policy=POLICY, selection_profile=str(profile)) as c:
        tokens, last = await collect(c.stub, request(floor=0.5))
        red = last.reductions
        assert (red.strategy, list(red.dropped_images), red.expected_accuracy) == ("drop_images:1", [1], 0.8)
        assert red.image_scale == 1.0 and red.description
        assert last.usage.image_tokens == 64  # one image of two
        assert tokens == oracle.chat("compare the pictures", [random_image(81)], 6)


async def test_no_reduction_above_the_floor_fits_refused_before_any_work(tiny_models, profile):
    layout = [("encode", "prefill", "decode")]
    async with LocalCluster(tiny_models["llava"], layout, policy=POLICY, selection_profile=str(profile)) as c:
        for r in (request(floor=0.9), request(floor=0.0, allow=False)):
            with pytest.raises(grpc.aio.AioRpcError) as err:
                await collect(c.stub, r)
            assert err.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
            assert "deadline" in err.value.details()
        assert "selection.accuracy_floor" in (await _refusal(c, request(floor=0.9))).details()
        assert c.parts["cluster"].book.inflight == 0  # nothing was queued


async def test_unreduced_requests_report_nothing_dropped(tiny_models, oracle, profile):
    layout = [("encode", "prefill", "decode")]
    async with LocalCluster(tiny_models["llava"], layout, selection_profile=str(profile)) as c:
        r = request(floor=0.5)
        r.slo.deadline_ms = 0  # no deadline: nothing to reduce for
        tokens, last = await collect(c.stub, r)
        assert last.reductions.strategy == "full" and list(last.reductions.dropped_images) == []
        assert last.reductions.expected_accuracy == 1.0
        assert tokens == oracle.chat("compare the pictures", [random_image(81), random_image(82)], 6)
        bad = request(floor=1.5)
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await collect(c.stub, bad)
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert "selection.accuracy_floor" in err.value.details()
        bad = request(floor=0.5)
        bad.selection.drop_modalities.append(common_pb2.MODALITY_TEXT)
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await collect(c.stub, bad)
        assert "selection.drop_modalities[0]" in err.value.details()


async def _refusal(c, r) -> grpc.aio.AioRpcError:
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await collect(c.stub, r)
    return err.value


async def test_sdk_sends_what_may_be_reduced_and_reads_what_was(tiny_models, oracle, profile):
    from prism.client import AsyncPrismClient, Reduce

    layout = [("encode", "prefill", "decode")]
    async with LocalCluster(tiny_models["llava"], layout, policy=POLICY, selection_profile=str(profile)) as c:
        async with AsyncPrismClient(c.scheduler.address) as client:
            messages = [{"role": "user", "content": [{"type": "image", "image": random_image(81)},
                                                     {"type": "image", "image": random_image(82)},
                                                     {"type": "text", "text": "compare the pictures"}]}]
            done = await client.complete(messages=messages, max_new_tokens=6, deadline_ms=1000,
                                         reduce=Reduce(accuracy_floor=0.5, drop_images=True, min_images=1))
    assert done.reductions.strategy == "drop_images:1" and done.reductions.dropped_images == (1,)
    assert done.reductions.expected_accuracy == 0.8
    assert list(done.token_ids) == oracle.chat("compare the pictures", [random_image(81)], 6)


# ---- online reassignment of queued requests not yet encoded -----------------------------------

SLOW = Policy(encode_capacity=50.0, prefill_capacity=2000.0, decode_capacity=400.0)  # 1.28 s an image


def _gate(c):
    """Hold the encoder's batches until the returned event is set (its first batch RUNNING)."""
    import threading

    name = c.named(("encode",))[0]
    engine, gate = c.engine(name, "encode"), threading.Event()
    original = engine.encode_batch

    def held(*args, **kw):
        gate.wait(30)
        return original(*args, **kw)

    engine.encode_batch = held
    return gate


def _two_images(text: str, seeds: tuple[int, int], deadline_ms: int, allow: bool):
    r = chat(text, [png_bytes(s) for s in seeds], 6)
    r.slo.deadline_ms = deadline_ms
    if allow:
        r.selection.drop_images, r.selection.min_images, r.selection.accuracy_floor = True, 1, 0.5
    return r


async def _until(predicate, timeout: float = 10.0) -> None:
    import asyncio

    loop = asyncio.get_running_loop()
    until = loop.time() + timeout
    while not predicate():
        assert loop.time() < until, "timed out"
        await asyncio.sleep(0.01)


@pytest.mark.parametrize("backend", ["memory", "redis"])
async def test_an_arrival_reassigns_a_queued_request_not_yet_encoded(tiny_models, oracle, profile, backend, redis_url):
    """R0 is being encoded (the encoder is held); R1 (allows dropping an image) waits in the encode
    queue; R2 (allows nothing), queued behind both, fits its deadline only if R1 drops an image
    (at 50 tokens/s: 1.33 s + 2.65 s + 2.65 s > 6 s, 1.33 s + 1.35 s + 2.65 s < 6 s): R1 is
    reassigned, R0 is never touched, all three are exact on the inputs they were served with."""
    import asyncio

    layout = [("encode",), ("prefill",), ("decode",)]
    url = redis_url if backend == "redis" else ""
    async with LocalCluster(tiny_models["llava"], layout, policy=SLOW, selection_profile=str(profile),
                            redis_url=url) as c:
        gate = _gate(c)
        selector = c.parts["servicer"].selector
        r0 = chat("first", [png_bytes(90)], 6)
        r0.selection.drop_modalities.append(common_pb2.MODALITY_IMAGE)  # allowed, but it will have begun
        t0 = asyncio.create_task(collect(c.stub, r0))
        await _until(lambda: any(p.encode_started for p in selector.served.values()))
        t1 = asyncio.create_task(collect(c.stub, _two_images("second", (91, 92), 6000, allow=True)))
        await _until(lambda: len(selector.served) == 2 and all(p.tasks for p in selector.served.values()))
        jobs = {j.request_id: j for j in selector.jobs()}
        assert sorted(j.reassignable for j in jobs.values()) == [False, True]  # R0 began: fixed
        t2 = asyncio.create_task(collect(c.stub, _two_images("third", (93, 94), 6000, allow=False)))
        await _until(lambda: selector.stats.reassigned == 1)
        gate.set()
        (tok0, last0), (tok1, last1), (tok2, last2) = await asyncio.gather(t0, t1, t2)
        sel = (await c.status()).selection  # what operators see
        assert (sel.fitted, sel.reassigned, sel.lost_races) == (1, 1, 0) and sel.decisions >= 1
        assert 0 < sel.decision_p50_ms <= sel.decision_max_ms
    assert last0.reductions.strategy == "full" and tok0 == oracle.chat("first", [random_image(90)], 6)
    assert (last1.reductions.strategy, list(last1.reductions.dropped_images)) == ("drop_images:1", [1])
    assert last1.reductions.expected_accuracy == 0.8 and last1.placement.attempts == 2
    assert tok1 == oracle.chat("second", [random_image(91)], 6)
    assert last2.reductions.strategy == "full"
    assert tok2 == oracle.chat("third", [random_image(93), random_image(94)], 6)
    assert selector.stats.fitted == 1 and selector.served == {}
    # the two the program admitted (R0 has no deadline) are its feedback: actual over predicted e2e
    assert selector.slowdown.samples == 2 and sel.slowdown == selector.slowdown.value == 1.0  # 8 needed


async def test_a_slow_stage_reassigns_a_queued_request_at_risk(tiny_models, oracle, profile):
    """R1 was accepted as sent; then the encoder is measured slower than assumed, so R1 would miss
    its deadline: the selector's periodic check drops one of its images (R0, begun, is kept)."""
    import asyncio

    layout = [("encode",), ("prefill",), ("decode",)]
    async with LocalCluster(tiny_models["llava"], layout, policy=SLOW, selection_profile=str(profile)) as c:
        gate = _gate(c)
        selector, cluster = c.parts["servicer"].selector, c.parts["cluster"]
        t0 = asyncio.create_task(collect(c.stub, chat("first", [png_bytes(90)], 6)))
        await _until(lambda: any(p.encode_started for p in selector.served.values()))
        t1 = asyncio.create_task(collect(c.stub, _two_images("second", (91, 92), 6000, allow=True)))
        await _until(lambda: len(selector.served) == 2 and all(p.tasks for p in selector.served.values()))
        await asyncio.sleep(2 * selector.every_s)
        assert selector.stats.reassigned == 0  # on time at 50 tokens/s
        encoder = c.named(("encode",))[0]
        for _ in range(3):
            cluster.record(encoder, "encode", 60, 2.0)  # 30 tokens/s measured
        await cluster.refresh()
        await _until(lambda: selector.stats.reassigned == 1)
        gate.set()
        (tok0, last0), (tok1, last1) = await asyncio.gather(t0, t1)
    assert last0.reductions.strategy == "full" and tok0 == oracle.chat("first", [random_image(90)], 6)
    assert last1.reductions.strategy == "drop_images:1"
    assert tok1 == oracle.chat("second", [random_image(91)], 6)


@pytest.mark.parametrize("price", [0.0, 1.0])
async def test_under_overload_an_arrival_that_fits_whole_comes_reduced(tiny_models, oracle, profile, price):
    """Two arrivals of two images each, moments apart, at 50 tokens/s of encoding: the second's
    2.56 s of encoder work arrived within the load's shortest span (1 s), an offered load of
    2.56. Both fit their 60 s deadlines whole; priced
    (`--selection-price 1`), the second, which allows dropping an image, arrives reduced (worth
    0.8 - 1.56 x 1.3 s against 1.0 - 1.56 x 2.6 s), and unpriced it is served as sent. The status
    reports the price; the tokens are exact on the inputs served."""
    import asyncio

    layout = [("encode",), ("prefill",), ("decode",)]
    async with LocalCluster(tiny_models["llava"], layout, policy=SLOW, selection_profile=str(profile),
                            scheduler_args={"selection_price": price, "selection_price_window_s": 2.0}) as c:
        gate = _gate(c)
        selector = c.parts["servicer"].selector
        t0 = asyncio.create_task(collect(c.stub, _two_images("first", (95, 96), 60_000, allow=False)))
        await _until(lambda: len(selector.served) == 1)
        t1 = asyncio.create_task(collect(c.stub, _two_images("second", (97, 98), 60_000, allow=True)))
        await _until(lambda: len(selector.served) == 2)
        sel = (await c.status()).selection
        gate.set()
        (tok0, last0), (tok1, last1) = await asyncio.gather(t0, t1)
    assert last0.reductions.strategy == "full"
    assert tok0 == oracle.chat("first", [random_image(95), random_image(96)], 6)
    if price:
        assert sel.offered_load == pytest.approx(2 * 64 / 50 / 1.0, rel=0.05)  # the second over 1 s
        assert sel.load_price == pytest.approx(sel.offered_load - 1.0, rel=1e-6) and sel.load_price > 1
        assert (last1.reductions.strategy, list(last1.reductions.dropped_images)) == ("drop_images:1", [1])
        assert last1.reductions.expected_accuracy == 0.8 and last1.placement.attempts == 1
        assert tok1 == oracle.chat("second", [random_image(97)], 6)
    else:
        assert (sel.load_price, sel.offered_load) == (0.0, 0.0)
        assert last1.reductions.strategy == "full"
        assert tok1 == oracle.chat("second", [random_image(97), random_image(98)], 6)
    assert sel.refused == 0
