"""prism.media: every decoder path and every refusal, plus fuzzing of the untrusted-bytes entry
points (every input ends in a clean decode or an InputError, never another exception)."""
from __future__ import annotations

import io
import struct
import zlib

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image

from prism.media import IMAGE_FORMATS, MAX_SAMPLE_RATE, MIN_SAMPLE_RATE, MediaLimits, decode_image, decode_pcm, decode_wav
from prism.models.base import InputError
from tests.conftest import png_bytes, random_image, wav_bytes

LIMITS = MediaLimits()
IMG = "media[0].image.data"
WAV = "media[0].audio.wav"
PCM = "media[0].audio.pcm"
FUZZ = settings(max_examples=200, deadline=None, database=None,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])


# ---- helpers ------------------------------------------------------------------------------------


def encode_image(img: Image.Image, fmt: str, **kwargs) -> bytes:
    buf = io.BytesIO()
    img.save(buf, fmt, **kwargs)
    return buf.getvalue()


def png_chunk(kind: bytes, body: bytes) -> bytes:
    return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))


def png_header_only(width: int, height: int) -> bytes:
    """A PNG with a valid IHDR claiming width x height and no pixel data at all."""
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + png_chunk(b"IHDR", ihdr) + png_chunk(b"IEND", b"")


def riff(*chunks: tuple[bytes, bytes], declared: dict[bytes, int] | None = None) -> bytes:
    """RIFF/WAVE file from (id, body) chunks; `declared` overrides a chunk's size field."""
    declared = declared or {}
    out = b""
    for cid, body in chunks:
        out += cid + struct.pack("<I", declared.get(cid, len(body))) + body + (b"\x00" if len(body) & 1 else b"")
    return b"RIFF" + struct.pack("<I", 4 + len(out)) + b"WAVE" + out


def fmt_body(tag: int, channels: int, rate: int, bits: int) -> bytes:
    block = channels * bits // 8
    return struct.pack("<HHIIHH", tag, channels, rate, (rate * block) & 0xFFFFFFFF, block & 0xFFFF, bits)


def extensible_fmt(sub_tag: int, channels: int, rate: int, bits: int) -> bytes:
    guid_tail = b"\x00\x00\x00\x00\x10\x00\x80\x00\x00\xaa\x00\x38\x9b\x71"
    return (fmt_body(0xFFFE, channels, rate, bits) + struct.pack("<HHI", 22, bits, 0)
            + struct.pack("<H", sub_tag) + guid_tail)


def quantize(frames: np.ndarray, kind: str) -> bytes:
    """Interleaved sample bytes of `frames` [n, channels] (floats in [-1, 1)) as `kind`."""
    x = np.asarray(frames, dtype=np.float64)
    if kind == "pcm8":
        return (np.clip(np.round(x * 128), -128, 127) + 128).astype(np.uint8).tobytes()
    if kind == "pcm16":
        return np.clip(np.round(x * 2**15), -(2**15), 2**15 - 1).astype("<i2").tobytes()
    if kind == "pcm24":
        ints = np.clip(np.round(x * 2**23), -(2**23), 2**23 - 1).astype("<i4").reshape(-1)
        return np.stack([ints & 0xFF, (ints >> 8) & 0xFF, (ints >> 16) & 0xFF], axis=1).astype(np.uint8).tobytes()
    if kind == "pcm32":
        return np.clip(np.round(x * 2**31), -(2**31), 2**31 - 1).astype("<i4").tobytes()
    if kind == "f32":
        return x.astype("<f4").tobytes()
    if kind == "f64":
        return x.astype("<f8").tobytes()
    raise AssertionError(kind)


KINDS = {  # kind -> (format tag, bits, max quantization error)
    "pcm8": (1, 8, 1 / 2**7),
    "pcm16": (1, 16, 1 / 2**15),
    "pcm24": (1, 24, 1 / 2**22),
    "pcm32": (1, 32, 1e-6),
    "f32": (3, 32, 1e-7),
    "f64": (3, 64, 1e-7),
}


