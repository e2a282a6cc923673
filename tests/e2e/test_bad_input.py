"""Bad input against the whole system as processes: each gets its exact gRPC status with the
field named, and a good request running at the same time still completes token-exact."""
from __future__ import annotations

import concurrent.futures
import io
import struct

import grpc
import numpy as np
import pytest

from prism.client import PrismClient
from prism.launch import Deployment, DeploymentOptions
from prism.v1 import common_pb2, prism_pb2, prism_pb2_grpc
from tests.conftest import png_bytes, random_image, wav_bytes
from tests.oracle import Oracle

pytestmark = [pytest.mark.e2e, pytest.mark.slow]

MAX_IMAGES = 2
MAX_MESSAGE = 2 << 20
CONTEXT = 256


def deploy(model_dir, log_dir) -> Deployment:
    return Deployment(DeploymentOptions(
        model_dir=model_dir, threads=1, slots=4, max_len=CONTEXT, log_dir=log_dir,
        extra_args={"scheduler": ["--max-images", str(MAX_IMAGES), "--max-message-bytes", str(MAX_MESSAGE),
                                  "--max-new-tokens", "64"]},
    ))


@pytest.fixture(scope="module")
def llava(tiny_models, tmp_path_factory):
    with deploy(tiny_models["llava"], tmp_path_factory.mktemp("logs-llava")) as d:
        yield d, Oracle(tiny_models["llava"])


@pytest.fixture(scope="module")
def audio(tiny_models, tmp_path_factory):
    with deploy(tiny_models["qwen2-audio"], tmp_path_factory.mktemp("logs-audio")) as d:
        yield d, Oracle(tiny_models["qwen2-audio"])


def request(prompt: str = "x", images=(), audios=(), max_new_tokens: int | None = None, model: str = ""):
    """A GenerateRequest built by hand (the SDK would refuse some of these before sending)."""
    media = [prism_pb2.MediaPart(image=prism_pb2.Image(data=b)) for b in images]
    media += [prism_pb2.MediaPart(audio=a) for a in audios]
    sampling = common_pb2.SamplingParams()
    if max_new_tokens is not None:
        sampling.max_new_tokens = max_new_tokens
    return prism_pb2.GenerateRequest(prompt=prompt, media=media, sampling=sampling, model=model)


def pcm(samples: np.ndarray, rate: int = 16000) -> prism_pb2.Audio:
    return prism_pb2.Audio(pcm=prism_pb2.PcmAudio(samples_f32le=samples.astype("<f4").tobytes(), sample_rate=rate))


def refused_while_good_runs(deployment, oracle, bad: prism_pb2.GenerateRequest, code: grpc.StatusCode,
                            field: str) -> None:
    """Send `bad` while a good request decodes; assert the status, the field and the good tokens."""
    prompt = "a good request keeps going"
    with PrismClient(deployment.address) as client, concurrent.futures.ThreadPoolExecutor(1) as pool, \
            grpc.insecure_channel(deployment.address) as channel:
        good = pool.submit(lambda: [t for c in client.generate(prompt=prompt, max_new_tokens=40, ignore_eos=True)
                                    for t in c.token_ids])
        with pytest.raises(grpc.RpcError) as err:
            prism_pb2_grpc.PrismServiceStub(channel).GenerateUnary(prism_pb2.GenerateUnaryRequest(request=bad), timeout=60)
        assert err.value.code() == code, err.value
        assert field in err.value.details(), err.value.details()
        tokens = good.result(timeout=120)
    want = oracle.generate(prompt, [], 40)
    # ignore_eos: the oracle may stop at EOS earlier; the served prefix must match it exactly.
    assert tokens[: len(want)] == want and len(tokens) == 40


def test_corrupt_image(llava):
    refused_while_good_runs(*llava, request(images=[b"\x89PNG\r\n\x1a\nnot really"]),
                            grpc.StatusCode.INVALID_ARGUMENT, "media[0].image.data")


def test_truncated_image(llava):
    refused_while_good_runs(*llava, request(images=[png_bytes(1)[:100]]),
                            grpc.StatusCode.INVALID_ARGUMENT, "media[0].image.data")


def test_unsupported_image_format(llava):
    buf = io.BytesIO()
    random_image(1).save(buf, "TIFF")
    refused_while_good_runs(*llava, request(images=[buf.getvalue()]),
                            grpc.StatusCode.INVALID_ARGUMENT, "media[0].image.data")


def test_audio_to_an_image_model(llava):
    refused_while_good_runs(*llava, request(audios=[prism_pb2.Audio(wav=wav_bytes(np.zeros(1600, np.float32)))]),
                            grpc.StatusCode.INVALID_ARGUMENT, "media[0]")


def test_more_images_than_the_maximum(llava):
    refused_while_good_runs(*llava, request(images=[png_bytes(i) for i in range(MAX_IMAGES + 1)]),
                            grpc.StatusCode.INVALID_ARGUMENT, "media")


def test_empty_prompt(llava):
    refused_while_good_runs(*llava, request(prompt=""), grpc.StatusCode.INVALID_ARGUMENT, "prompt")


def test_prompt_plus_media_longer_than_the_context(llava):
    long_text = " ".join(["word"] * CONTEXT)
    refused_while_good_runs(*llava, request(long_text, images=[png_bytes(3)], max_new_tokens=8),
                            grpc.StatusCode.INVALID_ARGUMENT, "prompt")


@pytest.mark.parametrize("n", [0, -3, 65])
def test_max_new_tokens_out_of_range(llava, n):
    refused_while_good_runs(*llava, request(max_new_tokens=n),
                            grpc.StatusCode.INVALID_ARGUMENT, "sampling.max_new_tokens")


def test_oversized_message(llava):
    refused_while_good_runs(*llava, request(images=[bytes(MAX_MESSAGE + 1024)]),
                            grpc.StatusCode.RESOURCE_EXHAUSTED, "")


def test_unknown_model(llava):
    refused_while_good_runs(*llava, request(model="no-such-model"), grpc.StatusCode.NOT_FOUND, "model")


def test_audio_with_a_bad_sample_rate(audio):
    wav = bytearray(wav_bytes(np.zeros(1600, np.float32)))
    wav[24:28] = struct.pack("<I", 50)  # the fmt chunk's sample rate
    refused_while_good_runs(*audio, request(audios=[prism_pb2.Audio(wav=bytes(wav))]),
                            grpc.StatusCode.INVALID_ARGUMENT, "media[0].audio.wav")


def test_audio_too_long(audio):
    refused_while_good_runs(*audio, request(audios=[pcm(np.zeros(16000 * 31, np.float32))]),
                            grpc.StatusCode.INVALID_ARGUMENT, "media[0].audio.pcm")


def test_pcm_with_a_partial_frame(audio):
    bad = prism_pb2.Audio(pcm=prism_pb2.PcmAudio(samples_f32le=b"\x00" * 6, sample_rate=16000))
    refused_while_good_runs(*audio, request(audios=[bad]), grpc.StatusCode.INVALID_ARGUMENT,
                            "media[0].audio.pcm.samples_f32le")


def test_audio_with_no_samples(audio):
    refused_while_good_runs(*audio, request(audios=[pcm(np.zeros(0, np.float32))]),
                            grpc.StatusCode.INVALID_ARGUMENT, "media[0].audio.pcm")
