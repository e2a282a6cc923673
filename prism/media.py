"""Decoding of untrusted media bytes with precise errors.

Every failure raises `InputError(field, reason)` naming the request field at fault, so the
front door can answer INVALID_ARGUMENT before any work is spent. Images are decoded with PIL
(format allow-list, pixel limit checked from the header before decoding); audio comes as WAV
(PCM 8/16/24/32-bit or IEEE float) or raw float32 PCM, is mixed to mono and resampled to the
model's rate.
"""
from __future__ import annotations

import io
import struct
import warnings
from dataclasses import dataclass
from fractions import Fraction

import numpy as np

from prism.models.base import InputError

IMAGE_FORMATS = frozenset({"PNG", "JPEG", "WEBP", "BMP", "GIF"})
#: Formats PIL reports for files of an allowed format: a multi-picture JPEG (what many phone
#: cameras write) opens as "MPO"; its first frame is the primary JPEG image.
FORMAT_ALIASES = {"MPO": "JPEG"}
MIN_SAMPLE_RATE = 1_000
MAX_SAMPLE_RATE = 384_000
#: Largest up/down factor of the polyphase resampler. Its filter has ~20 x max(up, down) taps, so
#: coprime rates (e.g. 383999 -> 16000) would cost seconds of CPU for any clip; such ratios are
#: approximated (every common rate reduces to factors <= 640 and stays exact).
MAX_RESAMPLE_FACTOR = 1_000
#: Largest |sample| accepted in float audio (full scale is 1.0; int16 values sent as floats fit).
MAX_SAMPLE_MAGNITUDE = 65536.0


@dataclass(frozen=True)
class MediaLimits:
    max_image_pixels: int = 4096 * 4096
    max_audio_seconds: float = 30.0


def decode_image(data: bytes, field: str, limits: MediaLimits):
    """PIL RGB image from encoded bytes."""
    from PIL import Image, UnidentifiedImageError

    if not data:
        raise InputError(field, "empty image data")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            img = Image.open(io.BytesIO(data))
            fmt = FORMAT_ALIASES.get(img.format, img.format)
            if fmt not in IMAGE_FORMATS:
                raise InputError(field, f"unsupported image format {fmt}; use one of {sorted(IMAGE_FORMATS)}")
            width, height = img.size
            if width < 1 or height < 1:
                raise InputError(field, f"image has no pixels ({width}x{height})")
            if width * height > limits.max_image_pixels:
                raise InputError(field, f"image of {width}x{height} pixels exceeds the limit of {limits.max_image_pixels}")
            img.load()
            return img.convert("RGB")
    except InputError:
        raise
    except (Image.DecompressionBombWarning, Image.DecompressionBombError):
        raise InputError(field, f"image exceeds the pixel limit of {limits.max_image_pixels} "
                                f"(or the decoder's own decompression-bomb limit)") from None
    except UnidentifiedImageError:
        raise InputError(field, "not a decodable image (unknown or corrupt format)") from None
    except (OSError, SyntaxError, ValueError, struct.error, EOFError) as exc:
        raise InputError(field, f"corrupt or truncated image: {exc}") from None


def _check_rate(rate: int, field: str) -> None:
    if not MIN_SAMPLE_RATE <= rate <= MAX_SAMPLE_RATE:
        raise InputError(field, f"sample rate {rate} Hz is outside [{MIN_SAMPLE_RATE}, {MAX_SAMPLE_RATE}]")


