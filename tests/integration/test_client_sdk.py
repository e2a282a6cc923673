"""The client SDK against a real grpc.aio server (127.0.0.1, port 0) with a fake PrismService.

The server runs on its own event loop in a background thread so that the blocking client can be
called directly from sync tests and the asyncio client from async tests.

Fake behaviour, chosen by the prompt (or the first text part of a chat):
* "invalid"     -> INVALID_ARGUMENT
* "busy"        -> RESOURCE_EXHAUSTED with trailing metadata retry-after-ms=1500
* "unavailable" -> UNAVAILABLE
* "fail-late"   -> two tokens, then INTERNAL
* "flaky"       -> on a request id's first call two tokens, then UNAVAILABLE (a scheduler
                   restart); on the next, the whole stream (the stored chunks replayed)
* "forever"     -> a token every 20 ms until cancelled (records the cancellation)
* model "missing" -> NOT_FOUND
* anything else -> three tokens "a", "b", "c" (finish LENGTH); usage.image_tokens / audio_tokens
  count the media received. Every request is recorded for inspection.
"""

from __future__ import annotations

import asyncio
import io
import threading
import time
import wave

import grpc
import numpy as np
import pytest
from PIL import Image

from prism.client import (
    AsyncPrismClient,
    DeadlineExceededError,
    InternalError,
    InvalidArgumentError,
    NotFoundError,
    PrismClient,
    PrismError,
    ResourceExhaustedError,
    UnavailableError,
)
from prism.v1 import common_pb2, prism_pb2, prism_pb2_grpc


def _text(req: prism_pb2.GenerateRequest) -> str:
    if req.WhichOneof("input") == "prompt":
        return req.prompt
    for m in req.chat.messages:
        for p in m.content:
            if p.WhichOneof("part") == "text":
                return p.text
    return ""


def _media(req: prism_pb2.GenerateRequest) -> list[prism_pb2.MediaPart]:
    if req.WhichOneof("input") == "prompt":
        return list(req.media)
    return [p.media for m in req.chat.messages for p in m.content if p.WhichOneof("part") == "media"]


class FakePrism(prism_pb2_grpc.PrismServiceServicer):
    def __init__(self):
        self.requests: list[prism_pb2.GenerateRequest] = []
        self.metadata: list[dict] = []
        self.cancelled = threading.Event()
        self.streaming = threading.Event()
        self.calls: dict[str, int] = {}

    async def _check(self, req, context):
        self.requests.append(req)
        self.metadata.append(dict(context.invocation_metadata()))
        text = _text(req)
        if req.model == "missing":
            await context.abort(grpc.StatusCode.NOT_FOUND, f"unknown model {req.model!r}")
        if text == "invalid":
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, "prompt is invalid")
        if text == "busy":
            context.set_trailing_metadata((("retry-after-ms", "1500"),))
            await context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED, "queue is full")
        if text == "unavailable":
            await context.abort(grpc.StatusCode.UNAVAILABLE, "draining")
        return text

    def _usage(self, req, generated):
        media = _media(req)
        return prism_pb2.Usage(
            prompt_tokens=len(_text(req).split()),
            image_tokens=sum(m.WhichOneof("kind") == "image" for m in media),
            audio_tokens=sum(m.WhichOneof("kind") == "audio" for m in media),
            generated_tokens=generated,
        )

    async def Generate(self, request, context):
        text = await self._check(request, context)
        rid = request.request_id or "gen-1"
        if text == "forever":
            self.streaming.set()
            try:
                i = 0
                while True:
                    yield prism_pb2.GenerateResponse(request_id=rid, token_ids=[i], text=".")
                    i += 1
                    await asyncio.sleep(0.02)
            except (asyncio.CancelledError, GeneratorExit):
                self.cancelled.set()
                raise
        yield prism_pb2.GenerateResponse(
            request_id=rid, token_ids=[1], text="a", timing=prism_pb2.Timing(ttft_ms=5)
        )
        yield prism_pb2.GenerateResponse(request_id=rid, token_ids=[2], text="b")
        if text == "fail-late":
            await context.abort(grpc.StatusCode.INTERNAL, "decode worker died")
        if text == "flaky":
            self.calls[rid] = self.calls.get(rid, 0) + 1
            if self.calls[rid] == 1:
                await context.abort(grpc.StatusCode.UNAVAILABLE, "scheduler restarting")
        yield prism_pb2.GenerateResponse(
            request_id=rid,
            token_ids=[3],
            text="c",
            finish_reason=common_pb2.FINISH_REASON_LENGTH,
            timing=prism_pb2.Timing(ttft_ms=5, e2e_ms=9, tpot_ms=2),
            usage=self._usage(request, 3),
        )

    async def GenerateUnary(self, request, context):
        req = request.request
        await self._check(req, context)
        return prism_pb2.GenerateUnaryResponse(
            request_id=req.request_id or "unary-1",
            token_ids=[7, 8],
            text="ok!",
            finish_reason=common_pb2.FINISH_REASON_STOP,
            usage=self._usage(req, 2),
            timing=prism_pb2.Timing(e2e_ms=3),
        )

    async def ListModels(self, request, context):
        return prism_pb2.ListModelsResponse(
            default_model="tiny-llava",
            models=[
                prism_pb2.ModelInfo(
                    name="tiny-llava",
                    family="llava",
                    modalities=[common_pb2.MODALITY_TEXT, common_pb2.MODALITY_IMAGE],
                    max_context_tokens=2048,
                    max_new_tokens_limit=512,
                    max_images_per_request=4,
                ),
                prism_pb2.ModelInfo(
                    name="tiny-audio", family="qwen2_audio", modalities=[common_pb2.MODALITY_AUDIO]
                ),
            ],
        )


