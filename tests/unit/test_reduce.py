"""Per-family input reductions (prism/models/reduce.py) on the tiny checkpoints: the candidates
each family offers, their exact token costs, the reduced media and text, and the reduced request
through Prism's engines against the monolithic model's greedy `generate` on the same reduced
inputs."""
from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image

from prism.engine.decode import DecodeEngine, DecodeSpec
from prism.engine.encoder import EncoderEngine
from prism.engine.kv import KEY, VALUE
from prism.engine.lm import LanguageModel
from prism.engine.prefill import PrefillEngine
from prism.engine.sampling import Sampling
from prism.models.base import AUDIO, IMAGE, InputError
from prism.models.loading import ENCODER, LANGUAGE, load_model
from prism.models.reduce import (
    DOWNSCALE_IMAGES, DROP_IMAGES, DROP_MODALITY, FULL, TRIM_AUDIO, Allowed, Reduction, apply, candidates,
    cost,
    drop_from_messages, drop_from_prompt, media_tokens, prepare_reduced, reduced_text,
)
from prism.models.registry import adapter_for
from tests.conftest import FAMILIES, random_audio, random_image
from tests.oracle import Oracle

EVERYTHING = Allowed(drop_modalities=frozenset({IMAGE, AUDIO}), drop_images=True, downscale_images=True,
                     trim_audio=True, min_scale=0.25, min_audio_s=0.5)


class Family:
    def __init__(self, model_dir):
        self.dir = model_dir
        self.adapter = adapter_for(model_dir)
        self.processor = self.adapter.load_processor()
        self.modality = next(iter(self.adapter.modalities))

    def media(self, n: int = 2) -> list[tuple[str, object]]:
        if self.modality == IMAGE:
            return [(IMAGE, random_image(10 + j, 128 - 32 * j, 96)) for j in range(n)]
        return [(AUDIO, random_audio(10 + j, 6.0 - 2 * j)) for j in range(n)]

    def messages(self, media, text: str = "describe what you get") -> list[dict]:
        content = [{"type": m} for m, _ in media] + [{"type": "text", "text": text}]
        return [{"role": "user", "content": content}]

    def chat(self, n_media: int, text: str = "describe what you get") -> str:
        content = [{"type": self.modality}] * n_media + [{"type": "text", "text": text}]
        return self.processor.apply_chat_template([{"role": "user", "content": content}], tokenize=False,
                                                  add_generation_prompt=True)

    def ids(self, media, allowed=EVERYTHING) -> list[str]:
        return [r.id for r in candidates(self.adapter, self.processor, media, allowed)]

    def tokens(self, media, allowed=EVERYTHING) -> list[int]:
        return [media_tokens(self.adapter, self.processor, media, r)
                for r in candidates(self.adapter, self.processor, media, allowed)]


@pytest.fixture(scope="module")
def families(tiny_models):
    cache = {}

    def get(name: str) -> Family:
        if name not in cache:
            cache[name] = Family(tiny_models[name])
        return cache[name]

    return get


@pytest.fixture(params=FAMILIES)
def fam(request, families) -> Family:
    return families(request.param)


# ---- what each family offers -----------------------------------------------------------------


def test_reduction_kinds_per_family(families):
    assert families("llava").adapter.reduction_kinds() == {DROP_IMAGES, DROP_MODALITY}
    for name in ("qwen2-vl", "qwen2.5-vl"):
        assert families(name).adapter.reduction_kinds() == {DOWNSCALE_IMAGES, DROP_IMAGES, DROP_MODALITY}
    assert families("qwen2-audio").adapter.reduction_kinds() == {TRIM_AUDIO, DROP_MODALITY}


def test_allowed_none_gives_only_full(fam):
    assert Allowed.none() == Allowed() and not Allowed.none().allows_any
    media = fam.media(3)
    assert candidates(fam.adapter, fam.processor, media, Allowed.none()) == [FULL]
    assert fam.ids([], EVERYTHING) == ["full"]
    # allowed, but nothing this family offers or this request has
    other = Allowed(trim_audio=True, drop_modalities=frozenset({AUDIO})) if fam.modality == IMAGE \
        else Allowed(drop_images=True, downscale_images=True, drop_modalities=frozenset({IMAGE}))
    assert fam.ids(media, other) == ["full"]


