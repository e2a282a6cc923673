"""Batching across requests in the encoder and prefill cores, against the oracle (the
monolithic Hugging Face model's greedy `generate` for each request alone) and against the
single-request path (per-item embeddings, per-layer KV, first tokens)."""
from __future__ import annotations

import pytest
import torch

from prism.engine.decode import DecodeEngine, DecodeSpec
from prism.engine.encoder import take_media_batch
from prism.engine.kv import KEY, VALUE
from prism.engine.batching import MAX_PADDING, take_batch
from prism.engine.sampling import Sampling
from prism.models.base import AUDIO, IMAGE
from tests.conftest import FAMILIES
from tests.unit.test_engine_oracle import N, Stack

#: (case index, media items): text-only, one item, two items, text-only again; all lengths differ.
CASES = ((0, 0), (1, 1), (2, 2), (3, 0))


class Batch:
    """One family's stack and a batch of prepared requests of different lengths."""

    def __init__(self, stack: Stack):
        self.stack = stack
        self.cases = [stack.case(i, n) for i, n in CASES]
        self.prepared = []
        for text, media in self.cases:
            images = media if stack.modality == IMAGE else []
            audios = media if stack.modality == AUDIO else []
            self.prepared.append(stack.adapter.prepare(stack.processor, text, images, audios))
        self.plans = [stack.prefill.plan(p.input_ids, p.items) for p in self.prepared]

    def media(self, embeddings: list[list[torch.Tensor]]) -> list[dict[str, list[torch.Tensor]]]:
        return [{self.stack.modality: e} for e in embeddings]


@pytest.fixture(scope="module", params=FAMILIES)
def batch(request, tiny_models):
    return Batch(Stack(tiny_models[request.param]))


def _capture(store: dict[int, tuple[torch.Tensor, torch.Tensor]]):
    def sink(layer, k, v):
        store[layer] = (k.clone(), v.clone())

    return sink


def test_batched_encode_prefill_decode_matches_generate(batch):
    stack = batch.stack
    assert len({p.prompt_tokens for p in batch.plans}) == len(batch.plans)  # padding is exercised
    embeddings = stack.encoder.encode_batch([p.items for p in batch.prepared])
    engine = DecodeEngine(stack.lm, slots=len(batch.plans), max_len=512)
    sinks = []
    for i, plan in enumerate(batch.plans):
        engine.reserve(f"r{i}", plan.prompt_tokens)

        def sink(layer, k, v, rid=f"r{i}"):
            engine.write_kv(rid, layer, KEY, 0, k)
            engine.write_kv(rid, layer, VALUE, 0, v)

        sinks.append(sink)
    firsts = stack.prefill.run_batch(batch.plans, batch.media(embeddings), [Sampling()] * len(batch.plans), sinks)
    got = {}
    for i, (plan, first) in enumerate(zip(batch.plans, firsts)):
        got[f"r{i}"] = [first]
        # A first token that is already a stop id finishes the request at activation.
        engine.activate(DecodeSpec(f"r{i}", first, plan.rope_delta, Sampling(), N, stack.lm.eos_ids))
    while engine.num_active:
        for event in engine.step():
            got[event.request_id].append(event.token)
    want = {f"r{i}": stack.oracle(text, media) for i, (text, media) in enumerate(batch.cases)}
    assert got == want
    assert engine.free_slots == len(batch.plans)


def test_encode_batch_uses_one_tower_call_and_matches_per_request(batch, monkeypatch):
    stack = batch.stack
    calls = []
    encode = stack.encoder.adapter.encode

    def counting(model, items):
        calls.append(len(items))
        return encode(model, items)

    monkeypatch.setattr(stack.encoder.adapter, "encode", counting)
    got = stack.encoder.encode_batch([p.items for p in batch.prepared])
    assert calls == [3]  # the three items of all four requests, one tower call
    calls.clear()
    for prepared, embs in zip(batch.prepared, got):
        single = stack.encoder.encode(prepared.items) if prepared.items else []
        assert len(embs) == len(single)
        for a, b in zip(embs, single):
            assert a.shape == b.shape
            torch.testing.assert_close(a, b, rtol=0, atol=1e-5)
    assert stack.encoder.encode_batch([[], []]) == [[], []]