def make_wav(frames: np.ndarray, rate: int, kind: str = "pcm16") -> bytes:
    frames = np.asarray(frames).reshape(len(frames), -1)
    tag, bits, _ = KINDS[kind]
    return riff((b"fmt ", fmt_body(tag, frames.shape[1], rate, bits)), (b"data", quantize(frames, kind)))


def sine(freq: float, seconds: float, rate: int, amp: float = 0.5) -> np.ndarray:
    return (amp * np.sin(2 * np.pi * freq * np.arange(int(round(rate * seconds))) / rate)).astype(np.float32)


def peak_hz(x: np.ndarray, rate: int) -> float:
    spectrum = np.abs(np.fft.rfft(x * np.hanning(len(x))))
    return float(np.argmax(spectrum)) * rate / len(x)


def refused(call, field: str, *words: str) -> InputError:
    """Run `call`, expect InputError on exactly `field` whose reason holds every one of `words`."""
    with pytest.raises(InputError) as info:
        call()
    exc = info.value
    assert exc.field == field, (exc.field, exc.reason)
    for w in words:
        assert w.lower() in exc.reason.lower(), (w, exc.reason)
    assert str(exc).startswith(f"{field}: ")
    return exc


# ---- images -------------------------------------------------------------------------------------


@pytest.mark.parametrize(("fmt", "kwargs", "exact"), [
    ("PNG", {}, True),
    ("BMP", {}, True),
    ("WEBP", {"lossless": True}, True),
    ("JPEG", {"quality": 95, "subsampling": 0}, False),
    ("GIF", {}, True),
])
def test_allowed_formats_decode_to_rgb(fmt, kwargs, exact):
    assert fmt in IMAGE_FORMATS
    if fmt == "GIF":  # few colours, so the palette is exact
        src = Image.fromarray(np.repeat(np.repeat(np.array([[[255, 0, 0], [0, 255, 0]], [[0, 0, 255], [250, 250, 250]]],
                                                           dtype=np.uint8), 20, 0), 30, 1))
    elif fmt == "JPEG":  # smooth, so lossy compression stays close
        yy, xx = np.mgrid[0:40, 0:48]
        src = Image.fromarray(np.stack([xx * 5, yy * 6, (xx + yy) * 2], axis=-1).astype(np.uint8))
    else:
        src = random_image(3, width=48, height=40)
    img = decode_image(encode_image(src, fmt, **kwargs), IMG, LIMITS)
    assert img.mode == "RGB"
    assert img.size == src.size
    diff = np.abs(np.asarray(img, dtype=np.int16) - np.asarray(src, dtype=np.int16))
    if exact:
        assert diff.max() == 0
    else:
        assert diff.mean() < 3


@pytest.mark.parametrize("mode", ["RGBA", "L", "P", "LA", "CMYK"])
def test_other_modes_are_converted_to_rgb(mode):
    src = random_image(1, 16, 16).convert(mode)
    fmt = "JPEG" if mode == "CMYK" else "PNG"
    img = decode_image(encode_image(src, fmt), IMG, LIMITS)
    assert img.mode == "RGB" and img.size == (16, 16)


def test_animated_gif_gives_first_frame():
    frames = [Image.new("RGB", (8, 8), c) for c in ((255, 0, 0), (0, 0, 255))]
    data = encode_image(frames[0], "GIF", save_all=True, append_images=frames[1:])
    img = decode_image(data, IMG, LIMITS)
    assert img.getpixel((0, 0)) == (255, 0, 0)


def test_multi_picture_jpeg_from_cameras_is_a_jpeg():
    # PIL reports a JPEG with an MPF segment (phone cameras) as "MPO"; it is a JPEG file
    primary = Image.new("RGB", (16, 12), (200, 40, 10))
    data = encode_image(primary, "MPO", save_all=True, append_images=[Image.new("RGB", (16, 12))])
    assert data[:3] == b"\xff\xd8\xff" and Image.open(io.BytesIO(data)).format == "MPO"
    img = decode_image(data, IMG, LIMITS)
    assert img.mode == "RGB" and img.size == (16, 12)
    assert np.abs(np.asarray(img, dtype=np.int16) - (200, 40, 10)).max() < 8