def test_llava_drops_images_never_downscales(families):
    f = families("llava")
    media = [(IMAGE, random_image(i, 64 + 16 * i, 64)) for i in range(3)]
    got = candidates(f.adapter, f.processor, media, EVERYTHING)
    assert [r.id for r in got] == ["full", "drop_images:1", "drop_images:2", "drop:image"]
    assert [r.dropped_images for r in got] == [(), (2,), (1, 2), ()]
    assert got[3].dropped_modalities == {IMAGE}
    assert f.tokens(media) == [192, 128, 64, 0]  # 64 tokens per image at any resolution
    # min_images: keep at least that many; dropping every image is then not offered
    assert f.ids(media, Allowed(drop_images=True, drop_modalities=frozenset({IMAGE}), min_images=2)) == \
        ["full", "drop_images:1"]
    assert f.ids(media, Allowed(drop_images=True)) == ["full", "drop_images:1", "drop_images:2"]
    assert f.ids(media, Allowed(downscale_images=True)) == ["full"]
    assert f.ids(media[:1], Allowed(drop_images=True)) == ["full"]  # "some of many": one image stays


@pytest.mark.parametrize("name", ["qwen2-vl", "qwen2.5-vl"])
def test_qwen_vl_downscales_and_drops(families, name):
    f = families(name)
    one = [(IMAGE, random_image(0, 128, 128))]
    assert f.ids(one) == ["full", "image_scale:0.75", "image_scale:0.5", "image_scale:0.25", "drop:image"]
    assert f.tokens(one) == [64, 36, 16, 4, 0]  # tokens follow the area
    assert f.ids(one, Allowed(downscale_images=True, min_scale=0.5)) == \
        ["full", "image_scale:0.75", "image_scale:0.5"]
    assert f.ids(one, Allowed(downscale_images=True, min_scale=0.6)) == ["full", "image_scale:0.75"]

    two = [(IMAGE, random_image(0, 64, 64)), (IMAGE, random_image(1, 48, 64))]
    # ordered by media tokens; 0.25 is left out: the processor's minimum pixels make it cost what 0.5 does
    assert f.ids(two) == ["full", "drop_images:1", "image_scale:0.75", "image_scale:0.5", "drop:image"]
    assert f.tokens(two) == [28, 16, 15, 8, 0]
    assert f.ids(two, Allowed(drop_images=True, drop_modalities=frozenset({IMAGE}), min_images=1)) == \
        ["full", "drop_images:1"]
    assert f.ids(two, Allowed(drop_images=True, downscale_images=True, min_images=2, min_scale=0.5)) == \
        ["full", "image_scale:0.75", "image_scale:0.5"]
    # an image already at the processor's minimum cannot get cheaper
    small = [(IMAGE, random_image(2, 32, 32))]
    assert f.ids(small, Allowed(downscale_images=True)) == ["full"]


def test_qwen2_audio_trims_and_drops(families):
    f = families("qwen2-audio")
    media = [(AUDIO, random_audio(0, 8.0)), (AUDIO, random_audio(1, 2.0))]
    got = candidates(f.adapter, f.processor, media, EVERYTHING)
    assert [r.id for r in got] == ["full", "audio_keep:0.5", "audio_keep:0.25", "drop:audio"]
    assert [r.audio_seconds for r in got] == [None, 4.0, 2.0, None]
    assert f.tokens(media) == [250, 150, 100, 0]  # 25 tokens a second; the 2 s clip is cut by neither
    assert f.ids(media, Allowed(trim_audio=True, min_audio_s=3)) == ["full", "audio_keep:0.5"]
    assert f.ids(media, Allowed(trim_audio=True, drop_modalities=frozenset({AUDIO}), min_audio_s=5)) == \
        ["full", "drop:audio"]
    assert f.ids([(AUDIO, random_audio(2, 3.3))], Allowed(trim_audio=True, min_audio_s=0)) == \
        ["full", "audio_keep:0.5", "audio_keep:0.25"]
    assert f.ids(media, Allowed(drop_images=True, downscale_images=True)) == ["full"]


# ---- every candidate: strictly cheaper, prepares like an unreduced request ----------------------