def _finish_audio(samples: np.ndarray, rate: int, target_rate: int, field: str, limits: MediaLimits) -> np.ndarray:
    if samples.size == 0:
        raise InputError(field, "audio has no samples")
    seconds = samples.shape[0] / rate
    if seconds > limits.max_audio_seconds:
        raise InputError(field, f"audio of {seconds:.2f} s exceeds the limit of {limits.max_audio_seconds:g} s")
    if not np.all(np.isfinite(samples)):
        raise InputError(field, "audio samples must be finite")
    if samples.size and float(np.max(np.abs(samples))) > MAX_SAMPLE_MAGNITUDE:
        # full scale is 1.0; far beyond it, resampling would overflow float32 (found by fuzzing)
        raise InputError(field, f"audio samples must be within ±{MAX_SAMPLE_MAGNITUDE:g} (full scale is 1.0)")
    if rate != target_rate:
        from scipy.signal import resample_poly

        ratio = Fraction(target_rate, rate)
        if max(ratio.numerator, ratio.denominator) > MAX_RESAMPLE_FACTOR:
            # keep both factors near MAX_RESAMPLE_FACTOR; the rate error is far below audibility
            ratio = ratio.limit_denominator(max(1, min(MAX_RESAMPLE_FACTOR, MAX_RESAMPLE_FACTOR * rate // target_rate)))
        samples = resample_poly(samples, ratio.numerator, ratio.denominator)
    return np.ascontiguousarray(samples, dtype=np.float32)


def _parse_wav(data: bytes, field: str) -> tuple[np.ndarray, int]:
    """(samples [frames, channels] float32, rate) from a RIFF/WAVE file."""
    if len(data) < 12 or data[:4] != b"RIFF" or data[8:12] != b"WAVE":
        raise InputError(field, "not a RIFF/WAVE file")
    pos, fmt, fmt_body, payload = 12, None, b"", None
    while pos + 8 <= len(data):
        chunk_id, size = data[pos : pos + 4], struct.unpack("<I", data[pos + 4 : pos + 8])[0]
        body = data[pos + 8 : pos + 8 + size]
        if len(body) < size and chunk_id != b"data":
            raise InputError(field, f"truncated WAV chunk {chunk_id!r}")
        if chunk_id == b"fmt ":
            if size < 16:
                raise InputError(field, "WAV fmt chunk too short")
            fmt, fmt_body = struct.unpack("<HHIIHH", body[:16]), body
        elif chunk_id == b"data":
            payload = body
            break
        pos += 8 + size + (size & 1)
    if fmt is None or payload is None:
        raise InputError(field, "WAV file lacks a fmt or data chunk")
    tag, channels, rate, _, block_align, bits = fmt
    if tag == 0xFFFE:  # WAVE_FORMAT_EXTENSIBLE: the sub-format GUID (fmt bytes 24..40) decides
        if len(fmt_body) < 26:
            raise InputError(field, "WAVE_FORMAT_EXTENSIBLE fmt chunk lacks its sub-format")
        tag = struct.unpack("<H", fmt_body[24:26])[0]
    if channels < 1 or channels > 8:
        raise InputError(field, f"WAV has {channels} channels; 1..8 are supported")
    _check_rate(rate, field)
    kinds = {(1, 8): np.uint8, (1, 16): np.int16, (1, 32): np.int32, (3, 32): np.float32, (3, 64): np.float64}
    if (tag, bits) == (1, 24):
        usable = len(payload) - len(payload) % (3 * channels)
        raw = np.frombuffer(payload[:usable], dtype=np.uint8).reshape(-1, 3)
        ints = (raw[:, 0].astype(np.int32) | (raw[:, 1].astype(np.int32) << 8) | (raw[:, 2].astype(np.int32) << 16))
        ints = np.where(ints >= 1 << 23, ints - (1 << 24), ints)
        samples = ints.astype(np.float32) / float(1 << 23)
    elif (tag, bits) in kinds:
        dtype = np.dtype(kinds[(tag, bits)]).newbyteorder("<")
        usable = len(payload) - len(payload) % (dtype.itemsize * channels)
        raw = np.frombuffer(payload[:usable], dtype=dtype)
        if tag == 3:
            samples = raw.astype(np.float32)
        elif bits == 8:
            samples = (raw.astype(np.float32) - 128.0) / 128.0
        else:
            samples = raw.astype(np.float32) / float(1 << (bits - 1))
    else:
        raise InputError(field, f"unsupported WAV encoding (format tag {tag}, {bits} bits)")
    return samples.reshape(-1, channels), rate


def decode_wav(data: bytes, field: str, target_rate: int, limits: MediaLimits) -> np.ndarray:
    """Mono float32 samples at `target_rate` from WAV bytes."""
    frames, rate = _parse_wav(data, field)
    return _finish_audio(frames.mean(axis=1), rate, target_rate, field, limits)


def decode_pcm(data: bytes, sample_rate: int, channels: int, field: str, target_rate: int,
               limits: MediaLimits) -> np.ndarray:
    """Mono float32 samples at `target_rate` from float32 little-endian interleaved PCM."""
    channels = channels or 1
    if channels not in (1, 2):
        raise InputError(f"{field}.channels", f"{channels} channels; 1 or 2 are supported")
    _check_rate(sample_rate, f"{field}.sample_rate")
    if len(data) % (4 * channels):
        raise InputError(f"{field}.samples_f32le", f"{len(data)} bytes is not a whole number of {channels}-channel float32 frames")
    samples = np.frombuffer(data, dtype="<f4").reshape(-1, channels).mean(axis=1)
    return _finish_audio(samples, sample_rate, target_rate, f"{field}.samples_f32le", limits)