@pytest.fixture
def server():
    fake = FakePrism()
    loop = asyncio.new_event_loop()
    thread = threading.Thread(target=loop.run_forever, daemon=True)
    thread.start()

    async def start():
        srv = grpc.aio.server()
        prism_pb2_grpc.add_PrismServiceServicer_to_server(fake, srv)
        port = srv.add_insecure_port("127.0.0.1:0")
        await srv.start()
        return srv, port

    srv, port = asyncio.run_coroutine_threadsafe(start(), loop).result(10)
    fake.target = f"127.0.0.1:{port}"
    yield fake
    asyncio.run_coroutine_threadsafe(srv.stop(None), loop).result(10)
    loop.call_soon_threadsafe(loop.stop)
    thread.join(10)
    loop.close()


def png_bytes() -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (3, 2), (9, 8, 7)).save(buf, format="PNG")
    return buf.getvalue()


def wav_bytes() -> bytes:
    buf = io.BytesIO()
    with wave.open(buf, "wb") as w:
        w.setnchannels(1)
        w.setsampwidth(2)
        w.setframerate(16000)
        w.writeframes(np.arange(32, dtype="<i2").tobytes())
    return buf.getvalue()


# ------------------------------------------------------------------ sync client


def test_sync_stream_unary_and_models(server):
    with PrismClient(server.target, timeout=10, metadata={"X-Tenant": "t1"}) as client:
        chunks = list(
            client.generate("hello there", max_new_tokens=3, request_id="r-1", metadata=[("x-call", "c")])
        )
        assert [c.text for c in chunks] == ["a", "b", "c"]
        assert chunks[0].timing.ttft_ms == 5 and chunks[-1].finish_reason == "length"
        assert chunks[-1].usage.prompt_tokens == 2 and chunks[0].request_id == "r-1"
        assert server.metadata[-1]["x-tenant"] == "t1" and server.metadata[-1]["x-call"] == "c"
        assert server.requests[-1].sampling.max_new_tokens == 3

        done = client.complete("hi", seed=5)
        assert (done.text, done.token_ids, done.finish_reason, done.request_id) == (
            "ok!",
            (7, 8),
            "stop",
            "unary-1",
        )
        assert server.requests[-1].sampling.seed == 5

        models = client.list_models()
        assert models.default_model == "tiny-llava" and [m.name for m in models] == [
            "tiny-llava",
            "tiny-audio",
        ]
        assert models.get("tiny-llava").modalities == ("text", "image")
        assert models.get("tiny-llava").max_images_per_request == 4

        assert client.generate("x").collect().text == "abc"


