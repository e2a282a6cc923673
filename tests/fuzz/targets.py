"""Fuzz targets: the code that takes bytes from outside (request validation, image and audio
decoding, the tensor wire codec). Each target takes raw bytes and checks the contract: the input
is accepted cleanly, or refused with a precise error naming its field -- never another
exception. Driven by hypothesis in the test suite and by atheris (coverage-guided, with
libFuzzer's hang and memory limits) through `python -m tests.fuzz.run TARGET`."""
from __future__ import annotations

import math
from pathlib import Path

from google.protobuf.message import DecodeError

from prism.media import InputError, MediaLimits, decode_image, decode_pcm, decode_wav
from prism.v1 import common_pb2, prism_pb2

LIMITS = MediaLimits(max_image_pixels=1 << 20, max_audio_seconds=5.0)
#: Status codes a refused request may carry: each a precise one (never INTERNAL or UNKNOWN).
REQUEST_CODES = {"INVALID_ARGUMENT", "NOT_FOUND", "OUT_OF_RANGE", "RESOURCE_EXHAUSTED", "FAILED_PRECONDITION"}

_models: dict | None = None


def load_models(model_dirs: dict[str, Path]) -> None:
    """The models `request` validates against (loaded once: processors and tokenizers only)."""
    global _models
    from services.scheduler.intake import ServedModel

    _models = {m.name: m for m in (ServedModel.load(name, path, 512) for name, path in model_dirs.items())}


def image(data: bytes) -> None:
    try:
        img = decode_image(data, "media[0].image.data", LIMITS)
    except InputError as exc:
        assert exc.field == "media[0].image.data" and exc.reason
        return
    assert img.mode == "RGB" and img.width >= 1 and img.height >= 1
    assert img.width * img.height <= LIMITS.max_image_pixels


def _audio(call, field: str) -> None:
    try:
        out = call()
    except InputError as exc:
        assert exc.field.startswith(field) and exc.reason
        return
    import numpy as np

    assert out.dtype == np.float32 and out.ndim == 1 and 1 <= out.size <= 16000 * LIMITS.max_audio_seconds + 1
    assert bool(np.isfinite(out).all())


def wav(data: bytes) -> None:
    _audio(lambda: decode_wav(data, "media[0].audio.data", 16000, LIMITS), "media[0].audio")


def pcm(data: bytes) -> None:
    rate = int.from_bytes(data[:3], "little") if len(data) >= 3 else 16000
    channels = data[3] if len(data) >= 4 else 1
    _audio(lambda: decode_pcm(data[4:], rate, channels, "media[0].audio.pcm", 16000, LIMITS), "media[0].audio")


def tensor(data: bytes) -> None:
    """A `Tensor` or a `TensorChunk` message off the wire, turned into a torch tensor."""
    from prism.wire.tensors import chunk_tensor, tensor_from_proto

    kind, body = (data[:1], data[1:]) if data else (b"\0", b"")
    try:
        if kind[0] % 2:
            msg = common_pb2.TensorChunk.FromString(body)
            field = "chunk"
            out = chunk_tensor(msg, field=field)
        else:
            msg = common_pb2.Tensor.FromString(body)
            field = "tensor"
            out = tensor_from_proto(msg, field=field)
    except DecodeError:
        return
    except ValueError as exc:
        assert str(exc).startswith(field) and len(str(exc)) > len(field)
        return
    assert math.prod(out.shape) * out.element_size() == len(msg.data)


def request(data: bytes) -> None:
    """A `GenerateRequest` off the wire, through the front door's validation."""
    try:
        req = prism_pb2.GenerateRequest.FromString(data)
    except DecodeError:
        return
    request_message(req)


def request_message(req: prism_pb2.GenerateRequest) -> None:
    from services.scheduler.intake import Limits, RequestError, admit

    assert _models is not None, "load_models first"
    try:
        adm = admit(req, _models, next(iter(_models)), Limits(max_images=3, max_audios=2, max_image_pixels=1 << 18,
                                                                 max_audio_seconds=3.0, max_new_tokens=64))
    except RequestError as exc:
        assert exc.code in REQUEST_CODES and exc.field and exc.reason, (exc.code, exc.field, exc.reason)
        return
    assert 1 <= adm.max_new_tokens <= 64 and len(adm.prompt.input_ids) + adm.max_new_tokens <= adm.model.max_context


TARGETS = {"image": image, "wav": wav, "pcm": pcm, "tensor": tensor, "request": request}
