"""prism.client without a server: media conversion, request building, error mapping, imports."""

from __future__ import annotations

import base64
import io
import subprocess
import sys
import wave

import grpc
import numpy as np
import pytest
from PIL import Image

from prism.client import (
    CancelledError,
    Completion,
    DeadlineExceededError,
    InvalidArgumentError,
    PrismError,
    ResourceExhaustedError,
    TokenChunk,
    UnavailableError,
    UnknownError,
    build_request,
    from_rpc_error,
    to_audio,
    to_image,
    to_pcm,
)
from prism.client.errors import error_class
from prism.v1 import common_pb2, prism_pb2


def png_bytes(size=(4, 3), color=(255, 0, 0)) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", size, color).save(buf, format="PNG")
    return buf.getvalue()


def wav_bytes(n=160, rate=16000) -> bytes:
    buf = io.BytesIO()
    with wave.open(buf, "wb") as w:
        w.setnchannels(1)
        w.setsampwidth(2)
        w.setframerate(rate)
        w.writeframes(np.zeros(n, dtype="<i2").tobytes())
    return buf.getvalue()


# ------------------------------------------------------------------ imports


def test_import_needs_neither_torch_nor_numpy():
    code = (
        "import sys, prism.client, prism.client.media, prism.client.errors\n"
        "prism.client.build_request('x', images=[b'\\x89PNG\\r\\n\\x1a\\n'])\n"
        "bad = [m for m in ('torch', 'numpy', 'PIL') if m in sys.modules]\n"
        "assert not bad, bad\n"
    )
    subprocess.run(
        [sys.executable, "-c", code], check=True, cwd=str(__import__("pathlib").Path(__file__).parents[2])
    )


# ------------------------------------------------------------------ images


def test_image_from_bytes_is_passed_through():
    data = png_bytes()
    img = to_image(data)
    assert img.data == data and img.mime_type == "image/png"
    assert to_image(bytearray(data)).data == data
    jpeg = b"\xff\xd8\xff\xe0" + b"\0" * 10
    assert to_image(jpeg).mime_type == "image/jpeg"
    assert to_image(b"RIFF\0\0\0\0WEBPVP8 ").mime_type == "image/webp"
    assert to_image(b"GIF89a...").mime_type == "image/gif"
    assert to_image(b"BM....", mime_type="image/x-bmp").mime_type == "image/x-bmp"


def test_image_from_path_data_url_and_pil(tmp_path):
    data = png_bytes()
    p = tmp_path / "a.png"
    p.write_bytes(data)
    assert to_image(p).data == data and to_image(str(p)).data == data
    url = "data:image/png;base64," + base64.b64encode(data).decode()
    assert to_image(url).data == data
    pil = Image.new("RGB", (5, 2), (1, 2, 3))
    out = to_image(pil)
    assert out.mime_type == "image/png"
    back = Image.open(io.BytesIO(out.data))
    assert back.size == (5, 2) and back.getpixel((0, 0)) == (1, 2, 3)
    cmyk = Image.new("CMYK", (2, 2))
    assert Image.open(io.BytesIO(to_image(cmyk).data)).mode == "RGB"


@pytest.mark.parametrize(
    "value, exc, match",
    [
        (123, TypeError, "expected encoded image bytes"),
        (b"", ValueError, "empty image data"),
        (b"hello world", ValueError, "not a PNG, JPEG, WebP, BMP or GIF"),
        ("https://example.com/cat.png", ValueError, "URLs are not fetched"),
        ("/definitely/not/here.png", FileNotFoundError, "no such file"),
        ("data:image/png;base64,@@@", ValueError, "invalid base64"),
        ("data:image/png,raw", ValueError, "only base64 data URLs"),
    ],
)
def test_bad_images(value, exc, match):
    with pytest.raises(exc, match=match):
        to_image(value)


# ------------------------------------------------------------------ audio


def test_audio_from_wav_bytes_and_path(tmp_path):
    wav = wav_bytes()
    assert to_audio(wav).wav == wav
    p = tmp_path / "a.wav"
    p.write_bytes(wav)
    assert to_audio(p).wav == wav
    with pytest.raises(ValueError, match="not a WAV"):
        to_audio(b"ID3\x03mp3 data here")
    bad = tmp_path / "a.mp3"
    bad.write_bytes(b"ID3\x03" + b"\0" * 20)
    with pytest.raises(ValueError, match="not a WAV"):
        to_audio(bad)


