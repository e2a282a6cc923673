"""services.scheduler.intake: admission of public GenerateRequests against the tiny LLaVA
(image) and Qwen2-Audio (audio) checkpoints' processors, and every refusal with its exact
status code and field."""
from __future__ import annotations

import dataclasses
import math
import time

import numpy as np
import pytest

from prism.models.base import AUDIO, IMAGE
from prism.v1 import common_pb2, prism_pb2 as pb
from services.scheduler.intake import Admitted, Limits, RequestError, ServedModel, admit
from tests.conftest import png_bytes, random_audio, random_image, wav_bytes

LIMITS = Limits()
IMAGE_MARK = "<image>"
AUDIO_MARK = "<|audio_bos|><|AUDIO|><|audio_eos|>"


# ---- fixtures and builders ----------------------------------------------------------------------


@pytest.fixture(scope="module")
def llava(tiny_models) -> ServedModel:
    return ServedModel.load("tiny-llava", tiny_models["llava"])


@pytest.fixture(scope="module")
def qaudio(tiny_models) -> ServedModel:
    return ServedModel.load("tiny-audio", tiny_models["qwen2-audio"])


@pytest.fixture(scope="module")
def models(llava, qaudio) -> dict[str, ServedModel]:
    return {llava.name: llava, qaudio.name: qaudio}