def test_every_candidate_is_cheaper_and_prepares(fam):
    media = fam.media(2)
    modalities = [m for m, _ in media]
    got = candidates(fam.adapter, fam.processor, media, EVERYTHING)
    assert got[0] == FULL and len(got) >= 3
    msgs = fam.messages(media)
    raw = "".join(fam.adapter.media_placeholder(m) for m in modalities) + "describe what you get"
    costs = [cost(fam.adapter, fam.processor, msgs, media, r) for r in got]
    full = costs[0]
    values = [v for _, v in media]
    images, audios = (values, []) if fam.modality == IMAGE else ([], values)
    unreduced = fam.adapter.prepare(fam.processor, fam.chat(2), images, audios)
    assert full["media_tokens"] == unreduced.tokens_of(fam.modality)
    assert full["prompt_tokens"] == len(unreduced.input_ids)
    for before, after in zip(costs, costs[1:]):
        assert after["media_tokens"] < before["media_tokens"]
    for r, c in zip(got, costs):
        req = prepare_reduced(fam.adapter, fam.processor, msgs, media, r)
        kept = r.kept(modalities)
        assert req.media.kept == kept
        # the chat renders as if the caller had sent only the kept media
        assert req.text == fam.chat(len(kept))
        assert c["prompt_tokens"] == len(req.prompt.input_ids) == c["text_tokens"] + c["media_tokens"]
        assert c["media_items"] == len(kept) and all(i.num_tokens >= 1 for i in req.prompt.items)
        assert c[f"{fam.modality}_tokens"] == c["media_tokens"]
        # the raw-prompt form prepares too, with the same media tokens
        from_raw = prepare_reduced(fam.adapter, fam.processor, raw, media, r).prompt
        assert from_raw.tokens_of(fam.modality) == c["media_tokens"]
        if r is not FULL:
            assert c["prompt_tokens"] < full["prompt_tokens"]


# ---- apply: the reduced media themselves --------------------------------------------------------


def test_apply_resizes_with_lanczos_keeping_aspect(families):
    f = families("qwen2-vl")
    img = random_image(3, 96, 64)
    media = [(IMAGE, img), (IMAGE, random_image(4, 20, 20)), (IMAGE, random_image(5, 12, 8))]
    before = img.tobytes()
    out = apply(f.adapter, f.processor, media, Reduction("image_scale:0.5", image_scale=0.5))
    assert out.kept == (0, 1, 2)
    assert out.images[0].size == (48, 32)
    assert out.images[0].tobytes() == img.resize((48, 32), Image.Resampling.LANCZOS).tobytes()
    # never below one merged patch (8 x 2 pixels), never above the original
    assert out.images[1].size == (16, 16)
    assert out.images[2] is media[2][1]
    assert img.tobytes() == before and img.size == (96, 64)  # the caller's image is untouched
    quarter = apply(f.adapter, f.processor, media, Reduction("image_scale:0.25", image_scale=0.25))
    assert [i.size for i in quarter.images] == [(24, 16), (16, 16), (12, 8)]


def test_apply_drops_and_trims(families):
    f = families("llava")
    media = [(IMAGE, random_image(i)) for i in range(4)]
    out = apply(f.adapter, f.processor, media, Reduction("drop_images:2", dropped_images=(2, 3)))
    assert out.kept == (0, 1) and out.images == [media[0][1], media[1][1]]
    none = apply(f.adapter, f.processor, media, Reduction("drop:image", dropped_modalities={IMAGE}))
    assert none.media == () and none.kept == ()
    with pytest.raises(ValueError):
        apply(f.adapter, f.processor, media, Reduction("drop_images:1", dropped_images=(7,)))

    a = families("qwen2-audio")
    clips = [(AUDIO, random_audio(0, 3.0)), (AUDIO, random_audio(1, 1.0))]
    out = apply(a.adapter, a.processor, clips, Reduction("audio_keep:0.5", audio_seconds=1.5))
    assert [len(x) for x in out.audios] == [24000, 16000]
    assert np.array_equal(out.audios[0], clips[0][1][:24000]) and out.audios[0].dtype == np.float32
    assert len(clips[0][1]) == 48000


def test_text_loses_the_dropped_placeholders(families):
    f = families("llava")
    got = drop_from_prompt(f.adapter, "<image>a <image>b <image>c", [IMAGE] * 3, (0, 2))
    assert got == "<image>a b <image>c"
    with pytest.raises(ValueError):
        drop_from_prompt(f.adapter, "<image>a", [IMAGE] * 2, (0,))
    msgs = [{"role": "user", "content": [{"type": IMAGE}, {"type": "text", "text": "x"}]},
            {"role": "assistant", "content": "ok"},
            {"role": "user", "content": [{"type": IMAGE}, {"type": IMAGE}, {"type": "text", "text": "y"}]}]
    out = drop_from_messages(msgs, (0, 2))
    assert out[0] == msgs[0] and out[1] == msgs[1]
    assert out[2]["content"] == [{"type": IMAGE}, {"type": "text", "text": "y"}]
    assert msgs[2]["content"][1] == {"type": IMAGE}  # not modified in place
    # audio chat numbering ("Audio 1:") follows the kept clips
    a = families("qwen2-audio")
    text = reduced_text(a.adapter, a.processor, a.messages([(AUDIO, 0), (AUDIO, 0)]), [AUDIO, AUDIO], (1,))
    assert "Audio 1:" in text and "Audio 2:" not in text


