"""Media for requests: images and audio from what callers usually have at hand.

Images (:func:`to_image`): encoded bytes (PNG, JPEG, WebP, BMP, GIF; passed through as they
are), a file path, a ``data:image/...;base64,`` URL, or a ``PIL.Image.Image`` (encoded to PNG).

Audio (:func:`to_audio`): WAV file bytes (passed through), a ``.wav`` path, or samples as a
float array plus a sample rate (``(samples, sample_rate)`` or ``to_audio(samples,
sample_rate=...)``), sent as ``PcmAudio`` float32 little-endian, mono or 2-channel interleaved.

Neither numpy nor PIL is imported here unless the caller passes such an object (which means the
caller already imported it). Anything else raises a ``TypeError`` (wrong kind of object) or a
``ValueError`` (right kind, bad content) that says what is accepted.
"""

from __future__ import annotations

import base64
import binascii
import io
import os
import sys
from pathlib import Path
from typing import Any

from prism.v1 import prism_pb2

_IMAGE_MAGIC = (
    (b"\x89PNG\r\n\x1a\n", "image/png"),
    (b"\xff\xd8\xff", "image/jpeg"),
    (b"GIF87a", "image/gif"),
    (b"GIF89a", "image/gif"),
    (b"BM", "image/bmp"),
)
_PNG_MODES = {"1", "L", "LA", "I", "I;16", "P", "RGB", "RGBA"}
MAX_SAMPLE_RATE = 1_000_000
BytesLike = (bytes, bytearray, memoryview)


def sniff_image(data: bytes) -> str | None:
    """MIME type of encoded image bytes the server accepts, or None."""
    for magic, mime in _IMAGE_MAGIC:
        if data.startswith(magic):
            return mime
    if len(data) >= 12 and data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        return "image/webp"
    return None


def is_wav(data: bytes) -> bool:
    """Whether ``data`` starts like a RIFF/WAVE file."""
    return len(data) >= 12 and data[:4] == b"RIFF" and data[8:12] == b"WAVE"


def _pil_image_class():
    mod = sys.modules.get("PIL.Image")  # only when the caller already imported PIL
    return getattr(mod, "Image", None) if mod is not None else None


def _is_pathlike(x: Any) -> bool:
    return isinstance(x, (str, os.PathLike))


def _read_path(x: str | os.PathLike, what: str) -> bytes:
    s = os.fspath(x)
    if isinstance(s, str) and s.startswith(("http://", "https://")):
        raise ValueError(
            f"{what}: URLs are not fetched by the client; download the bytes and pass them ({s[:80]})"
        )
    path = Path(s)
    if not path.is_file():
        raise FileNotFoundError(f"{what}: no such file: {path}")
    return path.read_bytes()


def _data_url(url: str, what: str) -> tuple[bytes, str]:
    head, sep, payload = url.partition(",")
    if not sep or not head.endswith(";base64"):
        raise ValueError(f"{what}: only base64 data URLs are supported ('data:<mime>;base64,<data>')")
    try:
        return base64.b64decode(payload, validate=True), head[5:-7]
    except (binascii.Error, ValueError) as e:
        raise ValueError(f"{what}: invalid base64 in data URL ({e})") from None


def _encode_pil(img: Any) -> bytes:
    if img.mode not in _PNG_MODES:
        img = img.convert("RGBA" if "A" in img.getbands() else "RGB")
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()


def _encoded_bytes(x: Any, what: str) -> bytes | None:
    """The encoded file behind bytes, a data URL or a path; None for anything else."""
    if isinstance(x, BytesLike):
        return bytes(x)
    if isinstance(x, str) and x.startswith("data:"):
        return _data_url(x, what)[0]
    if _is_pathlike(x):
        return _read_path(x, what)
    return None


def to_image(x: Any, *, mime_type: str | None = None, what: str = "image") -> prism_pb2.Image:
    """``prism.v1.Image`` from bytes, a path, a data URL, a PIL image or an ``Image`` message."""
    if isinstance(x, prism_pb2.Image):
        return x
    pil = _pil_image_class()
    if pil is not None and isinstance(x, pil):
        return prism_pb2.Image(data=_encode_pil(x), mime_type="image/png")
    data = _encoded_bytes(x, what)
    if data is None:
        raise TypeError(
            f"{what}: expected encoded image bytes, a file path, a data URL or a PIL.Image.Image, "
            f"not {type(x).__name__}"
        )
    if not data:
        raise ValueError(f"{what}: empty image data")
    sniffed = sniff_image(data)
    if sniffed is None:
        raise ValueError(f"{what}: not a PNG, JPEG, WebP, BMP or GIF image (starts with {data[:8]!r})")
    return prism_pb2.Image(data=data, mime_type=mime_type or sniffed)


def _looks_like_array(x: Any) -> bool:
    return hasattr(x, "__array_interface__") or hasattr(x, "__array__")