@pytest.fixture(scope="module")
def tokens_per_image(llava) -> int:
    vision = llava.adapter.config.vision_config
    return (vision.image_size // vision.patch_size) ** 2


def image_part(seed: int = 0, size: int = 64) -> pb.MediaPart:
    return pb.MediaPart(image=pb.Image(data=png_bytes(seed, size, size), mime_type="image/png"))


def wav_part(seconds: float = 1.0, seed: int = 0) -> pb.MediaPart:
    return pb.MediaPart(audio=pb.Audio(wav=wav_bytes(random_audio(seed, seconds))))


def pcm_part(seconds: float = 1.0, seed: int = 0, rate: int = 16000, channels: int = 1) -> pb.MediaPart:
    samples = random_audio(seed, seconds * channels, rate).astype("<f4").tobytes()
    return pb.MediaPart(audio=pb.Audio(pcm=pb.PcmAudio(samples_f32le=samples, sample_rate=rate, channels=channels)))


def text(t: str) -> pb.ContentPart:
    return pb.ContentPart(text=t)


def media(part: pb.MediaPart) -> pb.ContentPart:
    return pb.ContentPart(media=part)


def chat(*messages: tuple[str, list[pb.ContentPart]], add_generation_prompt: bool | None = None) -> pb.Chat:
    c = pb.Chat(messages=[pb.ChatMessage(role=r, content=parts) for r, parts in messages])
    if add_generation_prompt is not None:
        c.add_generation_prompt = add_generation_prompt
    return c


def sampling(**kwargs) -> common_pb2.SamplingParams:
    return common_pb2.SamplingParams(**kwargs)


def refused(req: pb.GenerateRequest, models: dict, field: str, code: str = "INVALID_ARGUMENT", *words: str,
            default: str = "tiny-llava", limits: Limits = LIMITS) -> RequestError:
    with pytest.raises(RequestError) as info:
        admit(req, models, default, limits)
    exc = info.value
    assert (exc.code, exc.field) == (code, field), (exc.code, exc.field, exc.reason)
    assert exc.reason
    for w in words:
        assert w.lower() in exc.reason.lower(), (w, exc.reason)
    return exc


def ids_of(model: ServedModel, prompt: str, images=(), audios=()) -> list[int]:
    """What the model's own processor makes of fully formatted text (the expected prompt ids)."""
    return model.adapter.prepare(model.processor, prompt, list(images), list(audios)).input_ids


# ---- admitted requests --------------------------------------------------------------------------


def test_prompt_only(models, llava):
    a = admit(pb.GenerateRequest(prompt="The red horse ran to the park.", priority=3), models, "tiny-llava", LIMITS)
    assert isinstance(a, Admitted)
    assert a.model is llava
    assert a.prompt.input_ids == llava.processor.tokenizer("The red horse ran to the park.")["input_ids"]
    assert a.prompt.items == [] and a.image_tokens == 0 and a.audio_tokens == 0
    assert len(a.request_id) == 16 and int(a.request_id, 16) >= 0
    assert a.max_new_tokens == LIMITS.default_max_new_tokens
    assert a.sampling.temperature == 0.0 and a.sampling.greedy and a.sampling.top_p == 1.0 and a.sampling.top_k == 0
    assert a.stop == () and a.stop_ids == llava.eos_ids == frozenset({llava.processor.tokenizer.eos_token_id})
    assert a.ignore_eos is False and a.priority == 3
    assert a.deadline is None and abs(a.arrival - time.time()) < 5


def test_model_selection(models, qaudio):
    a = admit(pb.GenerateRequest(model="tiny-audio", prompt="hello"), models, "tiny-llava", LIMITS)
    assert a.model is qaudio
    a = admit(pb.GenerateRequest(prompt="hello"), models, "tiny-audio", LIMITS)  # empty: the default
    assert a.model is qaudio


def test_request_id_kept(models):
    for rid in ("abc-DEF_1.2", "x", "a" * 128):
        assert admit(pb.GenerateRequest(request_id=rid, prompt="hi"), models, "tiny-llava", LIMITS).request_id == rid
    ids = {admit(pb.GenerateRequest(prompt="hi"), models, "tiny-llava", LIMITS).request_id for _ in range(3)}
    assert len(ids) == 3


def test_chat_with_image_is_formatted_and_expanded(models, llava, tokens_per_image):
    req = pb.GenerateRequest(chat=chat(("system", [text("Be brief.")]),
                                       ("user", [media(image_part(1)), text("What is it?")])))
    a = admit(req, models, "tiny-llava", LIMITS)
    # the tiny LLaVA template: bos, system text bare, "ROLE: " prefixes, "<image>\n" per image
    expected = "<s>Be brief.\nUSER: <image>\nWhat is it?\nASSISTANT:"
    assert a.prompt.input_ids == ids_of(llava, expected, [random_image(1)])
    image_id = llava.adapter.placeholder_token_ids[IMAGE]
    assert a.prompt.input_ids.count(image_id) == tokens_per_image == a.image_tokens
    assert a.audio_tokens == 0
    (item,) = a.prompt.items
    assert item.modality == IMAGE and item.num_tokens == tokens_per_image
    assert tuple(item.tensors["pixel_values"].shape[:2]) == (1, 3)
    decoded = llava.processor.tokenizer.decode(a.prompt.input_ids, skip_special_tokens=False)
    assert decoded.endswith("What is it?\nASSISTANT:")


def test_chat_add_generation_prompt_false(models, llava):
    req = pb.GenerateRequest(chat=chat(("user", [text("Hi there")]), ("assistant", [text("Hello")]),
                                       add_generation_prompt=False))
    a = admit(req, models, "tiny-llava", LIMITS)
    assert a.prompt.input_ids == ids_of(llava, "<s>USER: Hi there\nASSISTANT: Hello</s>")


def test_chat_with_two_images_in_two_turns(models, llava, tokens_per_image):
    req = pb.GenerateRequest(chat=chat(("user", [text("First"), media(image_part(1))]),
                                       ("assistant", [text("A cat.")]),
                                       ("user", [media(image_part(2, size=80)), text("And this?")])))
    a = admit(req, models, "tiny-llava", LIMITS)
    expected = "<s>USER: First<image>\n\nASSISTANT: A cat.</s>USER: <image>\nAnd this?\nASSISTANT:"
    assert a.prompt.input_ids == ids_of(llava, expected, [random_image(1), random_image(2, 80, 80)])
    assert [i.num_tokens for i in a.prompt.items] == [tokens_per_image] * 2
    assert a.image_tokens == 2 * tokens_per_image


def test_chat_with_audio_is_formatted_and_expanded(models, qaudio):
    req = pb.GenerateRequest(model="tiny-audio", chat=chat(
        ("user", [media(wav_part(1.0, seed=1)), media(pcm_part(2.0, seed=2)), text("Compare them.")])))
    a = admit(req, models, "tiny-llava", LIMITS)
    expected = ("<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n<|im_start|>user\n"
                f"Audio 1: {AUDIO_MARK}\nAudio 2: {AUDIO_MARK}\nCompare them.<|im_end|>\n<|im_start|>assistant\n")
    audio_id = qaudio.adapter.placeholder_token_ids[AUDIO]
    # Whisper frames (10 ms) -> conv stride 2 -> pool 2: 25 tokens per second
    assert [(i.modality, i.num_tokens) for i in a.prompt.items] == [(AUDIO, 25), (AUDIO, 50)]
    assert a.audio_tokens == 75 == a.prompt.input_ids.count(audio_id)
    assert a.image_tokens == 0
    clips = [random_audio(1, 1.0), random_audio(2, 2.0)]
    clips[0] = np.round(np.clip(clips[0], -1, 1) * 32767) / 32768  # what the 16-bit WAV carries
    assert a.prompt.input_ids == ids_of(qaudio, expected, audios=clips)
    assert a.stop_ids == qaudio.eos_ids and len(qaudio.eos_ids) == 2


def test_prompt_with_media_and_no_placeholders_gets_them_prepended(models, llava, tokens_per_image):
    req = pb.GenerateRequest(prompt="Describe both.", media=[image_part(1), image_part(2)])
    a = admit(req, models, "tiny-llava", LIMITS)
    assert a.prompt.input_ids == ids_of(llava, IMAGE_MARK * 2 + "Describe both.", [random_image(1), random_image(2)])
    assert a.image_tokens == 2 * tokens_per_image and len(a.prompt.items) == 2


def test_prompt_with_audio_and_no_placeholders(models, qaudio):
    req = pb.GenerateRequest(model="tiny-audio", prompt="What is this?", media=[wav_part(1.0)])
    a = admit(req, models, "tiny-llava", LIMITS)
    clip = np.round(np.clip(random_audio(0, 1.0), -1, 1) * 32767) / 32768
    assert a.prompt.input_ids == ids_of(qaudio, AUDIO_MARK + "What is this?", audios=[clip])
    assert a.audio_tokens == 25


def test_prompt_with_placeholders_keeps_them_in_place(models, llava, tokens_per_image):
    prompt = f"Left: {IMAGE_MARK} right: {IMAGE_MARK} which is brighter?"
    a = admit(pb.GenerateRequest(prompt=prompt, media=[image_part(1), image_part(2)]), models, "tiny-llava", LIMITS)
    assert a.prompt.input_ids == ids_of(llava, prompt, [random_image(1), random_image(2)])
    assert a.image_tokens == 2 * tokens_per_image


def test_media_only_prompt_is_accepted(models, tokens_per_image):
    a = admit(pb.GenerateRequest(prompt="", media=[image_part(1)]), models, "tiny-llava", LIMITS)
    assert a.image_tokens == tokens_per_image


@pytest.mark.parametrize(("prompt", "n_images", "have"), [
    (f"{IMAGE_MARK} only one mark", 2, 1),
    (f"{IMAGE_MARK}{IMAGE_MARK} two marks", 1, 2),
    (f"{IMAGE_MARK}{IMAGE_MARK}{IMAGE_MARK}", 2, 3),
])
def test_prompt_with_the_wrong_number_of_placeholders(models, prompt, n_images, have):
    req = pb.GenerateRequest(prompt=prompt, media=[image_part(i) for i in range(n_images)])
    exc = refused(req, models, "prompt", "INVALID_ARGUMENT", f"{have} image placeholders", f"{n_images} image parts")
    assert IMAGE_MARK in exc.reason


def test_audio_prompt_with_the_wrong_number_of_placeholders(models):
    req = pb.GenerateRequest(model="tiny-audio", prompt=f"{AUDIO_MARK} and {AUDIO_MARK}", media=[wav_part()])
    refused(req, models, "prompt", "INVALID_ARGUMENT", "2 audio placeholders", "1 audio parts")


def test_placeholder_without_media_is_refused(models):
    refused(pb.GenerateRequest(prompt=f"look: {IMAGE_MARK}"), models, "prompt", "INVALID_ARGUMENT", "image")


def test_chat_text_with_an_extra_placeholder_is_refused(models):
    req = pb.GenerateRequest(chat=chat(("user", [media(image_part(1)), text(f"and {IMAGE_MARK} too")])))
    refused(req, models, "prompt", "INVALID_ARGUMENT", "image")


# ---- refusals: model, id, input shape -----------------------------------------------------------------


def test_unknown_model(models):
    exc = refused(pb.GenerateRequest(model="gpt-9", prompt="hi"), models, "model", "NOT_FOUND", "gpt-9")
    assert "tiny-llava" in exc.reason and "tiny-audio" in exc.reason  # lists what is served
    refused(pb.GenerateRequest(prompt="hi"), models, "model", "NOT_FOUND", default="")


@pytest.mark.parametrize("rid", ["has space", "a" * 129, "slash/id", "ümlaut", "semi;colon", "new\nline"])
def test_bad_request_id(models, rid):
    refused(pb.GenerateRequest(request_id=rid, prompt="hi"), models, "request_id", "INVALID_ARGUMENT")


def test_neither_prompt_nor_chat(models):
    refused(pb.GenerateRequest(), models, "prompt", "INVALID_ARGUMENT", "empty prompt")
    refused(pb.GenerateRequest(media=[image_part()]), models, "prompt", "INVALID_ARGUMENT", "empty prompt")


@pytest.mark.parametrize("prompt", ["", "   ", "\n\t"])
def test_empty_prompt(models, prompt):
    refused(pb.GenerateRequest(prompt=prompt), models, "prompt", "INVALID_ARGUMENT", "empty prompt")


def test_empty_chat(models):
    refused(pb.GenerateRequest(chat=pb.Chat()), models, "chat.messages", "INVALID_ARGUMENT", "empty chat")


def test_chat_without_text_or_media(models):
    req = pb.GenerateRequest(chat=chat(("system", [text("  ")]), ("user", [])))
    refused(req, models, "chat.messages", "INVALID_ARGUMENT", "empty prompt")


@pytest.mark.parametrize("role", ["", "tool", "User", "robot"])
def test_bad_role(models, role):
    req = pb.GenerateRequest(chat=chat(("user", [text("hi")]), (role, [text("there")])))
    refused(req, models, "chat.messages[1].role", "INVALID_ARGUMENT", "system", "user", "assistant")


def test_empty_content_part(models):
    req = pb.GenerateRequest(chat=chat(("user", [text("hi"), pb.ContentPart()])))
    refused(req, models, "chat.messages[0].content[1]", "INVALID_ARGUMENT", "empty content part")


def test_media_with_chat_input(models):
    req = pb.GenerateRequest(chat=chat(("user", [text("hi")])), media=[image_part()])
    refused(req, models, "media", "INVALID_ARGUMENT", "chat")


# ---- refusals: media -----------------------------------------------------------------------------------


def test_empty_media_part(models):
    refused(pb.GenerateRequest(prompt="hi", media=[pb.MediaPart()]), models, "media[0]", "INVALID_ARGUMENT",
            "neither image nor audio")
    req = pb.GenerateRequest(chat=chat(("user", [text("hi"), media(pb.MediaPart())])))
    refused(req, models, "chat.messages[0].content[1].media", "INVALID_ARGUMENT", "neither image nor audio")


def test_audio_without_a_source(models):
    req = pb.GenerateRequest(model="tiny-audio", prompt="hi", media=[wav_part(), pb.MediaPart(audio=pb.Audio())])
    refused(req, models, "media[1].audio", "INVALID_ARGUMENT", "neither wav nor pcm")


def test_audio_to_the_image_only_model(models):
    req = pb.GenerateRequest(prompt="hi", media=[image_part(), wav_part()])
    refused(req, models, "media[1]", "INVALID_ARGUMENT", "does not accept audio", "tiny-llava", "image")
    req = pb.GenerateRequest(chat=chat(("user", [text("hi")]), ("user", [text("x"), media(pcm_part())])))
    refused(req, models, "chat.messages[1].content[1].media", "INVALID_ARGUMENT", "does not accept audio")


def test_images_to_the_audio_model(models):
    req = pb.GenerateRequest(model="tiny-audio", prompt="hi", media=[wav_part(), image_part()])
    refused(req, models, "media[1]", "INVALID_ARGUMENT", "does not accept image", "tiny-audio", "audio")
    req = pb.GenerateRequest(model="tiny-audio", chat=chat(("user", [media(image_part()), text("hi")])))
    refused(req, models, "chat.messages[0].content[0].media", "INVALID_ARGUMENT", "does not accept image")


def test_more_images_than_the_limit(models):
    limits = Limits(max_images=2)
    parts = [image_part(i) for i in range(3)]
    refused(pb.GenerateRequest(prompt="hi", media=parts), models, "media", "INVALID_ARGUMENT",
            "3 images", "limit of 2", limits=limits)
    req = pb.GenerateRequest(chat=chat(("user", [media(parts[0]), media(parts[1])]), ("user", [media(parts[2])])))
    refused(req, models, "chat.messages", "INVALID_ARGUMENT", "3 images", "limit of 2", limits=limits)
    # at the limit: fine
    admit(pb.GenerateRequest(prompt="hi", media=parts[:2]), models, "tiny-llava", limits)


def test_more_audios_than_the_limit(models):
    limits = Limits(max_audios=1)
    req = pb.GenerateRequest(model="tiny-audio", prompt="hi", media=[wav_part(0.5), pcm_part(0.5)])
    refused(req, models, "media", "INVALID_ARGUMENT", "2 audio clips", "limit of 1", limits=limits)
    req = pb.GenerateRequest(model="tiny-audio", chat=chat(("user", [media(wav_part(0.5)), media(wav_part(0.5))])))
    refused(req, models, "chat.messages", "INVALID_ARGUMENT", "2 audio clips", "limit of 1", limits=limits)


def test_zero_media_allowed(models):
    refused(pb.GenerateRequest(prompt="hi", media=[image_part()]), models, "media", "INVALID_ARGUMENT",
            "limit of 0", limits=Limits(max_images=0))


def test_corrupt_image(models):
    bad = pb.MediaPart(image=pb.Image(data=b"\x89PNG\r\n\x1a\nthis is not really a png"))
    refused(pb.GenerateRequest(prompt="hi", media=[bad]), models, "media[0].image.data", "INVALID_ARGUMENT")
    refused(pb.GenerateRequest(prompt="hi", media=[image_part(), pb.MediaPart(image=pb.Image())]), models,
            "media[1].image.data", "INVALID_ARGUMENT", "empty")
    req = pb.GenerateRequest(chat=chat(("user", [text("hi"), media(bad)])))
    refused(req, models, "chat.messages[0].content[1].media.image.data", "INVALID_ARGUMENT")


def test_image_over_the_pixel_limit(models):
    refused(pb.GenerateRequest(prompt="hi", media=[image_part(size=64)]), models, "media[0].image.data",
            "INVALID_ARGUMENT", "64x64", "exceeds", limits=Limits(max_image_pixels=64 * 64 - 1))


def test_corrupt_audio(models):
    req = pb.GenerateRequest(model="tiny-audio", prompt="hi", media=[pb.MediaPart(audio=pb.Audio(wav=b"RIFF...."))])
    refused(req, models, "media[0].audio.wav", "INVALID_ARGUMENT", "RIFF")
    req = pb.GenerateRequest(model="tiny-audio", prompt="hi", media=[pcm_part(rate=500)])
    refused(req, models, "media[0].audio.pcm.sample_rate", "INVALID_ARGUMENT", "500")
    req = pb.GenerateRequest(model="tiny-audio", prompt="hi", media=[pcm_part(channels=3)])
    refused(req, models, "media[0].audio.pcm.channels", "INVALID_ARGUMENT", "3 channels")
    req = pb.GenerateRequest(model="tiny-audio", prompt="hi", media=[wav_part(2.0)])
    refused(req, models, "media[0].audio.wav", "INVALID_ARGUMENT", "exceeds", limits=Limits(max_audio_seconds=1.5))


def test_resampled_audio_counts_tokens_at_the_model_rate(models):
    req = pb.GenerateRequest(model="tiny-audio", prompt="hi", media=[pcm_part(1.0, rate=8000), pcm_part(1.0, rate=44100, channels=2)])
    a = admit(req, models, "tiny-llava", LIMITS)
    assert [i.num_tokens for i in a.prompt.items] == [25, 25]


# ---- refusals: sampling, SLO, context -----------------------------------------------------------------


@pytest.mark.parametrize("value", [0, -1, -(2**31), LIMITS.max_new_tokens + 1])
def test_max_new_tokens_out_of_range(models, value):
    req = pb.GenerateRequest(prompt="hi", sampling=sampling(max_new_tokens=value))
    refused(req, models, "sampling.max_new_tokens", "INVALID_ARGUMENT", str(value), str(LIMITS.max_new_tokens))


def test_max_new_tokens_bounds_and_default(models):
    for value in (1, LIMITS.max_new_tokens):
        a = admit(pb.GenerateRequest(prompt="hi", sampling=sampling(max_new_tokens=value)), models, "tiny-llava", LIMITS)
        assert a.max_new_tokens == value
    limits = Limits(default_max_new_tokens=7, max_new_tokens=10)
    assert admit(pb.GenerateRequest(prompt="hi"), models, "tiny-llava", limits).max_new_tokens == 7
    assert admit(pb.GenerateRequest(prompt="hi", sampling=sampling(temperature=0.5)), models, "tiny-llava",
                 limits).max_new_tokens == 7


@pytest.mark.parametrize("value", [-0.01, 100.5, 1e9, math.nan, math.inf, -math.inf])
def test_temperature_out_of_range(models, value):
    refused(pb.GenerateRequest(prompt="hi", sampling=sampling(temperature=value)), models, "sampling.temperature",
            "INVALID_ARGUMENT", "[0, 100]")


@pytest.mark.parametrize("value", [-0.1, 1.01, math.nan, math.inf])
def test_top_p_out_of_range(models, value):
    refused(pb.GenerateRequest(prompt="hi", sampling=sampling(top_p=value)), models, "sampling.top_p",
            "INVALID_ARGUMENT", "[0, 1]")


def test_top_k_negative(models):
    refused(pb.GenerateRequest(prompt="hi", sampling=sampling(top_k=-1)), models, "sampling.top_k",
            "INVALID_ARGUMENT", "-1", "negative")


def test_sampling_values_kept(models):
    req = pb.GenerateRequest(prompt="hi", sampling=sampling(temperature=0.7, top_p=0.9, top_k=40))
    s = admit(req, models, "tiny-llava", LIMITS).sampling
    assert s.temperature == pytest.approx(0.7) and s.top_p == pytest.approx(0.9) and s.top_k == 40
    assert not s.greedy
    for t in (0.0, 100.0):
        assert admit(pb.GenerateRequest(prompt="hi", sampling=sampling(temperature=t)), models, "tiny-llava",
                     LIMITS).sampling.temperature == t
    # top_p 0 means 1
    assert admit(pb.GenerateRequest(prompt="hi", sampling=sampling(top_p=0.0)), models, "tiny-llava",
                 LIMITS).sampling.top_p == 1.0


def test_stop_strings(models):
    limits = Limits(max_stop_strings=3, max_stop_length=5)
    ok = admit(pb.GenerateRequest(prompt="hi", sampling=sampling(stop=["\n\n", "abcde", "x"])), models, "tiny-llava",
               limits)
    assert ok.stop == ("\n\n", "abcde", "x")
    refused(pb.GenerateRequest(prompt="hi", sampling=sampling(stop=["a", "b", "c", "d"])), models, "sampling.stop",
            "INVALID_ARGUMENT", "4 stop strings", "limit of 3", limits=limits)
    refused(pb.GenerateRequest(prompt="hi", sampling=sampling(stop=["ok", "abcdef"])), models, "sampling.stop[1]",
            "INVALID_ARGUMENT", "1..5", limits=limits)
    refused(pb.GenerateRequest(prompt="hi", sampling=sampling(stop=["ok", "fine", ""])), models, "sampling.stop[2]",
            "INVALID_ARGUMENT", "1..5", limits=limits)
    # the default limits
    refused(pb.GenerateRequest(prompt="hi", sampling=sampling(stop=["s"] * (LIMITS.max_stop_strings + 1))), models,
            "sampling.stop", "INVALID_ARGUMENT")
    refused(pb.GenerateRequest(prompt="hi", sampling=sampling(stop=["y" * (LIMITS.max_stop_length + 1)])), models,
            "sampling.stop[0]", "INVALID_ARGUMENT")


@pytest.mark.parametrize(("ids", "bad_index"), [([5, 1000], 1), ([-1], 0), ([3, 4, 2**31 - 1], 2)])
def test_stop_token_ids_outside_the_vocabulary(models, llava, ids, bad_index):
    assert llava.vocab_size == 1000
    refused(pb.GenerateRequest(prompt="hi", sampling=sampling(stop_token_ids=ids)), models,
            f"sampling.stop_token_ids[{bad_index}]", "INVALID_ARGUMENT", str(ids[bad_index]), "1000")


@pytest.mark.parametrize("slo", [pb.Slo(ttft_ms=-1), pb.Slo(tpot_ms=-5), pb.Slo(deadline_ms=-1000)])
def test_negative_slo(models, slo):
    refused(pb.GenerateRequest(prompt="hi", slo=slo), models, "slo", "INVALID_ARGUMENT", "negative")


def test_prompt_beyond_the_context(models, llava, tokens_per_image):
    small = dataclasses.replace(llava, max_context=100)
    served = {small.name: small}
    req = pb.GenerateRequest(prompt="Tell me.", media=[image_part()])
    n = len(admit(req, models, "tiny-llava", LIMITS).prompt.input_ids)
    assert n > 100 - LIMITS.default_max_new_tokens
    exc = refused(req, served, "prompt", "INVALID_ARGUMENT", f"{n} prompt tokens", f"image {tokens_per_image}",
                  "audio 0", f"max_new_tokens {LIMITS.default_max_new_tokens}", "context of 100")
    assert "exceed" in exc.reason
    # exactly filling the context is fine; one more token is not
    fits = pb.GenerateRequest(prompt="Tell me.", media=[image_part()], sampling=sampling(max_new_tokens=100 - n))
    assert admit(fits, served, "tiny-llava", LIMITS).max_new_tokens == 100 - n
    over = pb.GenerateRequest(prompt="Tell me.", media=[image_part()], sampling=sampling(max_new_tokens=101 - n))
    refused(over, served, "prompt", "INVALID_ARGUMENT", f"max_new_tokens {101 - n}")


def test_served_model_load_caps_the_context(tiny_models, llava):
    assert llava.max_context == llava.adapter.max_context == 4096
    capped = ServedModel.load("capped", tiny_models["llava"], max_context=128)
    assert capped.max_context == 128 and capped.name == "capped"
    assert ServedModel.load("big", tiny_models["llava"], max_context=10**6).max_context == 4096
    assert capped.eos_ids == llava.eos_ids and capped.vocab_size == llava.vocab_size


# ---- what the admission carries --------------------------------------------------------------------------


def test_seed_kept_when_given(models):
    for seed in (0, 12345, 2**64 - 1):
        a = admit(pb.GenerateRequest(prompt="hi", sampling=sampling(seed=seed)), models, "tiny-llava", LIMITS)
        assert a.sampling.seed == seed


def test_seed_drawn_when_not_given(models):
    seeds = {admit(pb.GenerateRequest(prompt="hi", sampling=sampling(temperature=1.0)), models, "tiny-llava",
                   LIMITS).sampling.seed for _ in range(4)}
    assert len(seeds) == 4
    assert all(0 <= s < 2**63 for s in seeds)


def test_eos_ids_in_stop_ids_unless_ignore_eos(models, llava, qaudio):
    a = admit(pb.GenerateRequest(prompt="hi", sampling=sampling(stop_token_ids=[7, 8])), models, "tiny-llava", LIMITS)
    assert a.stop_ids == frozenset({7, 8}) | llava.eos_ids and not a.ignore_eos
    a = admit(pb.GenerateRequest(prompt="hi", sampling=sampling(stop_token_ids=[7], ignore_eos=True)), models,
              "tiny-llava", LIMITS)
    assert a.stop_ids == frozenset({7}) and a.ignore_eos
    a = admit(pb.GenerateRequest(model="tiny-audio", prompt="hi", sampling=sampling(ignore_eos=True)), models,
              "tiny-llava", LIMITS)
    assert a.stop_ids == frozenset()
    a = admit(pb.GenerateRequest(model="tiny-audio", prompt="hi"), models, "tiny-llava", LIMITS)
    tok = qaudio.processor.tokenizer
    assert a.stop_ids == qaudio.eos_ids == frozenset(tok.convert_tokens_to_ids(["<|im_end|>", "<|endoftext|>"]))


def test_deadline_is_the_sooner_of_grpc_and_slo(models):
    def deadline(slo_ms: int, grpc: float | None):
        a = admit(pb.GenerateRequest(prompt="hi", slo=pb.Slo(deadline_ms=slo_ms, ttft_ms=100, tpot_ms=20)), models,
                  "tiny-llava", LIMITS, grpc_deadline=grpc)
        return a.deadline, a.arrival

    d, arrival = deadline(0, None)
    assert d is None
    d, arrival = deadline(5_000, None)
    assert d == pytest.approx(arrival + 5.0)
    soon = time.time() + 1.0
    d, arrival = deadline(5_000, soon)
    assert d == soon
    late = time.time() + 60.0
    d, arrival = deadline(5_000, late)
    assert d == pytest.approx(arrival + 5.0)
    d, arrival = deadline(0, late)
    assert d == late


def _pcm_samples(n: int) -> pb.MediaPart:
    samples = np.full(n, 0.1, "<f4").tobytes()
    return pb.MediaPart(audio=pb.Audio(pcm=pb.PcmAudio(samples_f32le=samples, sample_rate=16000)))


def test_audio_too_short_to_yield_a_token_is_refused(models):
    # 320 samples (20 ms) -> 2 mel frames -> 0 audio tokens: the clip would vanish from the prompt
    req = pb.GenerateRequest(model="tiny-audio", prompt="hi", media=[wav_part(0.5), _pcm_samples(320)])
    refused(req, models, "media[1]", "INVALID_ARGUMENT", "too short", "no audio tokens")
    req = pb.GenerateRequest(model="tiny-audio", chat=chat(("user", [text("hi")]), ("user", [media(_pcm_samples(16))])))
    refused(req, models, "chat.messages[1].content[0].media", "INVALID_ARGUMENT", "too short")
    a = admit(pb.GenerateRequest(model="tiny-audio", prompt="hi", media=[_pcm_samples(321)]), models, "tiny-llava", LIMITS)
    assert a.audio_tokens == 1


def test_prompt_token_limit_counts_media_tokens(models, tokens_per_image):
    req = pb.GenerateRequest(chat=chat(("user", [media(image_part(1)), text("what is it")])))
    admitted = admit(req, models, "tiny-llava", LIMITS)
    n = len(admitted.prompt.input_ids)
    assert n > tokens_per_image
    assert len(admit(req, models, "tiny-llava", Limits(max_prompt_tokens=n)).prompt.input_ids) == n  # inclusive
    refused(req, models, "prompt", "INVALID_ARGUMENT", f"{n} prompt tokens", f"image {tokens_per_image}",
            f"more than the {n - 1} allowed", limits=Limits(max_prompt_tokens=n - 1))


def test_request_deadline_limit(models):
    req = pb.GenerateRequest(prompt="hi", slo=pb.Slo(deadline_ms=5001))
    refused(req, models, "slo.deadline_ms", "INVALID_ARGUMENT", "5001 ms", "5000 ms allowed",
            limits=Limits(max_deadline_ms=5000))
    req.slo.deadline_ms = 5000
    assert admit(req, models, "tiny-llava", Limits(max_deadline_ms=5000)).deadline is not None
    req.slo.deadline_ms = 10**9
    assert admit(req, models, "tiny-llava", Limits(max_deadline_ms=0)).deadline is not None  # 0: any