def test_audio_from_arrays():
    mono = np.linspace(-1, 1, 100, dtype=np.float64)
    pcm = to_audio((mono, 16000)).pcm
    assert (pcm.sample_rate, pcm.channels) == (16000, 1)
    assert np.array_equal(np.frombuffer(pcm.samples_f32le, dtype="<f4"), mono.astype(np.float32))
    stereo = np.stack([np.full(50, 0.25), np.full(50, -0.5)], axis=1).astype(np.float32)  # [frames, 2]
    pcm = to_audio(stereo, sample_rate=8000).pcm
    assert pcm.channels == 2
    assert np.frombuffer(pcm.samples_f32le, dtype="<f4")[:4].tolist() == [0.25, -0.5, 0.25, -0.5]
    pcm_cf = to_pcm(stereo.T, 8000)  # [channels, frames] is interleaved the same way
    assert pcm_cf.samples_f32le == pcm.samples_f32le
    assert to_pcm([0.1, 0.2], 16000).channels == 1


@pytest.mark.parametrize(
    "value, kwargs, exc, match",
    [
        ((np.zeros(10, dtype=np.int16), 16000), {}, TypeError, "floating point"),
        ((np.array([0.0, np.nan]), 16000), {}, ValueError, "NaN or infinity"),
        ((np.zeros(10), 0), {}, ValueError, "sample_rate must be in"),
        ((np.zeros(10), 16000.0), {}, TypeError, "expected WAV bytes"),
        ((np.zeros((3, 10)), 16000), {}, ValueError, "1 or 2 channels"),
        ((np.zeros(0), 16000), {}, ValueError, "no samples"),
        (np.zeros(10), {}, ValueError, "need a sample rate"),
        ((np.zeros(10), 16000), {"sample_rate": 8000}, ValueError, "not both"),
        (3.5, {}, TypeError, "expected WAV bytes"),
    ],
)
def test_bad_audio(value, kwargs, exc, match):
    with pytest.raises(exc, match=match):
        to_audio(value, **kwargs)


# ------------------------------------------------------------------ requests


def test_build_prompt_request_with_media():
    img, wav = png_bytes(), wav_bytes()
    req = build_request(
        "Describe <image>.",
        images=[img],
        audios=[wav, (np.zeros(4, np.float32), 16000)],
        model="m",
        max_new_tokens=32,
        temperature=0.7,
        top_p=0.9,
        top_k=40,
        seed=2**64 - 1,
        stop="END",
        stop_token_ids=[2, 3],
        ignore_eos=True,
        ttft_ms=500,
        tpot_ms=50,
        deadline_ms=9000,
        priority=-1,
        request_id="req-1.a_b",
    )
    assert req.WhichOneof("input") == "prompt" and req.prompt == "Describe <image>."
    assert [m.WhichOneof("kind") for m in req.media] == ["image", "audio", "audio"]
    assert req.media[0].image.data == img and req.media[1].audio.wav == wav
    assert req.media[2].audio.pcm.sample_rate == 16000
    s = req.sampling
    assert (s.max_new_tokens, s.top_k, s.seed, list(s.stop), list(s.stop_token_ids), s.ignore_eos) == (
        32,
        40,
        2**64 - 1,
        ["END"],
        [2, 3],
        True,
    )
    assert s.temperature == pytest.approx(0.7) and s.top_p == pytest.approx(0.9)
    assert (req.slo.ttft_ms, req.slo.tpot_ms, req.slo.deadline_ms, req.priority) == (500, 50, 9000, -1)
    assert (req.model, req.request_id) == ("m", "req-1.a_b")
    assert prism_pb2.GenerateRequest.FromString(req.SerializeToString()) == req


def test_build_request_defaults_and_single_media_items():
    req = build_request("hi", images=png_bytes())
    assert len(req.media) == 1
    assert not req.sampling.HasField("seed") and req.sampling.max_new_tokens == 0
    assert len(build_request("x", audios=(np.zeros(8, np.float32), 16000)).media) == 1