def to_pcm(samples: Any, sample_rate: int, *, what: str = "audio") -> prism_pb2.PcmAudio:
    """``PcmAudio`` from float samples: shape ``[frames]`` (mono), ``[frames, channels]`` or
    ``[channels, frames]`` with 1 or 2 channels (interleaved on the wire). Any array-like with
    ``__array__`` works (numpy, CPU torch tensors); integer samples are refused (scale them to
    floats in [-1, 1] first, e.g. ``int16 / 32768``)."""
    import numpy as np  # the caller passed an array, so numpy is already loaded

    if isinstance(sample_rate, bool) or not isinstance(sample_rate, int):
        raise TypeError(f"{what}: sample_rate must be an int, not {type(sample_rate).__name__}")
    if not 0 < sample_rate <= MAX_SAMPLE_RATE:
        raise ValueError(f"{what}: sample_rate must be in 1..{MAX_SAMPLE_RATE}, not {sample_rate}")
    a = np.asarray(samples)
    if a.dtype.kind != "f":
        raise TypeError(
            f"{what}: samples must be floating point (got {a.dtype}); scale integer PCM to [-1, 1] first"
        )
    if a.ndim == 1:
        channels = 1
    elif a.ndim == 2 and a.shape[1] in (1, 2):
        channels = a.shape[1]
    elif a.ndim == 2 and a.shape[0] in (1, 2):
        a, channels = a.T, a.shape[0]
    else:
        raise ValueError(
            f"{what}: samples must be [frames], [frames, channels] or [channels, frames] with 1 or 2 "
            f"channels, not shape {list(a.shape)}"
        )
    if a.size == 0:
        raise ValueError(f"{what}: no samples")
    a = np.ascontiguousarray(a, dtype="<f4")
    if not np.isfinite(a).all():
        raise ValueError(f"{what}: samples contain NaN or infinity")
    return prism_pb2.PcmAudio(samples_f32le=a.tobytes(), sample_rate=sample_rate, channels=channels)


def to_audio(x: Any, *, sample_rate: int | None = None, what: str = "audio") -> prism_pb2.Audio:
    """``prism.v1.Audio`` from WAV bytes, a ``.wav`` path, ``(samples, sample_rate)``, an array
    with ``sample_rate=``, or an ``Audio`` / ``PcmAudio`` message."""
    if isinstance(x, prism_pb2.Audio):
        return x
    if isinstance(x, prism_pb2.PcmAudio):
        return prism_pb2.Audio(pcm=x)
    if (
        isinstance(x, tuple)
        and len(x) == 2
        and isinstance(x[1], int)
        and not isinstance(x[0], (str, *BytesLike))
    ):
        if sample_rate is not None:
            raise ValueError(f"{what}: give the sample rate in the tuple or as sample_rate=, not both")
        return prism_pb2.Audio(pcm=to_pcm(x[0], x[1], what=what))
    if _looks_like_array(x) and not isinstance(x, BytesLike):
        if sample_rate is None:
            raise ValueError(f"{what}: samples need a sample rate: pass (samples, sample_rate)")
        return prism_pb2.Audio(pcm=to_pcm(x, sample_rate, what=what))
    data = _encoded_bytes(x, what)
    if data is None:
        raise TypeError(
            f"{what}: expected WAV bytes, a .wav path, (samples, sample_rate) or an array with "
            f"sample_rate=, not {type(x).__name__}"
        )
    if not is_wav(data):
        raise ValueError(
            f"{what}: not a WAV (RIFF/WAVE) file (starts with {data[:12]!r}); other formats must be "
            "decoded by the caller and passed as (samples, sample_rate)"
        )
    return prism_pb2.Audio(wav=data)


def image_part(x: Any, *, what: str = "image") -> prism_pb2.MediaPart:
    return prism_pb2.MediaPart(image=to_image(x, what=what))


def audio_part(x: Any, *, what: str = "audio") -> prism_pb2.MediaPart:
    return prism_pb2.MediaPart(audio=to_audio(x, what=what))


def media_part(x: Any, *, what: str = "media") -> prism_pb2.MediaPart:
    """A ``MediaPart`` from an ``Image``/``Audio``/``MediaPart`` message (others: use
    :func:`image_part` or :func:`audio_part`, which know the kind)."""
    if isinstance(x, prism_pb2.MediaPart):
        return x
    if isinstance(x, prism_pb2.Image):
        return prism_pb2.MediaPart(image=x)
    if isinstance(x, (prism_pb2.Audio, prism_pb2.PcmAudio)):
        return prism_pb2.MediaPart(audio=to_audio(x))
    raise TypeError(f"{what}: expected an Image, Audio or MediaPart message, not {type(x).__name__}")


__all__ = [
    "audio_part",
    "image_part",
    "is_wav",
    "media_part",
    "sniff_image",
    "to_audio",
    "to_image",
    "to_pcm",
]