def test_reduction_is_reportable(families):
    f = families("qwen2-vl")
    for r in candidates(f.adapter, f.processor, [(IMAGE, random_image(0, 64, 64)), (IMAGE, random_image(1))],
                        EVERYTHING):
        d = r.as_dict()
        assert Reduction.from_dict(json.loads(json.dumps(d))) == r
        assert set(d) == {"id", "dropped_images", "image_scale", "audio_seconds", "dropped_modalities"}
    r = Reduction("drop_images:2", dropped_images=(3, 2))
    assert r.dropped_images == (2, 3) and r.describe() == "images 2, 3 dropped" and not r.is_full
    assert FULL.is_full and FULL.describe() == "full input"
    assert Reduction("drop:audio", dropped_modalities={AUDIO}).describe() == "all audio dropped"


def test_allowed_is_validated():
    assert Allowed(drop_modalities={IMAGE}).drop_modalities == frozenset({IMAGE})
    for bad in (dict(drop_modalities={"video"}), dict(min_images=-1), dict(min_scale=0), dict(min_scale=1.5),
                dict(min_audio_s=-1), dict(min_audio_s=float("nan"))):
        with pytest.raises(InputError):
            Allowed(**bad)


# ---- the reduced request is a valid model input: Prism's engines == monolithic generate ---------

ORACLE_CASES = {
    "llava": ([(IMAGE, random_image(7, 80, 64)), (IMAGE, random_image(8, 64, 48))], "drop_images:1"),
    "qwen2-vl": ([(IMAGE, random_image(7, 96, 64)), (IMAGE, random_image(8, 64, 64))], "image_scale:0.5"),
    "qwen2.5-vl": ([(IMAGE, random_image(7, 128, 96))], "image_scale:0.75"),
    "qwen2-audio": ([(AUDIO, random_audio(7, 3.0)), (AUDIO, random_audio(8, 1.0))], "audio_keep:0.25"),
}


def _engines_generate(model_dir, adapter, prompt, n: int) -> list[int]:
    """Encode, prefill into a decode slot, decode greedily: Prism's disaggregated path."""
    lm = LanguageModel(load_model(model_dir, parts=frozenset({LANGUAGE})))
    encoder = EncoderEngine(load_model(model_dir, parts=frozenset({ENCODER})))
    prefill, engine = PrefillEngine(lm), DecodeEngine(lm, slots=1, max_len=512)
    modality = next(iter(adapter.modalities))
    embeddings = encoder.encode(prompt.items) if prompt.items else []
    plan = prefill.plan(prompt.input_ids, prompt.items)
    engine.reserve("r", plan.prompt_tokens)

    def sink(layer, k, v):
        engine.write_kv("r", layer, KEY, 0, k)
        engine.write_kv("r", layer, VALUE, 0, v)

    first = prefill.run(plan, {modality: embeddings}, Sampling(), sink)
    tokens = [first]
    engine.activate(DecodeSpec("r", first, plan.rope_delta, Sampling(), n, lm.eos_ids))
    while engine.num_active:
        tokens += [e.token for e in engine.step()]
    return tokens


@pytest.mark.parametrize("name", FAMILIES)
def test_reduced_request_matches_monolithic_generate(families, name):
    f = families(name)
    media, rid = ORACLE_CASES[name]
    reduction = next(r for r in candidates(f.adapter, f.processor, media, EVERYTHING) if r.id == rid)
    req = prepare_reduced(f.adapter, f.processor, f.messages(media, "what is this"), media, reduction)
    assert req.prompt.tokens_of(f.modality) < media_tokens(f.adapter, f.processor, media, FULL)
    oracle = Oracle(f.dir)
    assert req.text == oracle.chat_text("what is this", len(req.media.kept))
    want = oracle.generate(req.text, [v for _, v in req.media.media], 8)
    assert _engines_generate(f.dir, f.adapter, req.prompt, 8) == want
