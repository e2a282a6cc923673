"""The four services in this process, on real gRPC servers on port 0, so tests can look at the
workers' state: cancellation frees decode slots and held KV at once, stage errors carry precise
statuses, nothing is left behind."""
from __future__ import annotations

import asyncio

import grpc
import pytest

from prism.models.loading import ModelOptions
from prism.runtime.server import ServerConfig
from prism.runtime.stagework import start_stage
from prism.v1 import common_pb2, prism_pb2, prism_pb2_grpc, stages_pb2, stages_pb2_grpc
from services.decode.app import build as build_decode
from services.decode.config import DecodeConfig
from services.encoder.app import build as build_encoder
from services.encoder.config import EncoderConfig
from services.prefill.app import build as build_prefill
from services.prefill.config import PrefillConfig
from services.scheduler.app import build as build_scheduler
from services.scheduler.config import SchedulerConfig
from tests.conftest import png_bytes, random_image
from tests.oracle import Oracle

SLOTS = 2


def server() -> ServerConfig:
    return ServerConfig(port=0, otel=False, drain_grace_s=5)


@pytest.fixture
async def system(tiny_models):
    model_dir = tiny_models["llava"]
    model = ModelOptions(model_dir=model_dir, threads=1)
    enc = await start_stage(server(), await build_encoder(EncoderConfig(model=model, server=server(), fetch_wait_s=1)),
                            handle_signals=False)
    pre = await start_stage(server(), await build_prefill(PrefillConfig(model=model, server=server(), fetch_wait_s=1)),
                            handle_signals=False)
    dec = await start_stage(server(), await build_decode(DecodeConfig(model=model, server=server(), slots=SLOTS, max_len=512)),
                            handle_signals=False)
    sch = await start_stage(server(), await build_scheduler(SchedulerConfig(
        model_dir=model_dir, encoder=enc.address, prefill=pre.address, decode=dec.address, max_context=512, server=server())),
        handle_signals=False)
    channel = grpc.aio.insecure_channel(sch.address)
    yield {"encoder": enc, "prefill": pre, "decode": dec, "scheduler": sch, "channel": channel, "model_dir": model_dir}
    await channel.close()
    for stage in (sch, dec, pre, enc):
        await stage.stop()


def chat(text: str, images: list[bytes] = (), max_new_tokens: int = 8, ignore_eos: bool = False) -> prism_pb2.GenerateRequest:
    content = [prism_pb2.ContentPart(media=prism_pb2.MediaPart(image=prism_pb2.Image(data=b))) for b in images]
    content.append(prism_pb2.ContentPart(text=text))
    return prism_pb2.GenerateRequest(
        chat=prism_pb2.Chat(messages=[prism_pb2.ChatMessage(role="user", content=content)]),
        sampling=common_pb2.SamplingParams(max_new_tokens=max_new_tokens, ignore_eos=ignore_eos))


@pytest.fixture(scope="module")
def oracle(tiny_models) -> Oracle:
    return Oracle(tiny_models["llava"])


async def collect(stub, request) -> tuple[list[int], prism_pb2.GenerateResponse]:
    tokens, last = [], None
    async for message in stub.Generate(request):
        tokens.extend(message.token_ids)
        last = message
    return tokens, last


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
    decode = system["decode"].app.parts
    assert await wait_until(lambda: decode["engine"].free_slots == SLOTS)
    assert len(system["prefill"].app.parts["worker"].held) == 0
    assert len(system["encoder"].app.parts["worker"].held) == 0
    assert decode["worker"].outputs == {}


async def test_cancel_mid_stream_frees_the_decode_slot_and_kv_at_once(system, oracle):
    stub = prism_pb2_grpc.PrismServiceStub(system["channel"])
    engine = system["decode"].app.parts["engine"]
    call = stub.Generate(chat("count forever", max_new_tokens=400, ignore_eos=True))
    seen = 0
    async for message in call:
        seen += len(message.token_ids)
        if seen >= 3:
            break
    assert engine.num_active == 1
    call.cancel()
    assert await wait_until(lambda: engine.free_slots == SLOTS and engine.num_active == 0, timeout=2.0)
    assert system["decode"].app.parts["worker"].outputs == {}
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