def test_run_batch_kv_and_first_tokens_match_single_runs(batch):
    stack = batch.stack
    embeddings = [stack.encoder.encode(p.items) if p.items else [] for p in batch.prepared]
    media = batch.media(embeddings)
    single_kv, single_first = [], []
    for plan, m in zip(batch.plans, media):
        store: dict = {}
        single_first.append(stack.prefill.run(plan, m, Sampling(), _capture(store)))
        single_kv.append(store)
    stores: list[dict] = [{} for _ in batch.plans]
    firsts = stack.prefill.run_batch(batch.plans, media, [Sampling()] * len(batch.plans), [_capture(s) for s in stores])
    assert firsts == single_first
    layers = stack.lm.layout.num_layers
    for plan, want, got in zip(batch.plans, single_kv, stores):
        assert sorted(got) == list(range(layers))
        for layer in range(layers):
            for a, b in zip(got[layer], want[layer]):
                assert a.shape == b.shape == (plan.prompt_tokens, stack.lm.layout.num_kv_heads, stack.lm.layout.head_dim)
                torch.testing.assert_close(a, b, rtol=0, atol=1e-5)
    # A batch of one is the single-request pass, bit for bit.
    store: dict = {}
    assert stack.prefill.run_batch(batch.plans[2:3], media[2:3], [Sampling()], [_capture(store)]) == single_first[2:3]
    for layer in range(layers):
        assert all(torch.equal(a, b) for a, b in zip(store[layer], single_kv[2][layer]))
    assert stack.prefill.run_batch([], [], [], []) == []


def test_take_batch_padded_budget():
    pending = [("a", 10), ("b", 30), ("c", 20), ("d", 5), ("e", 40)]
    # a: 10x1; a,b: 30x2=60; a,b,c: 30x3=90; a,b,c,d: 30x4=120 > 100 -> stop (never skip ahead)
    assert take_batch(pending, 100, 8) == ["a", "b", "c"]
    assert take_batch(pending, 120, 8) == ["a", "b", "c", "d"]
    assert take_batch(pending, 59, 8) == ["a"]
    assert take_batch(pending, 60, 8) == ["a", "b"]
    assert take_batch(pending, 10_000, 2) == ["a", "b"]
    # The first is always taken, even over budget; later ones are then measured with it.
    assert take_batch([("big", 500), ("x", 1)], 100, 4) == ["big"]
    assert take_batch([(7, 3), (8, 3), (9, 3)], 9, 4) == [7, 8, 9]
    assert take_batch([], 100, 4) == []
    with pytest.raises(ValueError):
        take_batch(pending, 100, 0)


def test_take_batch_bounds_padding_to_a_fraction_of_the_real_tokens():
    # a text-only prompt (64) and one with an image (330): padded 660 for 394 real tokens (68%)
    assert take_batch([("text", 64), ("image", 330)], 2048, 8, max_padding=0.25) == ["text"]
    assert take_batch([("text", 64), ("image", 330)], 2048, 8) == ["text", "image"]  # no bound
    # prompts of similar length share a pass: 330 x 3 = 990 for 960 real (3%)
    similar = [("a", 330), ("b", 310), ("c", 320), ("short", 64)]
    assert take_batch(similar, 2048, 8, max_padding=0.25) == ["a", "b", "c"]
    # exactly at the bound joins: 100 x 2 = 200 for 160 real is 25%
    assert take_batch([("x", 100), ("y", 60)], 2048, 8, max_padding=0.25) == ["x", "y"]
    assert take_batch([("x", 100), ("y", 59)], 2048, 8, max_padding=0.25) == ["x"]
    # the encoder's concatenated media has no padding: the bound does not apply
    assert take_batch([("text", 64), ("image", 330)], 2048, 8, padded=False, max_padding=0.0) == ["text", "image"]
    # the default bound; never skips ahead past the one that stops it
    assert take_batch(similar + [("d", 330)], 2048, 8, max_padding=MAX_PADDING) == ["a", "b", "c"]
    with pytest.raises(ValueError, match="max_padding"):
        take_batch(similar, 2048, 8, max_padding=-0.1)


def test_take_media_batch_sums_media_tokens():
    pending = [("a", 64), ("t", 0), ("b", 128), ("c", 64), ("d", 16)]
    # summed: 64, 64, 192, 256 > 200 -> stop
    assert take_media_batch(pending, 200, 8) == ["a", "t", "b"]
    assert take_media_batch(pending, 256, 8) == ["a", "t", "b", "c"]
    assert take_media_batch(pending, 10_000, 3) == ["a", "t", "b"]
    assert take_media_batch([("huge", 4096), ("a", 1)], 256, 8) == ["huge"]
    assert take_batch(pending, 200, 8, padded=False) == take_media_batch(pending, 200, 8)


def test_prefill_configs_take_the_padding_bound_and_refuse_a_negative_one(tmp_path):
    from prism.models.loading import ModelOptions
    from prism.runtime.config import ConfigError
    from services.prefill.config import PrefillConfig
    from services.worker.config import WorkerConfig

    (tmp_path / "config.json").write_text("{}")
    model = ModelOptions(model_dir=tmp_path)
    assert PrefillConfig(model=model).max_padding == MAX_PADDING
    assert WorkerConfig(model=model, prefill_max_padding=0.5).stage_configs()["prefill"].max_padding == 0.5
    with pytest.raises(ConfigError, match="max_padding"):
        PrefillConfig(model=model, max_padding=-0.5)
    with pytest.raises(ConfigError, match="max_padding"):
        WorkerConfig(model=model, prefill_max_padding=-1.0)
