"""The four services in this process, on real gRPC servers on port 0, so tests can look at the
workers' state: cancellation frees decode slots and held KV at once, stage errors carry precise
statuses, nothing is left behind."""
from __future__ import annotations

import asyncio

import grpc
import pytest

from prism.v1 import common_pb2, prism_pb2_grpc, stages_pb2, stages_pb2_grpc
from tests.conftest import png_bytes, random_image
from tests.integration.cluster import LocalCluster, chat, collect
from tests.oracle import Oracle

SLOTS = 2


@pytest.fixture
async def system(tiny_models):
    """Split layout: one worker per stage, queues in memory."""
    cluster = await LocalCluster(tiny_models["llava"], [("encode",), ("prefill",), ("decode",)], slots=SLOTS).start()
    hosts = {stages[0]: cluster.hosts[name] for name in cluster.hosts for stages in [tuple(name.rsplit("-", 1)[0].split("+"))]}
    yield {"encoder": hosts["encode"], "prefill": hosts["prefill"], "decode": hosts["decode"],
           "channel": cluster.channel, "cluster": cluster}
    await cluster.stop()


def parts(host, stage: str) -> dict:
    return host.apps[stage].parts


@pytest.fixture(scope="module")
def oracle(tiny_models) -> Oracle:
    return Oracle(tiny_models["llava"])


async def wait_until(predicate, timeout: float = 5.0) -> bool:
    deadline = asyncio.get_running_loop().time() + timeout
    while not predicate():
        if asyncio.get_running_loop().time() > deadline:
            return False
        await asyncio.sleep(0.01)
    return True


async def test_generate_matches_generate_and_leaves_nothing_behind(system, oracle):
    stub = prism_pb2_grpc.PrismServiceStub(system["channel"])
    tokens, last = await collect(stub, chat("describe it", [png_bytes(1)], max_new_tokens=6))
    assert tokens == oracle.chat("describe it", [random_image(1)], 6)
    assert last.usage.generated_tokens == len(tokens) and last.usage.image_tokens > 0
    decode = parts(system["decode"], "decode")
    assert await wait_until(lambda: decode["engine"].free_slots == SLOTS)
    assert len(parts(system["prefill"], "prefill")["worker"].held) == 0
    assert len(parts(system["encoder"], "encode")["worker"].held) == 0
    assert system["cluster"].parts["cluster"].book.inflight == 0


async def test_cancel_mid_stream_frees_the_decode_slot_and_kv_at_once(system, oracle):
    stub = prism_pb2_grpc.PrismServiceStub(system["channel"])
    engine = parts(system["decode"], "decode")["engine"]
    call = stub.Generate(chat("count forever", max_new_tokens=400, ignore_eos=True))
    seen = 0
    async for message in call:
        seen += len(message.token_ids)
        if seen >= 3:
            break
    assert engine.num_active == 1
    call.cancel()
    assert await wait_until(lambda: engine.free_slots == SLOTS and engine.num_active == 0, timeout=2.0)
    # The freed slots serve new requests correctly.
    tokens, _ = await collect(stub, chat("again", [png_bytes(2)], max_new_tokens=5))
    assert tokens == oracle.chat("again", [random_image(2)], 5)


async def test_more_requests_than_slots_all_complete(system):
    stub = prism_pb2_grpc.PrismServiceStub(system["channel"])
    results = await asyncio.gather(*[collect(stub, chat(f"request {i}", max_new_tokens=4 + i, ignore_eos=True))
                                     for i in range(5)])
    assert [len(t) for t, _ in results] == [4 + i for i in range(5)]
    assert all(last.finish_reason == common_pb2.FINISH_REASON_LENGTH for _, last in results)


async def test_stage_errors_carry_precise_statuses(system):
    prefill = stages_pb2_grpc.PrefillServiceStub(grpc.aio.insecure_channel(system["prefill"].address))
    header = stages_pb2.TaskHeader(request_id="no-encoder")
    media = [stages_pb2.MediaInfo(modality=common_pb2.MODALITY_IMAGE, num_tokens=4)]
    with pytest.raises(grpc.aio.AioRpcError) as err:
        async for _ in prefill.Prefill(stages_pb2.PrefillRequest(header=header, input_ids=[1, 2], media=media,
                                                                 sampling=common_pb2.SamplingParams(max_new_tokens=2))):
            pass
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "encoder_address" in err.value.details()
    with pytest.raises(grpc.aio.AioRpcError) as err:
        async for _ in prefill.FetchKv(stages_pb2.FetchKvRequest(request_id="never-queued")):
            pass
    assert err.value.code() == grpc.StatusCode.NOT_FOUND and "request_id" in err.value.details()
    with pytest.raises(grpc.aio.AioRpcError) as err:
        async for _ in prefill.Prefill(stages_pb2.PrefillRequest()):
            pass
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "header.request_id" in err.value.details()
