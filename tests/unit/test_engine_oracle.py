"""The pure cores (encoder, prefill, decode with continuous batching) against the oracle: the
monolithic Hugging Face model's greedy `generate`, token for token, for every family."""
from __future__ import annotations

import pytest

from prism.engine.decode import DecodeEngine, DecodeSpec, Finish, NoFreeSlot, PromptTooLong
from prism.engine.encoder import EncoderEngine
from prism.engine.kv import KEY, VALUE
from prism.engine.lm import LanguageModel
from prism.engine.prefill import PrefillEngine
from prism.engine.sampling import Sampling
from prism.models.base import AUDIO, IMAGE
from prism.models.loading import ENCODER, LANGUAGE, load_model
from tests.conftest import FAMILIES, random_audio, random_image
from tests.oracle import TEXTS, Oracle

N = 8


class Stack:
    """One family's checkpoint loaded three ways: monolith, encoder part, language part."""

    def __init__(self, model_dir):
        self.oracle_model = Oracle(model_dir)
        self.adapter = self.oracle_model.adapter
        self.processor = self.oracle_model.processor
        self.lm = LanguageModel(load_model(model_dir, parts=frozenset({LANGUAGE})))
        self.encoder = EncoderEngine(load_model(model_dir, parts=frozenset({ENCODER})))
        self.prefill = PrefillEngine(self.lm)
        self.modality = self.oracle_model.modality

    def case(self, i: int, n_media: int) -> tuple[str, list]:
        if self.modality == IMAGE:
            media = [random_image(100 * i + j, 48 + 16 * j, 64) for j in range(n_media)]
        else:
            media = [random_audio(100 * i + j, 0.5 + 0.5 * j) for j in range(n_media)]
        return self.oracle_model.chat_text(TEXTS[i % len(TEXTS)], n_media), media

    def oracle(self, text: str, media: list, n: int = N) -> list[int]:
        return self.oracle_model.generate(text, media, n)

    def admit(self, engine: DecodeEngine, rid: str, text: str, media: list, n: int = N) -> list[int]:
        """Encode, prefill straight into a reserved decode slot, join the batch."""
        images = media if self.modality == IMAGE else []
        audios = media if self.modality == AUDIO else []
        prepared = self.adapter.prepare(self.processor, text, images, audios)
        embeddings = self.encoder.encode(prepared.items) if prepared.items else []
        plan = self.prefill.plan(prepared.input_ids, prepared.items)
        engine.reserve(rid, plan.prompt_tokens)

        def sink(layer, k, v):
            engine.write_kv(rid, layer, KEY, 0, k)
            engine.write_kv(rid, layer, VALUE, 0, v)

        first = self.prefill.run(plan, {self.modality: embeddings}, Sampling(), sink)
        engine.activate(DecodeSpec(rid, first, plan.rope_delta, Sampling(), n, self.lm.eos_ids))
        return [first]


@pytest.fixture(scope="module", params=FAMILIES)
def stack(request, tiny_models):
    return Stack(tiny_models[request.param])


def run_batch(stack: Stack, engine: DecodeEngine, cases: list[tuple[str, list]], join_every: int = 1) -> dict[str, list[int]]:
    got: dict[str, list[int]] = {}
    pending = list(enumerate(cases))
    step = 0
    while pending or engine.num_active:
        if pending and engine.free_slots and step % join_every == 0:
            i, (text, media) = pending.pop(0)
            got[f"r{i}"] = stack.admit(engine, f"r{i}", text, media)
        for event in engine.step():
            got[event.request_id].append(event.token)
        step += 1
    return got


def test_single_requests_match_generate(stack):
    engine = DecodeEngine(stack.lm, slots=1, max_len=512)
    for i, n_media in enumerate((0, 1, 2)):
        text, media = stack.case(i, n_media)
        assert run_batch(stack, engine, [(text, media)])["r0"] == stack.oracle(text, media)


def test_continuous_batch_of_8_joining_at_different_steps_matches_generate(stack):
    # 4 slots for 8 requests: later requests wait for slots and join mid-batch; earlier ones
    # leave, so slots are compacted while others decode.
    engine = DecodeEngine(stack.lm, slots=4, max_len=512)
    cases = [stack.case(i, i % 3) for i in range(8)]
    got = run_batch(stack, engine, cases, join_every=2)
    want = {f"r{i}": stack.oracle(*c) for i, c in enumerate(cases)}
    assert got == want
    assert engine.free_slots == 4


def test_release_mid_batch_frees_the_slot_and_leaves_others_exact(stack):
    engine = DecodeEngine(stack.lm, slots=3, max_len=512)
    cases = [stack.case(i, 1) for i in range(3)]
    got = {f"r{i}": stack.admit(engine, f"r{i}", *c) for i, c in enumerate(cases)}
    for event in engine.step():
        got[event.request_id].append(event.token)
    assert engine.release("r0") and engine.free_slots == 1
    assert not engine.release("r0")
    # r0's hole is refilled by moving r2 down; a new request joins the freed slot.
    text, media = stack.case(5, 0)
    got["r5"] = stack.admit(engine, "r5", text, media)
    while engine.num_active:
        for event in engine.step():
            got[event.request_id].append(event.token)
    for i in (1, 2):
        assert got[f"r{i}"] == stack.oracle(*cases[i])
    assert got["r5"] == stack.oracle(text, media)
    assert engine.free_slots == 3


def test_gather_fallback_when_an_import_holds_a_hole(stack):
    """An import reserved in the middle of the active range forces the gathered path."""
    engine = DecodeEngine(stack.lm, slots=3, max_len=512)
    cases = [stack.case(i, 0) for i in range(3)]
    got = {}
    for i in range(3):
        got[f"r{i}"] = stack.admit(engine, f"r{i}", *cases[i])
    engine.release("r1")  # hole at slot 1 (r2 stays at slot 0..2 until the next step)
    engine.reserve("pending", 4)  # takes the only free slot: the hole
    while engine.num_active:
        for event in engine.step():
            got[event.request_id].append(event.token)
    assert got["r0"] == stack.oracle(*cases[0]) and got["r2"] == stack.oracle(*cases[2])
    assert engine.release("pending")


def test_slot_accounting(tiny_models):
    lm = LanguageModel(load_model(tiny_models["llava"], parts=frozenset({LANGUAGE})))
    engine = DecodeEngine(lm, slots=2, max_len=16)
    with pytest.raises(PromptTooLong):
        engine.reserve("long", 16)
    engine.reserve("a", 4)
    engine.reserve("b", 4)
    with pytest.raises(NoFreeSlot):
        engine.reserve("c", 4)
    with pytest.raises(ValueError):
        engine.reserve("a", 4)
    # The first token already a stop id: finished at activation, slot freed.
    event = engine.activate(DecodeSpec("a", 7, 0, Sampling(), 5, frozenset({7})))
    assert event is not None and event.finish is Finish.STOP and engine.free_slots == 1
    # max_new_tokens == 1: the first token is all there is.
    event = engine.activate(DecodeSpec("b", 3, 0, Sampling(), 1, frozenset()))
    assert event is not None and event.finish is Finish.LENGTH and engine.free_slots == 2
    # A chunk beyond the reserved prompt is refused.
    engine.reserve("d", 4)
    with pytest.raises(ValueError):
        engine.kv_destination("d", 0, KEY, 2, 3)
