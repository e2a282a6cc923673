"""Every input-facing decoder and the request validation under fuzzers, for a bounded time:
structured and raw requests through the front door's validation, the tensor wire codec, image
and audio decoding (hypothesis); then each target coverage-guided under atheris (libFuzzer) with
its per-input hang limit and memory limit, where atheris installs. Any input ends in a clean
result or a precise error naming its field."""
from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from prism.v1 import common_pb2, prism_pb2
from tests.conftest import png_bytes, random_audio, wav_bytes
from tests.fuzz import targets

ROOT = Path(__file__).resolve().parents[2]
FUZZ = settings(max_examples=int(os.environ.get("PRISM_FUZZ_EXAMPLES", "150")), deadline=None,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])
ATHERIS_SECONDS = int(os.environ.get("PRISM_FUZZ_SECONDS", "15"))


@pytest.fixture(scope="module", autouse=True)
def models(tiny_models):
    targets.load_models({"tiny-llava": tiny_models["llava"], "tiny-qwen2-audio": tiny_models["qwen2-audio"]})


texts = st.text(alphabet=st.characters(codec="utf-8"), max_size=40) | st.sampled_from(["<image>", "<|AUDIO|>", "hi", ""])
media_bytes = st.sampled_from([png_bytes(1, 16, 16), wav_bytes(random_audio(2, 0.2))]) | st.binary(max_size=256)


@st.composite
def media_parts(draw) -> prism_pb2.MediaPart:
    kind = draw(st.sampled_from(["image", "audio_data", "pcm", "empty"]))
    if kind == "image":
        return prism_pb2.MediaPart(image=prism_pb2.Image(data=draw(media_bytes)))
    if kind == "audio_data":
        return prism_pb2.MediaPart(audio=prism_pb2.Audio(wav=draw(media_bytes)))
    if kind == "pcm":
        return prism_pb2.MediaPart(audio=prism_pb2.Audio(pcm=prism_pb2.PcmAudio(
            samples_f32le=draw(st.binary(max_size=512)), sample_rate=draw(st.integers(-5, 400_000)),
            channels=draw(st.integers(-1, 9)))))
    return prism_pb2.MediaPart()


@st.composite
def requests(draw) -> prism_pb2.GenerateRequest:
    req = prism_pb2.GenerateRequest(model=draw(st.sampled_from(["", "tiny-llava", "tiny-qwen2-audio", "nope"])),
                                    request_id=draw(st.sampled_from(["", "r-1", "bad id!", "x" * 200])),
                                    priority=draw(st.integers(-(2**31), 2**31 - 1)))
    if draw(st.booleans()):
        req.prompt = draw(texts)
        req.media.extend(draw(st.lists(media_parts(), max_size=4)))
    else:
        for _ in range(draw(st.integers(0, 3))):
            msg = req.chat.messages.add(role=draw(st.sampled_from(["user", "assistant", "system", "", "robot"])))
            for _ in range(draw(st.integers(0, 3))):
                if draw(st.booleans()):
                    msg.content.add(text=draw(texts))
                else:
                    msg.content.add(media=draw(media_parts()))
    s = req.sampling
    s.max_new_tokens = draw(st.integers(-3, 100))
    s.temperature = draw(st.floats(allow_nan=True, allow_infinity=True, width=32))
    s.top_p = draw(st.floats(-1, 2, width=32))
    s.top_k = draw(st.integers(-5, 100))
    s.stop.extend(draw(st.lists(st.text(max_size=5), max_size=3)))
    req.slo.deadline_ms = draw(st.integers(-1, 10**7))
    return req


@FUZZ
@given(requests())
def test_fuzz_structured_requests(req):
    targets.request_message(req)


@FUZZ
@given(st.binary(max_size=2048))
def test_fuzz_raw_request_bytes(data):
    targets.request(data)


@st.composite
def tensor_messages(draw) -> bytes:
    dims = draw(st.lists(st.integers(-2, 6), max_size=4))
    dtype = draw(st.integers(-1, 12))
    data = draw(st.binary(max_size=256))
    if draw(st.booleans()):
        msg = common_pb2.TensorChunk(dtype=dtype, shape=dims, data=data, offset=draw(st.integers(-3, 10)))
        return b"\x01" + msg.SerializeToString()
    return b"\x00" + common_pb2.Tensor(dtype=dtype, shape=dims, data=data).SerializeToString()


@FUZZ
@given(tensor_messages() | st.binary(max_size=512))
def test_fuzz_tensor_codec(data):
    targets.tensor(data)


@pytest.mark.slow
@pytest.mark.skipif(importlib.util.find_spec("atheris") is None, reason="atheris does not install here")
@pytest.mark.parametrize("target", sorted(targets.TARGETS))
def test_atheris_finds_nothing(target, tiny_models, tmp_path):
    """Coverage-guided, bounded: no crash, no input over 10 s (a hang), no growth past 2 GB."""
    seeds = tmp_path / "seeds"
    seeds.mkdir()
    (seeds / "png").write_bytes(png_bytes(3, 16, 16))
    (seeds / "wav").write_bytes(wav_bytes(random_audio(4, 0.2)))
    (seeds / "req").write_bytes(prism_pb2.GenerateRequest(prompt="hi <image>").SerializeToString())
    models = ["--models", str(tiny_models["llava"])] if target == "request" else []
    out = subprocess.run([sys.executable, "-m", "tests.fuzz.run", target, *models, f"-max_total_time={ATHERIS_SECONDS}",
                          "-timeout=10", "-rss_limit_mb=2048", "-print_final_stats=1", str(seeds)],
                         capture_output=True, text=True, cwd=tmp_path, env={**os.environ, "PYTHONPATH": str(ROOT)},
                         timeout=ATHERIS_SECONDS + 120)
    findings = [line for line in out.stderr.splitlines() if "ERROR" in line or "Uncaught" in line or "Error" in line]
    assert out.returncode == 0, ("\n".join(findings[:20]) + "\n...\n" + out.stderr[-1500:])
    assert "stat::number_of_executed_units" in out.stderr