def test_build_chat_request():
    img, wav = png_bytes(), wav_bytes()
    url = "data:image/png;base64," + base64.b64encode(img).decode()
    req = build_request(
        messages=[
            {"role": "system", "content": "Be brief."},
            {
                "role": "user",
                "content": [
                    {"type": "text", "text": "What is this?"},
                    {"type": "image", "image": img},
                    {"type": "image_url", "image_url": {"url": url}},
                    {"type": "audio", "audio": wav},
                    {"type": "audio", "audio": np.zeros(4, np.float32), "sample_rate": 8000},
                    {
                        "type": "input_audio",
                        "input_audio": {"data": base64.b64encode(wav).decode(), "format": "wav"},
                    },
                    "and a bare string",
                ],
            },
            {"role": "assistant", "content": None},
        ],
        add_generation_prompt=False,
    )
    chat = req.chat
    assert [m.role for m in chat.messages] == ["system", "user", "assistant"]
    parts = chat.messages[1].content
    assert [p.WhichOneof("part") for p in parts] == [
        "text",
        "media",
        "media",
        "media",
        "media",
        "media",
        "text",
    ]
    assert parts[1].media.image.data == img and parts[2].media.image.data == img
    assert parts[3].media.audio.wav == wav and parts[5].media.audio.wav == wav
    assert parts[4].media.audio.pcm.sample_rate == 8000
    assert chat.HasField("add_generation_prompt") and not chat.add_generation_prompt
    assert not build_request(messages=[{"role": "user", "content": "x"}]).chat.HasField(
        "add_generation_prompt"
    )


@pytest.mark.parametrize(
    "args, kwargs, exc, match",
    [
        ((), {}, ValueError, "exactly one of prompt or messages"),
        (("x",), {"messages": [{"role": "user", "content": "y"}]}, ValueError, "exactly one"),
        ((5,), {}, TypeError, "prompt must be a str"),
        ((), {"messages": [{"role": "user", "content": "y"}], "images": [b"x"]}, ValueError, "content parts"),
        ((), {"messages": []}, ValueError, "messages is empty"),
        ((), {"messages": "hi"}, TypeError, "list of"),
        ((), {"messages": [{"role": "robot", "content": "y"}]}, ValueError, r"messages\[0\]\.role"),
        (
            (),
            {"messages": [{"role": "user", "content": [{"type": "video"}]}]},
            ValueError,
            r"messages\[0\]\.content\[0\]: unknown part type 'video'",
        ),
        (
            (),
            {"messages": [{"role": "user", "content": [{"type": "image", "image": b"nope"}]}]},
            ValueError,
            r"messages\[0\]\.content\[0\]: not a PNG",
        ),
        (
            (),
            {
                "messages": [
                    {"role": "user", "content": [{"type": "image_url", "image_url": "http://x/y.png"}]}
                ]
            },
            ValueError,
            "only data: URLs",
        ),
        (
            (),
            {"messages": [{"role": "user", "content": [{"type": "audio"}]}]},
            ValueError,
            "needs an 'audio' key",
        ),
        (("x",), {"images": [b"nope"]}, ValueError, r"images\[0\]: not a PNG"),
        (("x",), {"images": 5}, TypeError, "images must be a sequence"),
        (("x",), {"temperature": -1}, ValueError, "temperature must be in"),
        (("x",), {"temperature": float("nan")}, ValueError, "temperature"),
        (("x",), {"top_p": 1.5}, ValueError, "top_p"),
        (("x",), {"top_k": -1}, ValueError, "top_k"),
        (("x",), {"max_new_tokens": 2**31}, ValueError, "max_new_tokens"),
        (("x",), {"max_new_tokens": 1.5}, TypeError, "max_new_tokens must be an int"),
        (("x",), {"seed": -1}, ValueError, "seed"),
        (("x",), {"seed": True}, TypeError, "seed"),
        (("x",), {"stop": [""]}, ValueError, r"stop\[0\]"),
        (("x",), {"stop_token_ids": [-1]}, ValueError, r"stop_token_ids\[0\]"),
        (("x",), {"request_id": "has space"}, ValueError, "request_id"),
        (("x",), {"request_id": "a" * 129}, ValueError, "request_id"),
        (("x",), {"deadline_ms": -5}, ValueError, "deadline_ms"),
        (("x",), {"ignore_eos": 1}, TypeError, "ignore_eos"),
        (("x",), {"add_generation_prompt": True}, ValueError, "messages only"),
    ],
)
def test_build_request_rejects(args, kwargs, exc, match):
    with pytest.raises(exc, match=match):
        build_request(*args, **kwargs)