@pytest.mark.parametrize(
    "prompt, model, cls, message",
    [
        ("invalid", "", InvalidArgumentError, "prompt is invalid"),
        ("busy", "", ResourceExhaustedError, "queue is full"),
        ("unavailable", "", UnavailableError, "draining"),
        ("hi", "missing", NotFoundError, "unknown model 'missing'"),
    ],
)
def test_sync_typed_errors(server, prompt, model, cls, message):
    with PrismClient(server.target, timeout=10) as client:
        with pytest.raises(cls) as info:
            list(client.generate(prompt, model=model))
        assert info.value.message == message
        with pytest.raises(cls) as info2:
            client.complete(prompt, model=model)
        if cls is ResourceExhaustedError:
            assert info.value.retry_after_s == 1.5 and info2.value.retry_after_s == 1.5
            assert info.value.details["retry-after-ms"] == "1500"


def test_sync_error_mid_stream_and_deadline(server):
    with PrismClient(server.target) as client:
        stream = client.generate("fail-late")
        assert next(stream).text == "a" and next(stream).text == "b"
        with pytest.raises(InternalError, match="decode worker died"):
            next(stream)
        with pytest.raises(DeadlineExceededError):
            list(client.generate("forever", timeout=0.2))
    with PrismClient("127.0.0.1:1", timeout=2) as client, pytest.raises(UnavailableError):
        client.list_models()  # nothing listens there


def test_sync_cancel_reaches_the_server(server):
    with PrismClient(server.target, timeout=30) as client:
        with client.generate("forever") as stream:
            got = [next(stream), next(stream)]
            assert [c.token_ids for c in got] == [(0,), (1,)]
            stream.cancel()
            assert list(stream) == []  # ends quietly after our own cancel
        assert server.cancelled.wait(5)


def test_sync_cancel_on_leaving_the_with_block(server):
    with PrismClient(server.target, timeout=30) as client:
        with client.generate("forever") as stream:
            next(stream)
        assert server.cancelled.wait(5)


def test_media_reach_the_server_intact(server):
    img, wav = png_bytes(), wav_bytes()
    samples = np.stack([np.linspace(-1, 1, 64), np.linspace(1, -1, 64)], axis=1).astype(np.float32)
    pil = Image.new("RGBA", (4, 4), (1, 2, 3, 4))
    with PrismClient(server.target, timeout=10) as client:
        chunks = list(
            client.generate("look <image> listen", images=[img, pil], audios=[wav, (samples, 22050)])
        )
        assert chunks[-1].usage.image_tokens == 2 and chunks[-1].usage.audio_tokens == 2
        media = server.requests[-1].media
        assert media[0].image.data == img and media[0].image.mime_type == "image/png"
        assert Image.open(io.BytesIO(media[1].image.data)).getpixel((0, 0)) == (1, 2, 3, 4)
        assert media[2].audio.wav == wav
        pcm = media[3].audio.pcm
        assert (pcm.sample_rate, pcm.channels) == (22050, 2)
        assert np.array_equal(np.frombuffer(pcm.samples_f32le, dtype="<f4").reshape(-1, 2), samples)

        done = client.complete(
            messages=[
                {
                    "role": "user",
                    "content": [
                        {"type": "text", "text": "what"},
                        {"type": "image", "image": img},
                        {"type": "audio", "audio": wav},
                    ],
                },
            ]
        )
        assert done.usage.image_tokens == 1 and done.usage.audio_tokens == 1
        chat = server.requests[-1].chat
        assert chat.messages[0].content[1].media.image.data == img
        assert chat.messages[0].content[2].media.audio.wav == wav