def test_conftest_png_helper_decodes():
    img = decode_image(png_bytes(0, 32, 24), IMG, LIMITS)
    assert img.size == (32, 24) and img.mode == "RGB"


@pytest.mark.parametrize("fmt", ["TIFF", "ICO", "PPM", "TGA"])
def test_formats_outside_the_allow_list_are_refused(fmt):
    data = encode_image(random_image(2, 16, 16), fmt)
    exc = refused(lambda: decode_image(data, IMG, LIMITS), IMG, "unsupported image format", fmt)
    assert IMG in str(exc) and fmt in str(exc)
    for allowed in IMAGE_FORMATS:  # tells the caller what would work
        assert allowed in exc.reason


def test_empty_image_data():
    refused(lambda: decode_image(b"", IMG, LIMITS), IMG, "empty")


@pytest.mark.parametrize("data", [b"\x00", b"not an image at all", bytes(range(256)) * 4, b"GIF89a"])
def test_unidentifiable_bytes(data):
    refused(lambda: decode_image(data, IMG, LIMITS), IMG, "not a decodable image")


@pytest.mark.parametrize("fmt", ["PNG", "JPEG", "WEBP", "BMP", "GIF"])
def test_truncated_images(fmt):
    data = encode_image(random_image(4, 64, 64), fmt)
    cut = data[: len(data) // 2]
    with pytest.raises(InputError) as info:
        decode_image(cut, IMG, LIMITS)
    assert info.value.field == IMG
    assert "corrupt or truncated" in info.value.reason or "not a decodable image" in info.value.reason


def test_corrupt_png_pixel_data():
    data = bytearray(png_bytes(5, 32, 32))
    idat = data.index(b"IDAT")
    data[idat + 10 : idat + 40] = b"\xff" * 30  # compressed stream garbage (CRC now wrong too)
    refused(lambda: decode_image(bytes(data), IMG, LIMITS), IMG, "corrupt or truncated")


def test_pixel_limit_is_inclusive():
    data = png_bytes(6, 64, 32)  # 2048 pixels
    assert decode_image(data, IMG, MediaLimits(max_image_pixels=2048)).size == (64, 32)
    exc = refused(lambda: decode_image(data, IMG, MediaLimits(max_image_pixels=2047)), IMG, "64x32", "2047")
    assert "exceeds" in exc.reason


def test_pixel_limit_checked_from_header_before_decoding():
    # 5000x5000 claimed, no pixel data at all: refused for its size, not as truncated
    refused(lambda: decode_image(png_header_only(5000, 5000), IMG, LIMITS), IMG, "5000x5000", str(4096 * 4096))


def test_decompression_bomb_header_is_refused_for_size():
    refused(lambda: decode_image(png_header_only(100_000, 100_000), IMG, LIMITS), IMG, "pixel limit")


def test_zero_sized_image_header():
    with pytest.raises(InputError) as info:
        decode_image(png_header_only(0, 5), IMG, LIMITS)
    assert info.value.field == IMG


# ---- WAV ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", list(KINDS))
def test_wav_round_trip(kind):
    x = sine(440, 0.25, 16000, amp=0.6)
    x[:4] = [0.0, -1.0, 0.99, -0.5]  # extremes and exact values
    out = decode_wav(make_wav(x, 16000, kind), WAV, 16000, LIMITS)
    assert out.dtype == np.float32 and out.ndim == 1 and out.shape == x.shape
    assert np.abs(out - x).max() <= KINDS[kind][2] + 1e-7


def test_wav_from_stdlib_wave_module():
    x = sine(300, 0.2, 16000)
    out = decode_wav(wav_bytes(x, 16000), WAV, 16000, LIMITS)
    assert out.shape == x.shape
    assert np.abs(out - x).max() <= 1 / 2**14


@pytest.mark.parametrize("sampwidth", [1, 2, 3, 4])
def test_stdlib_wave_pcm_widths(sampwidth):
    import wave

    x = sine(500, 0.1, 16000)
    kind = {1: "pcm8", 2: "pcm16", 3: "pcm24", 4: "pcm32"}[sampwidth]
    buf = io.BytesIO()
    with wave.open(buf, "wb") as w:
        w.setnchannels(1)
        w.setsampwidth(sampwidth)
        w.setframerate(16000)
        w.writeframes(quantize(x[:, None], kind))
    out = decode_wav(buf.getvalue(), WAV, 16000, LIMITS)
    assert np.abs(out - x).max() <= KINDS[kind][2] + 1e-7


@pytest.mark.parametrize(("sub_tag", "bits", "kind"), [(3, 32, "f32"), (1, 16, "pcm16"), (1, 24, "pcm24")])
def test_wave_format_extensible(sub_tag, bits, kind):
    x = sine(440, 0.1, 16000)
    data = riff((b"fmt ", extensible_fmt(sub_tag, 1, 16000, bits)), (b"data", quantize(x[:, None], kind)))
    out = decode_wav(data, WAV, 16000, LIMITS)
    assert np.abs(out - x).max() <= KINDS[kind][2] + 1e-7


def test_wave_format_extensible_without_sub_format():
    data = riff((b"fmt ", fmt_body(0xFFFE, 1, 16000, 16)), (b"data", b"\x00\x00" * 100))
    refused(lambda: decode_wav(data, WAV, 16000, LIMITS), WAV, "extensible")


@pytest.mark.parametrize("kind", ["pcm8", "pcm16", "pcm24", "f32"])
def test_wav_stereo_is_mixed_to_mono(kind):
    left, right = sine(440, 0.1, 16000, amp=0.5), sine(1000, 0.1, 16000, amp=0.25)
    out = decode_wav(make_wav(np.stack([left, right], axis=1), 16000, kind), WAV, 16000, LIMITS)
    assert out.shape == left.shape
    assert np.abs(out - (left + right) / 2).max() <= KINDS[kind][2] + 1e-7


def test_wav_many_channels_are_averaged():
    frames = np.tile(np.array([0.5, -0.5, 0.25, 0.25, 0.0, 0.0, 0.5, -0.25], dtype=np.float32), (100, 1))
    out = decode_wav(make_wav(frames, 16000, "f32"), WAV, 16000, LIMITS)
    np.testing.assert_allclose(out, np.full(100, frames[0].mean()), atol=1e-7)


@pytest.mark.parametrize(("rate", "freq"), [(8000, 440.0), (44100, 440.0), (22050, 1000.0), (48000, 3000.0)])
def test_wav_resampled_to_target_rate(rate, freq):
    x = sine(freq, 1.0, rate)
    out = decode_wav(make_wav(x, rate, "f32"), WAV, 16000, LIMITS)
    assert abs(len(out) - 16000) <= 1
    assert out.dtype == np.float32
    assert abs(peak_hz(out, 16000) - freq) <= 2.0
    # amplitude kept (away from the filter's edges)
    assert 0.45 < np.abs(out[2000:-2000]).max() < 0.55


def test_resampling_length_follows_the_rate_ratio():
    out = decode_wav(make_wav(sine(440, 0.5, 44100), 44100, "pcm16"), WAV, 16000, LIMITS)
    assert len(out) == int(np.ceil(22050 * 160 / 441))
    out = decode_wav(make_wav(sine(440, 0.5, 8000), 8000, "pcm16"), WAV, 16000, LIMITS)
    assert len(out) == 8000


@pytest.fixture
def resample_calls(monkeypatch):
    """(up, down) of every polyphase resampling call."""
    import scipy.signal

    calls, real = [], scipy.signal.resample_poly

    def spy(x, up, down, *args, **kwargs):
        calls.append((int(up), int(down)))
        return real(x, up, down, *args, **kwargs)

    monkeypatch.setattr(scipy.signal, "resample_poly", spy)
    return calls


@pytest.mark.parametrize(("rate", "factors"), [(44100, (160, 441)), (8000, (2, 1)), (48000, (1, 3)),
                                               (22050, (320, 441)), (11025, (640, 441)), (384000, (1, 24))])
def test_common_rates_resample_exactly(resample_calls, rate, factors):
    decode_pcm(np.zeros(rate // 100, "<f4").tobytes(), rate, 1, PCM, 16000, LIMITS)
    assert resample_calls == [factors]


def test_no_resampling_at_the_target_rate(resample_calls):
    decode_pcm(np.zeros(160, "<f4").tobytes(), 16000, 1, PCM, 16000, LIMITS)
    assert resample_calls == []


@pytest.mark.parametrize("rate", [MAX_SAMPLE_RATE - 1, 44099, 1001, 15999])
def test_resampling_from_a_coprime_rate_is_cheap_and_keeps_the_pitch(resample_calls, rate):
    # exact polyphase factors would be e.g. 16000/383999: a filter of ~7.7M taps, seconds of CPU
    # and ~60 MB for any clip, however short
    x = sine(400.0, 0.5, rate)
    out = decode_wav(make_wav(x, rate, "f32"), WAV, 16000, LIMITS)
    ((up, down),) = resample_calls
    assert max(up, down) <= 2000
    assert abs(up / down - 16000 / rate) / (16000 / rate) < 1e-3
    assert abs(len(out) - 8000) <= 8
    assert abs(peak_hz(out, 16000) - 400.0) <= 4.0


def test_wav_skips_other_chunks_and_pads_odd_ones():
    x = sine(440, 0.05, 16000)
    data = riff((b"LIST", b"INFOabc"), (b"fmt ", fmt_body(1, 1, 16000, 16)), (b"fact", b"\x01\x02\x03"),
                (b"data", quantize(x[:, None], "pcm16")))
    out = decode_wav(data, WAV, 16000, LIMITS)
    assert np.abs(out - x).max() <= 1 / 2**15


def test_wav_data_chunk_with_a_streaming_size_and_a_partial_frame():
    x = sine(440, 0.05, 16000)
    payload = quantize(np.stack([x, x], axis=1), "pcm16") + b"\x01"  # half a frame too many
    data = riff((b"fmt ", fmt_body(1, 2, 16000, 16)), (b"data", payload), declared={b"data": 0xFFFFFFFF})
    out = decode_wav(data, WAV, 16000, LIMITS)
    assert out.shape == x.shape


@pytest.mark.parametrize("data", [b"", b"RIFF", b"RIFX\x00\x00\x00\x00WAVE", b"RIFF\x00\x00\x00\x00AVI ",
                                  png_bytes(0, 4, 4), b"\x00" * 64])
def test_wav_not_riff(data):
    refused(lambda: decode_wav(data, WAV, 16000, LIMITS), WAV, "not a RIFF/WAVE file")


@pytest.mark.parametrize("chunks", [
    [(b"data", b"\x00\x00" * 10)],
    [(b"fmt ", fmt_body(1, 1, 16000, 16))],
    [(b"LIST", b"junk")],
    [],
])
def test_wav_missing_chunks(chunks):
    refused(lambda: decode_wav(riff(*chunks), WAV, 16000, LIMITS), WAV, "lacks a fmt or data chunk")


def test_wav_data_before_fmt_is_missing_fmt():
    data = riff((b"data", b"\x00\x00" * 10), (b"fmt ", fmt_body(1, 1, 16000, 16)))
    refused(lambda: decode_wav(data, WAV, 16000, LIMITS), WAV, "fmt")


def test_wav_truncated_chunk():
    data = riff((b"fmt ", fmt_body(1, 1, 16000, 16)))[:-6]
    refused(lambda: decode_wav(data, WAV, 16000, LIMITS), WAV, "truncated", "fmt")


def test_wav_fmt_chunk_too_short():
    data = riff((b"fmt ", fmt_body(1, 1, 16000, 16)[:14]), (b"data", b"\x00\x00" * 10))
    refused(lambda: decode_wav(data, WAV, 16000, LIMITS), WAV, "fmt chunk too short")


@pytest.mark.parametrize("channels", [0, 9, 65535])
def test_wav_bad_channel_count(channels):
    data = riff((b"fmt ", fmt_body(1, channels, 16000, 16)), (b"data", b"\x00\x00" * 90))
    refused(lambda: decode_wav(data, WAV, 16000, LIMITS), WAV, f"{channels} channels", "1..8")


@pytest.mark.parametrize("rate", [0, MIN_SAMPLE_RATE - 1, MAX_SAMPLE_RATE + 1, 2**32 - 1])
def test_wav_sample_rate_out_of_range(rate):
    data = riff((b"fmt ", struct.pack("<HHIIHH", 1, 1, rate, 0, 2, 16)), (b"data", b"\x00\x00" * 10))
    refused(lambda: decode_wav(data, WAV, 16000, LIMITS), WAV, f"sample rate {rate} Hz", "outside")


@pytest.mark.parametrize("rate", [MIN_SAMPLE_RATE, MAX_SAMPLE_RATE])
def test_wav_sample_rate_bounds_are_accepted(rate):
    out = decode_wav(make_wav(np.zeros(rate // 10, np.float32), rate, "pcm16"), WAV, 16000, LIMITS)
    assert abs(len(out) - 1600) <= 1


@pytest.mark.parametrize(("tag", "bits"), [(1, 12), (1, 0), (3, 16), (2, 4), (6, 8), (0xFFFF, 16)])
def test_wav_unsupported_encoding(tag, bits):
    data = riff((b"fmt ", struct.pack("<HHIIHH", tag, 1, 16000, 32000, 2, bits)), (b"data", b"\x00\x00" * 10))
    refused(lambda: decode_wav(data, WAV, 16000, LIMITS), WAV, "unsupported WAV encoding", f"tag {tag}", f"{bits} bits")


@pytest.mark.parametrize("payload", [b"", b"\x01", b"\x01\x02\x03"])
def test_wav_empty_audio(payload):
    data = riff((b"fmt ", fmt_body(1, 2, 16000, 16)), (b"data", payload))  # less than one stereo frame
    refused(lambda: decode_wav(data, WAV, 16000, LIMITS), WAV, "no samples")


def test_wav_too_long():
    limits = MediaLimits(max_audio_seconds=0.5)
    ok = make_wav(np.zeros(8000, np.float32), 16000)
    assert len(decode_wav(ok, WAV, 16000, limits)) == 8000
    long = make_wav(np.zeros(8001, np.float32), 16000)
    refused(lambda: decode_wav(long, WAV, 16000, limits), WAV, "0.50 s", "exceeds", "0.5 s")
    # the duration is the source's, before resampling
    refused(lambda: decode_wav(make_wav(np.zeros(4001, np.float32), 8000), WAV, 16000, limits), WAV, "exceeds")


@pytest.mark.parametrize("kind", ["f32", "f64"])
@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_wav_non_finite_samples(kind, bad):
    x = np.zeros(100, np.float64)
    x[37] = bad
    tag, bits, _ = KINDS[kind]
    data = riff((b"fmt ", fmt_body(tag, 1, 16000, bits)), (b"data", quantize(x[:, None], kind)))
    refused(lambda: decode_wav(data, WAV, 16000, LIMITS), WAV, "finite")


def test_wav_error_names_the_callers_field():
    refused(lambda: decode_wav(b"junk", "chat.messages[2].content[1].media.audio.wav", 16000, LIMITS),
            "chat.messages[2].content[1].media.audio.wav", "RIFF")


# ---- raw float32 PCM ----------------------------------------------------------------------------


def test_pcm_mono_round_trip_is_exact():
    x = sine(440, 0.2, 16000)
    out = decode_pcm(x.astype("<f4").tobytes(), 16000, 1, PCM, 16000, LIMITS)
    assert out.dtype == np.float32
    np.testing.assert_array_equal(out, x)


def test_pcm_channels_zero_means_mono():
    x = sine(440, 0.1, 16000)
    np.testing.assert_array_equal(decode_pcm(x.tobytes(), 16000, 0, PCM, 16000, LIMITS), x)


def test_pcm_stereo_is_mixed_to_mono():
    left, right = sine(440, 0.1, 16000), sine(880, 0.1, 16000, amp=0.2)
    data = np.stack([left, right], axis=1).astype("<f4").tobytes()
    out = decode_pcm(data, 16000, 2, PCM, 16000, LIMITS)
    np.testing.assert_allclose(out, (left + right) / 2, atol=1e-7)


@pytest.mark.parametrize(("rate", "freq"), [(8000, 440.0), (44100, 440.0)])
def test_pcm_resampled(rate, freq):
    out = decode_pcm(sine(freq, 1.0, rate).tobytes(), rate, 1, PCM, 16000, LIMITS)
    assert abs(len(out) - 16000) <= 1
    assert abs(peak_hz(out, 16000) - freq) <= 2.0


@pytest.mark.parametrize("channels", [3, -1, 8])
def test_pcm_bad_channels(channels):
    refused(lambda: decode_pcm(b"\x00" * 48, 16000, channels, PCM, 16000, LIMITS), f"{PCM}.channels",
            f"{channels} channels", "1 or 2")


@pytest.mark.parametrize("rate", [0, -16000, MIN_SAMPLE_RATE - 1, MAX_SAMPLE_RATE + 1])
def test_pcm_sample_rate_out_of_range(rate):
    refused(lambda: decode_pcm(b"\x00" * 8, rate, 1, PCM, 16000, LIMITS), f"{PCM}.sample_rate",
            f"sample rate {rate} Hz", "outside")


@pytest.mark.parametrize(("nbytes", "channels"), [(6, 1), (3, 1), (12, 2), (4, 2)])
def test_pcm_length_not_whole_frames(nbytes, channels):
    refused(lambda: decode_pcm(b"\x00" * nbytes, 16000, channels, PCM, 16000, LIMITS), f"{PCM}.samples_f32le",
            f"{nbytes} bytes", f"{channels}-channel")


def test_pcm_empty():
    refused(lambda: decode_pcm(b"", 16000, 1, PCM, 16000, LIMITS), f"{PCM}.samples_f32le", "no samples")


def test_pcm_too_long():
    limits = MediaLimits(max_audio_seconds=1.0)
    data = np.zeros(16001, "<f4").tobytes()
    refused(lambda: decode_pcm(data, 16000, 1, PCM, 16000, limits), f"{PCM}.samples_f32le", "exceeds", "1 s")
    # stereo: the duration counts frames, not samples
    assert len(decode_pcm(data[:-4] + data[:-4], 16000, 2, PCM, 16000, limits)) == 16000


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_pcm_non_finite(bad):
    x = np.zeros(64, "<f4")
    x[5] = bad
    refused(lambda: decode_pcm(x.tobytes(), 16000, 1, PCM, 16000, LIMITS), f"{PCM}.samples_f32le", "finite")


# ---- fuzzing: clean decode or InputError, nothing else ----------------------------------------------

_IMAGE_SEEDS = {
    fmt: encode_image(random_image(7, 12, 10), fmt, **({"lossless": True} if fmt == "WEBP" else {}))
    for fmt in ("PNG", "JPEG", "WEBP", "BMP", "GIF")
}
_WAV_SEEDS = {
    "pcm16": make_wav(sine(440, 0.02, 16000), 16000, "pcm16"),
    "pcm8-stereo": make_wav(np.stack([sine(440, 0.02, 8000)] * 2, axis=1), 8000, "pcm8"),
    "pcm24": make_wav(sine(440, 0.02, 44100), 44100, "pcm24"),
    "f32": make_wav(sine(440, 0.02, 16000), 16000, "f32"),
    "extensible": riff((b"fmt ", extensible_fmt(3, 1, 16000, 32)), (b"data", quantize(sine(440, 0.02, 16000)[:, None], "f32"))),
}


def _mutate(data: bytes, edits: list[tuple[int, int]], cut: int | None, header_bias: int) -> bytes:
    out = bytearray(data)
    for pos, value in edits:
        out[pos % (header_bias if pos % 2 else len(out))] = value
    return bytes(out if cut is None else out[: cut % (len(out) + 1)])


def _image_ok_or_input_error(data: bytes) -> None:
    try:
        img = decode_image(data, IMG, MediaLimits(max_image_pixels=1 << 20))
    except InputError as exc:
        assert exc.field == IMG and exc.reason
    else:
        assert img.mode == "RGB" and img.width >= 1 and img.height >= 1


def _audio_ok_or_input_error(call, field_prefix: str) -> None:
    try:
        out = call()
    except InputError as exc:
        assert exc.field.startswith(field_prefix) and exc.reason
    else:
        assert out.dtype == np.float32 and out.ndim == 1 and out.size >= 1
        assert np.all(np.isfinite(out))


edits = st.lists(st.tuples(st.integers(0, 1 << 16), st.integers(0, 255)), min_size=1, max_size=8)


@FUZZ
@given(st.binary(max_size=2048))
def test_fuzz_decode_image_arbitrary_bytes(data):
    _image_ok_or_input_error(data)


@FUZZ
@given(st.sampled_from(sorted(_IMAGE_SEEDS)), edits, st.none() | st.integers(0, 1 << 16))
def test_fuzz_decode_image_mutated_files(fmt, changes, cut):
    _image_ok_or_input_error(_mutate(_IMAGE_SEEDS[fmt], changes, cut, header_bias=64))


@FUZZ
@given(st.binary(max_size=2048))
def test_fuzz_decode_wav_arbitrary_bytes(data):
    _audio_ok_or_input_error(lambda: decode_wav(data, WAV, 16000, LIMITS), WAV)


@FUZZ
@given(st.binary(max_size=512))
def test_fuzz_decode_wav_riff_prefixed_bytes(body):
    data = b"RIFF" + struct.pack("<I", 4 + len(body)) + b"WAVE" + body
    _audio_ok_or_input_error(lambda: decode_wav(data, WAV, 16000, LIMITS), WAV)


@FUZZ
@given(st.sampled_from(sorted(_WAV_SEEDS)), edits, st.none() | st.integers(0, 1 << 16))
def test_fuzz_decode_wav_mutated_files(kind, changes, cut):
    data = _mutate(_WAV_SEEDS[kind], changes, cut, header_bias=72)
    _audio_ok_or_input_error(lambda: decode_wav(data, WAV, 16000, LIMITS), WAV)


@FUZZ
@given(st.binary(max_size=4096), st.integers(-(2**31), 2**31 - 1) | st.sampled_from([8000, 16000, 44100, 383999]),
       st.integers(-(2**31), 2**31 - 1) | st.integers(0, 3))
def test_fuzz_decode_pcm(data, rate, channels):
    _audio_ok_or_input_error(lambda: decode_pcm(data, rate, channels, PCM, 16000, LIMITS), PCM)


def test_pcm_samples_far_beyond_full_scale_are_refused():
    # found by atheris: finite float32 samples near 3.4e38 overflowed to inf when resampled
    data = (np.full(64, 3.3e38, "<f4")).tobytes()
    refused(lambda: decode_pcm(data, 32639, 1, PCM, 16000, LIMITS), f"{PCM}.samples_f32le", "within ±65536")
    ok = decode_pcm((np.full(64, 32767.0, "<f4")).tobytes(), 32000, 1, PCM, 16000, LIMITS)  # int16-scale floats pass
    assert np.all(np.isfinite(ok))