def test_result_types_from_protos():
    first = prism_pb2.GenerateResponse(
        request_id="r", token_ids=[1], text="He", timing=prism_pb2.Timing(ttft_ms=12.5)
    )
    mid = prism_pb2.GenerateResponse(request_id="r", token_ids=[2], text="llo")
    last = prism_pb2.GenerateResponse(
        request_id="r",
        token_ids=[3],
        text="!",
        finish_reason=common_pb2.FINISH_REASON_LENGTH,
        timing=prism_pb2.Timing(ttft_ms=12.5, e2e_ms=40),
        usage=prism_pb2.Usage(prompt_tokens=5, generated_tokens=3),
    )
    chunks = [TokenChunk.from_proto(m) for m in (first, mid, last)]
    assert chunks[0].timing.ttft_ms == 12.5 and chunks[0].usage is None and chunks[0].finish_reason is None
    assert chunks[1].timing is None
    done = Completion.from_chunks(chunks)
    assert (
        done.text,
        done.token_ids,
        done.finish_reason,
        done.usage.generated_tokens,
        done.timing.e2e_ms,
    ) == ("Hello!", (1, 2, 3), "length", 3, 40)


# ------------------------------------------------------------------ errors


class FakeRpcError(grpc.RpcError):
    def __init__(self, code, details="", trailing=()):
        self._code, self._details, self._trailing = code, details, trailing

    def code(self):
        return self._code

    def details(self):
        return self._details

    def trailing_metadata(self):
        return self._trailing


def test_every_status_code_has_a_class():
    for code in grpc.StatusCode:
        cls = error_class(code)
        assert issubclass(cls, PrismError)
        if code != grpc.StatusCode.OK:
            assert cls is not PrismError and code.name.replace("_", "").lower() in cls.__name__.lower()


def test_error_mapping_with_retry_hint():
    err = from_rpc_error(
        FakeRpcError(
            grpc.StatusCode.RESOURCE_EXHAUSTED,
            "queue full",
            (("retry-after-ms", "1500"), ("x-b-bin", b"\x00")),
        )
    )
    assert isinstance(err, ResourceExhaustedError) and err.retryable
    assert err.retry_after_s == 1.5 and err.message == "queue full" and err.details["x-b-bin"] == b"\x00"
    assert str(err) == "RESOURCE_EXHAUSTED: queue full"
    assert isinstance(err.__cause__, FakeRpcError)
    assert (
        from_rpc_error(
            FakeRpcError(grpc.StatusCode.RESOURCE_EXHAUSTED, "x", (("retry-after-ms", "soon"),))
        ).retry_after_s
        is None
    )
    assert (
        from_rpc_error(
            FakeRpcError(grpc.StatusCode.UNAVAILABLE, "", (("retry-after-ms", "250"),))
        ).retry_after_s
        == 0.25
    )
    assert isinstance(
        from_rpc_error(FakeRpcError(grpc.StatusCode.INVALID_ARGUMENT, "bad")), InvalidArgumentError
    )
    assert isinstance(from_rpc_error(FakeRpcError(grpc.StatusCode.DEADLINE_EXCEEDED)), DeadlineExceededError)
    assert isinstance(from_rpc_error(FakeRpcError(grpc.StatusCode.CANCELLED)), CancelledError)
    assert isinstance(from_rpc_error(FakeRpcError(grpc.StatusCode.UNAVAILABLE)), UnavailableError)
    assert isinstance(from_rpc_error(grpc.RpcError()), UnknownError)  # no code() at all


def test_errors_pickle():
    import pickle

    err = from_rpc_error(
        FakeRpcError(grpc.StatusCode.RESOURCE_EXHAUSTED, "busy", (("retry-after-ms", "10"),))
    )
    back = pickle.loads(pickle.dumps(err))
    assert type(back) is ResourceExhaustedError and back.retry_after_s == 0.01 and back.message == "busy"


def test_reduce_maps_to_the_selection_message_and_checks_its_fields():
    import pytest

    from prism.client import Reduce, build_request
    from prism.v1 import common_pb2

    req = build_request("hi", reduce=Reduce(accuracy_floor=0.7, drop_modalities=("audio",), drop_images=True,
                                            min_images=2, downscale_images=True, min_image_scale=0.5))
    sel = req.selection
    assert (sel.accuracy_floor, list(sel.drop_modalities), sel.drop_images, sel.min_images) == (
        0.7, [common_pb2.MODALITY_AUDIO], True, 2)
    assert sel.downscale_images and sel.min_image_scale == 0.5 and not sel.trim_audio
    assert not build_request("hi").HasField("selection")
    with pytest.raises(ValueError, match="accuracy_floor"):
        build_request("hi", reduce=Reduce(accuracy_floor=1.5))
    with pytest.raises(ValueError, match="drop_modalities"):
        build_request("hi", reduce=Reduce(drop_modalities=("video",)))
    with pytest.raises(TypeError, match="reduce"):
        build_request("hi", reduce={"drop_images": True})
