"""The whole system as processes, started as a user would (prism.launch, as `prism up` does),
called through the Python SDK: greedy outputs equal the monolithic `model.generate` for every
family, single requests and a concurrent batch whose requests join and leave decode at
different steps."""
from __future__ import annotations

import asyncio

import pytest

from prism.client import AsyncPrismClient, PrismClient
from prism.launch import Deployment, DeploymentOptions
from tests.conftest import FAMILIES, random_audio, random_image, wav_bytes
from tests.oracle import TEXTS, Oracle

pytestmark = [pytest.mark.e2e, pytest.mark.slow]



class Family:
    def __init__(self, model_dir):
        self.oracle = Oracle(model_dir)
        self.modality = self.oracle.modality

    def media(self, seed: int, count: int) -> tuple[list, list]:
        """(decoded media for the oracle, the same media as the client sends it)."""
        if self.modality == "image":
            images = [random_image(seed * 10 + j, 48 + 16 * j, 64) for j in range(count)]
            return images, images  # the SDK encodes PIL images losslessly (PNG)
        raw = [random_audio(seed * 10 + j, 0.6 + 0.4 * j) for j in range(count)]
        wavs = [wav_bytes(a) for a in raw]
        quantized = [(a.clip(-1, 1) * 32767).astype("<i2").astype("float32") / 32768.0 for a in raw]
        return quantized, wavs

    def messages(self, text: str, sent: list) -> list[dict]:
        parts = [{"type": self.modality, self.modality: m} for m in sent]
        return [{"role": "user", "content": parts + [{"type": "text", "text": text}]}]


@pytest.fixture(scope="module", params=FAMILIES)
def deployed(request, tiny_models, tmp_path_factory):
    model_dir = tiny_models[request.param]
    options = DeploymentOptions(model_dir=model_dir, threads=1, slots=4, max_len=512,
                                log_dir=tmp_path_factory.mktemp(f"logs-{request.param}"))
    with Deployment(options) as deployment:
        yield deployment, Family(model_dir)


@pytest.mark.parametrize("count", [0, 1, 2])
def test_greedy_tokens_equal_generate(deployed, count):
    deployment, family = deployed
    decoded, sent = family.media(count, count)
    text = TEXTS[count]
    with PrismClient(deployment.address) as client:
        tokens = []
        for chunk in client.generate(messages=family.messages(text, sent), max_new_tokens=12):
            tokens.extend(chunk.token_ids)
    assert tokens == family.oracle.chat(text, decoded, 12)


def test_unary_equals_streaming(deployed):
    deployment, family = deployed
    decoded, sent = family.media(7, 1)
    with PrismClient(deployment.address) as client:
        done = client.complete(messages=family.messages("describe it", sent), max_new_tokens=9)
    assert list(done.token_ids) == family.oracle.chat("describe it", decoded, 9)
    assert done.usage.generated_tokens == len(done.token_ids)
    assert done.usage.prompt_tokens > 0
    media_tokens = done.usage.image_tokens if family.modality == "image" else done.usage.audio_tokens
    assert media_tokens > 0


def test_eight_concurrent_requests_join_and_leave_the_batch_at_different_steps(deployed):
    deployment, family = deployed
    cases = []
    for i in range(8):
        decoded, sent = family.media(20 + i, i % 3)
        cases.append((TEXTS[i], decoded, sent, 4 + 2 * i))  # different prompt and output lengths

    async def run() -> list[list[int]]:
        async with AsyncPrismClient(deployment.address) as client:
            async def one(i: int, text: str, sent: list, n: int) -> list[int]:
                await asyncio.sleep(0.05 * i)  # staggered arrivals: joins at different steps
                tokens = []
                async for chunk in client.generate(messages=family.messages(text, sent), max_new_tokens=n):
                    tokens.extend(chunk.token_ids)
                return tokens

            return await asyncio.gather(*(one(i, t, s, n) for i, (t, _, s, n) in enumerate(cases)))

    got = asyncio.run(run())
    want = [family.oracle.chat(text, decoded, n) for text, decoded, _, n in cases]
    assert got == want