# ------------------------------------------------------------------ asyncio client


async def test_async_stream_unary_and_models(server):
    async with AsyncPrismClient(server.target, timeout=10, metadata=[("x-tenant", "t2")]) as client:
        chunks = [c async for c in client.generate(messages=[{"role": "user", "content": "hey"}], priority=3)]
        assert "".join(c.text for c in chunks) == "abc" and chunks[-1].usage.generated_tokens == 3
        assert server.requests[-1].priority == 3 and server.metadata[-1]["x-tenant"] == "t2"
        done = await client.complete("hi", images=[png_bytes()])
        assert done.text == "ok!" and done.usage.image_tokens == 1
        models = await client.list_models()
        assert len(models) == 2 and models.default_model == "tiny-llava"
        assert (await client.generate("x").collect()).token_ids == (1, 2, 3)


async def test_async_typed_errors(server):
    async with AsyncPrismClient(server.target, timeout=10) as client:
        with pytest.raises(ResourceExhaustedError) as info:
            [c async for c in client.generate("busy")]
        assert info.value.retry_after_s == 1.5
        with pytest.raises(ResourceExhaustedError) as info:
            await client.complete("busy")
        assert info.value.retry_after_s == 1.5
        with pytest.raises(InvalidArgumentError, match="prompt is invalid"):
            await client.complete(messages=[{"role": "user", "content": "invalid"}])
        with pytest.raises(NotFoundError):
            [c async for c in client.generate("x", model="missing")]
        stream = client.generate("fail-late")
        with pytest.raises(InternalError):
            async for _ in stream:
                pass
        with pytest.raises(DeadlineExceededError):
            [c async for c in client.generate("forever", timeout=0.2)]
        with pytest.raises(PrismError):  # every error is a PrismError
            await client.complete("unavailable")


async def test_async_cancel_reaches_the_server(server):
    async with AsyncPrismClient(server.target, timeout=30) as client:
        stream = client.generate("forever")
        seen = []
        async for chunk in stream:
            seen.append(chunk.token_ids[0])
            if len(seen) == 3:
                stream.cancel()
        assert seen == [0, 1, 2]  # the loop ended quietly after cancel()
        deadline = time.monotonic() + 5
        while not server.cancelled.is_set() and time.monotonic() < deadline:
            await asyncio.sleep(0.02)
        assert server.cancelled.is_set()


async def test_async_cancel_by_task_cancellation(server):
    async with AsyncPrismClient(server.target, timeout=30) as client:

        async def consume():
            async with client.generate("forever") as stream:
                async for _ in stream:
                    pass

        task = asyncio.create_task(consume())
        while not server.streaming.is_set():
            await asyncio.sleep(0.01)
        await asyncio.sleep(0.05)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        deadline = time.monotonic() + 5
        while not server.cancelled.is_set() and time.monotonic() < deadline:
            await asyncio.sleep(0.02)
        assert server.cancelled.is_set()


def test_stream_broken_mid_way_resumes_with_each_token_once(server):
    fake = server
    with PrismClient(fake.target) as client:
        chunks = list(client.generate("flaky", max_new_tokens=3))
    assert [t for c in chunks for t in c.token_ids] == [1, 2, 3]
    assert chunks[-1].finish_reason == "length"
    rids = {r.request_id for r in fake.requests if _text(r) == "flaky"}
    assert len(rids) == 1 and fake.calls[rids.pop()] == 2  # the same request id, sent twice


async def test_async_stream_broken_mid_way_resumes_with_each_token_once(server):
    fake = server
    async with AsyncPrismClient(fake.target) as client:
        tokens = [t async for c in client.generate("flaky", request_id="resume-me") for t in c.token_ids]
    assert tokens == [1, 2, 3] and fake.calls["resume-me"] == 2
