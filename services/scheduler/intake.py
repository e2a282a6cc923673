"""Admission of a public request: validate every field, decode the media, format the prompt and
run the family's processor, before any stage spends work on it.

Pure core (protobuf messages in, dataclasses out, `RequestError` with a status name and the
field at fault); the servicer maps errors to gRPC status codes.
"""
from __future__ import annotations

import math
import re
import secrets
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from prism.engine.sampling import Sampling
from prism.media import MediaLimits, decode_image, decode_pcm, decode_wav
from prism.models.base import AUDIO, IMAGE, FamilyAdapter, InputError, PreparedPrompt
from prism.v1 import common_pb2, prism_pb2

REQUEST_ID = re.compile(r"^[A-Za-z0-9._-]{1,128}$")
ROLES = frozenset({"system", "user", "assistant"})
#: How far ahead of the scheduler's clock a request's `sent_unix_ms` may be (clock skew).
MAX_CLOCK_SKEW_S = 60.0


class RequestError(Exception):
    """A request refused at the door. `code` is a grpc.StatusCode name."""

    def __init__(self, code: str, field: str, reason: str):
        super().__init__(f"{field}: {reason}")
        self.code, self.field, self.reason = code, field, reason


@dataclass(frozen=True)
class Limits:
    """Per-request limits, enforced before any work is spent."""

    max_images: int = field(default=8, metadata={"help": "images per request"})
    max_audios: int = field(default=4, metadata={"help": "audio clips per request"})
    max_new_tokens: int = field(default=1024, metadata={"help": "largest sampling.max_new_tokens accepted"})
    default_max_new_tokens: int = field(default=64, metadata={"help": "max_new_tokens when a request leaves it unset"})
    max_stop_strings: int = field(default=8, metadata={"help": "stop strings per request"})
    max_stop_length: int = field(default=128, metadata={"help": "characters per stop string"})
    max_image_pixels: int = field(default=4096 * 4096, metadata={"help": "pixels per image (width x height)"})
    max_audio_seconds: float = field(default=30.0, metadata={"help": "seconds per audio clip"})
    max_prompt_tokens: int = field(default=0, metadata={"help": "prompt tokens per request, media tokens included "
                                                                "(0: the model's context less max_new_tokens)"})
    max_deadline_ms: int = field(default=3_600_000, metadata={"help": "longest slo.deadline_ms accepted (0: any)"})

    def __post_init__(self) -> None:
        from prism.runtime.config import check

        check(self.max_images >= 0, "max_images", "must be >= 0")
        check(self.max_audios >= 0, "max_audios", "must be >= 0")
        check(self.max_new_tokens >= 1, "max_new_tokens", "must be >= 1")
        check(1 <= self.default_max_new_tokens <= self.max_new_tokens, "default_max_new_tokens",
              "must be in [1, max_new_tokens]")
        check(self.max_stop_strings >= 0, "max_stop_strings", "must be >= 0")
        check(self.max_stop_length >= 1, "max_stop_length", "must be >= 1")
        check(self.max_image_pixels >= 1, "max_image_pixels", "must be >= 1")
        check(self.max_audio_seconds > 0, "max_audio_seconds", "must be > 0")
        check(self.max_prompt_tokens >= 0, "max_prompt_tokens", "must be >= 0")
        check(self.max_deadline_ms >= 0, "max_deadline_ms", "must be >= 0")

    @property
    def media(self) -> MediaLimits:
        return MediaLimits(max_image_pixels=self.max_image_pixels, max_audio_seconds=self.max_audio_seconds)


@dataclass(frozen=True)
class ServedModel:
    """A model this deployment serves, as the front door sees it (no weights)."""

    name: str
    adapter: FamilyAdapter
    processor: Any
    #: Prompt plus generated tokens must fit in this many tokens.
    max_context: int
    eos_ids: frozenset[int]
    vocab_size: int

    @classmethod
    def load(cls, name: str, model_dir: Path, max_context: int = 0) -> "ServedModel":
        """The front door's view of a checkpoint: adapter, processor, EOS ids; no weights."""
        from transformers import GenerationConfig

        from prism.models.registry import adapter_for

        adapter = adapter_for(model_dir)
        try:
            eos = GenerationConfig.from_pretrained(str(model_dir)).eos_token_id
        except OSError:
            eos = adapter.text_config.eos_token_id
        eos_ids = frozenset([] if eos is None else [eos] if isinstance(eos, int) else eos)
        context = min(adapter.max_context, max_context) if max_context else adapter.max_context
        return cls(name=name, adapter=adapter, processor=adapter.load_processor(), max_context=context,
                   eos_ids=eos_ids, vocab_size=int(adapter.text_config.vocab_size))


@dataclass(frozen=True)
class Admitted:
    request_id: str
    model: ServedModel
    prompt: PreparedPrompt
    sampling: Sampling
    max_new_tokens: int
    stop: tuple[str, ...]
    stop_ids: frozenset[int]
    ignore_eos: bool
    priority: int
    arrival: float
    deadline: float | None  # absolute time.time(), None = none
    ttft_target_s: float | None = None
    tpot_target_s: float | None = None
    #: For input reductions: the chat messages or raw prompt to re-render, the decoded media
    #: as (modality, value) in request order, what the caller allows and its accuracy floor.
    source: Any = None
    media: tuple = ()
    add_generation_prompt: bool = True
    allowed: Any = None
    accuracy_floor: float = 0.0
    #: The reduction applied (None: the request as sent) and its profiled accuracy.
    reduction: Any = None
    expected_accuracy: float | None = None
    #: The model variant serving it (empty: the deployment names no variants).
    variant: str = ""

    @property
    def image_tokens(self) -> int:
        return self.prompt.tokens_of(IMAGE)

    @property
    def audio_tokens(self) -> int:
        return self.prompt.tokens_of(AUDIO)


def _invalid(field: str, reason: str) -> RequestError:
    return RequestError("INVALID_ARGUMENT", field, reason)


def _decode_part(part: prism_pb2.MediaPart, field: str, model: ServedModel, limits: Limits) -> tuple[str, Any]:
    kind = part.WhichOneof("kind")
    if kind is None:
        raise _invalid(field, "media part has neither image nor audio")
    modality = IMAGE if kind == "image" else AUDIO
    if modality not in model.adapter.modalities:
        raise _invalid(field, f"model {model.name!r} does not accept {modality}; it takes {sorted(model.adapter.modalities)}")
    try:
        if modality == IMAGE:
            return IMAGE, decode_image(part.image.data, f"{field}.image.data", limits.media)
        rate = model.adapter.audio_sampling_rate(model.processor)
        source = part.audio.WhichOneof("source")
        if source == "wav":
            return AUDIO, decode_wav(part.audio.wav, f"{field}.audio.wav", rate, limits.media)
        if source == "pcm":
            pcm = part.audio.pcm
            return AUDIO, decode_pcm(pcm.samples_f32le, pcm.sample_rate, pcm.channels, f"{field}.audio.pcm", rate, limits.media)
        raise _invalid(f"{field}.audio", "audio has neither wav nor pcm")
    except InputError as exc:
        raise _invalid(exc.field, exc.reason) from None


def _count(modalities: list[str], limits: Limits, field: str) -> None:
    images, audios = modalities.count(IMAGE), modalities.count(AUDIO)
    if images > limits.max_images:
        raise _invalid(field, f"{images} images exceed the limit of {limits.max_images} per request")
    if audios > limits.max_audios:
        raise _invalid(field, f"{audios} audio clips exceed the limit of {limits.max_audios} per request")


def _prompt_text(req: prism_pb2.GenerateRequest, model: ServedModel,
                 limits: Limits) -> tuple[str, list[str], list[Any], Any, bool]:
    """(formatted text, modalities, decoded media, source, add_generation_prompt) for prompt or
    chat input; `source` is what an input reduction re-renders (the chat messages, or the raw
    prompt with one placeholder per media item)."""
    adapter = model.adapter
    if req.WhichOneof("input") == "chat":
        if len(req.media):
            raise _invalid("media", "must be empty with chat input; put media in the chat content")
        if not req.chat.messages:
            raise _invalid("chat.messages", "empty chat")
        parts = [(p, f"chat.messages[{m}].content[{c}].media")
                 for m, msg in enumerate(req.chat.messages) for c, p in enumerate(msg.content)
                 if p.WhichOneof("part") == "media"]
        _count([IMAGE if p.media.WhichOneof("kind") == "image" else AUDIO for p, _ in parts], limits, "chat.messages")
        decoded = iter([_decode_part(p.media, f, model, limits) for p, f in parts])
        messages, modalities, media, has_text = [], [], [], False
        for m, msg in enumerate(req.chat.messages):
            if msg.role not in ROLES:
                raise _invalid(f"chat.messages[{m}].role", f"role {msg.role!r} is not one of {sorted(ROLES)}")
            content = []
            for c, part in enumerate(msg.content):
                if part.WhichOneof("part") == "text":
                    has_text = has_text or bool(part.text.strip())
                    content.append({"type": "text", "text": part.text})
                elif part.WhichOneof("part") == "media":
                    modality, value = next(decoded)
                    modalities.append(modality)
                    media.append(value)
                    content.append({"type": modality})
                else:
                    raise _invalid(f"chat.messages[{m}].content[{c}]", "empty content part")
            messages.append({"role": msg.role, "content": content})
        if not has_text and not media:
            raise _invalid("chat.messages", "empty prompt: no text and no media")
        add_prompt = req.chat.add_generation_prompt if req.chat.HasField("add_generation_prompt") else True
        try:
            text = model.processor.apply_chat_template(messages, tokenize=False, add_generation_prompt=add_prompt)
        except Exception as exc:  # template errors are the caller's input
            raise _invalid("chat.messages", f"chat template rejected the messages: {exc}") from None
        return text, modalities, media, messages, add_prompt

    prompt = req.prompt
    _count([IMAGE if p.WhichOneof("kind") == "image" else AUDIO for p in req.media], limits, "media")
    decoded = [_decode_part(p, f"media[{i}]", model, limits) for i, p in enumerate(req.media)]
    if not prompt.strip() and not decoded:
        raise _invalid("prompt", "empty prompt")
    modalities = [m for m, _ in decoded]
    marks = {m: adapter.media_placeholder(m) for m in set(modalities)}
    present = {m: prompt.count(mark) for m, mark in marks.items()}
    if all(n == 0 for n in present.values()):
        prompt = "".join(marks[m] for m in modalities) + prompt
    else:
        for m, mark in marks.items():
            if present[m] != modalities.count(m):
                raise _invalid("prompt", f"has {present[m]} {m} placeholders ({mark!r}) for {modalities.count(m)} {m} parts")
    return prompt, modalities, [v for _, v in decoded], prompt, True


def _media_fields(req: prism_pb2.GenerateRequest) -> list[tuple[str, str]]:
    """(modality, field) of each media part of `req`, in request order."""
    if req.WhichOneof("input") == "chat":
        parts = [(p.media, f"chat.messages[{m}].content[{c}].media")
                 for m, msg in enumerate(req.chat.messages) for c, p in enumerate(msg.content)
                 if p.WhichOneof("part") == "media"]
    else:
        parts = [(p, f"media[{i}]") for i, p in enumerate(req.media)]
    return [(IMAGE if p.WhichOneof("kind") == "image" else AUDIO, f) for p, f in parts]


def _sampling(req: prism_pb2.GenerateRequest, model: ServedModel, limits: Limits) -> tuple[Sampling, int]:
    s = req.sampling
    max_new = s.max_new_tokens if s.HasField("max_new_tokens") else limits.default_max_new_tokens
    if not 1 <= max_new <= limits.max_new_tokens:
        raise _invalid("sampling.max_new_tokens", f"{s.max_new_tokens} is outside [1, {limits.max_new_tokens}]")
    if not math.isfinite(s.temperature) or s.temperature < 0 or s.temperature > 100:
        raise _invalid("sampling.temperature", f"{s.temperature} is outside [0, 100]")
    if not math.isfinite(s.top_p) or not 0 <= s.top_p <= 1:
        raise _invalid("sampling.top_p", f"{s.top_p} is outside [0, 1]")
    if s.top_k < 0:
        raise _invalid("sampling.top_k", f"{s.top_k} is negative")
    if len(s.stop) > limits.max_stop_strings:
        raise _invalid("sampling.stop", f"{len(s.stop)} stop strings exceed the limit of {limits.max_stop_strings}")
    for i, stop in enumerate(s.stop):
        if not stop or len(stop) > limits.max_stop_length:
            raise _invalid(f"sampling.stop[{i}]", f"stop strings must have 1..{limits.max_stop_length} characters")
    for i, tok in enumerate(s.stop_token_ids):
        if not 0 <= tok < model.vocab_size:
            raise _invalid(f"sampling.stop_token_ids[{i}]", f"{tok} is outside the vocabulary [0, {model.vocab_size})")
    seed = s.seed if s.HasField("seed") else secrets.randbits(63)
    return Sampling(temperature=s.temperature, top_p=s.top_p or 1.0, top_k=s.top_k, seed=seed), max_new


def admit(req: prism_pb2.GenerateRequest, models: dict[str, ServedModel], default_model: str,
          limits: Limits, grpc_deadline: float | None = None) -> Admitted:
    """Validate and prepare `req`; raises RequestError naming the field at fault."""
    arrival = time.time()
    name = req.model or default_model
    if name not in models:
        raise RequestError("NOT_FOUND", "model", f"model {name!r} is not served here; served: {sorted(models)}")
    model = models[name]
    if req.request_id and not REQUEST_ID.match(req.request_id):
        raise _invalid("request_id", "use 1..128 letters, digits, '.', '_' or '-'")
    request_id = req.request_id or secrets.token_hex(8)
    if req.WhichOneof("input") is None:
        raise _invalid("prompt", "empty prompt: set prompt or chat")
    sampling, max_new = _sampling(req, model, limits)
    if req.slo.deadline_ms < 0 or req.slo.ttft_ms < 0 or req.slo.tpot_ms < 0:
        raise _invalid("slo", "targets must not be negative")
    if limits.max_deadline_ms and req.slo.deadline_ms > limits.max_deadline_ms:
        raise _invalid("slo.deadline_ms", f"{req.slo.deadline_ms} ms is more than the {limits.max_deadline_ms} ms allowed")
    text, modalities, media, source, add_prompt = _prompt_text(req, model, limits)
    allowed, floor = _selection(req)
    images = [m for k, m in zip(modalities, media) if k == IMAGE]
    audios = [m for k, m in zip(modalities, media) if k == AUDIO]
    try:
        prepared = model.adapter.prepare(model.processor, text, images, audios)
    except InputError as exc:
        raise _invalid(exc.field, exc.reason) from None
    except (ValueError, TypeError) as exc:
        raise _invalid("prompt", f"the processor rejected the input: {exc}") from None
    # an item that fills no placeholder token would vanish from the prompt unseen (a Qwen2-Audio
    # clip of 20 ms or less yields no audio tokens)
    fields = _media_fields(req)
    for modality in (IMAGE, AUDIO):
        mine = [f for m, f in fields if m == modality]
        for f, item in zip(mine, [i for i in prepared.items if i.modality == modality]):
            if item.num_tokens < 1:
                raise _invalid(f, f"{modality} is too short for model {model.name!r}: it yields no {modality} tokens")
    total = len(prepared.input_ids)
    if limits.max_prompt_tokens and total > limits.max_prompt_tokens:
        raise _invalid("prompt", f"{total} prompt tokens (image {prepared.tokens_of(IMAGE)}, audio "
                                 f"{prepared.tokens_of(AUDIO)}) are more than the {limits.max_prompt_tokens} allowed")
    if total + max_new > model.max_context:
        raise _invalid(
            "prompt",
            f"{total} prompt tokens (image {prepared.tokens_of(IMAGE)}, audio {prepared.tokens_of(AUDIO)}) plus "
            f"sampling.max_new_tokens {max_new} exceed the model's context of {model.max_context} tokens",
        )
    # Dynamic SLO: the budget counts from when the caller sent the request, so what the network
    # took is no longer left; the deadline (hence the stage queues' order) is the remaining budget.
    if req.sent_unix_ms < 0:
        raise _invalid("sent_unix_ms", "must be >= 0 (0: unset)")
    if req.sent_unix_ms and req.sent_unix_ms / 1000 > arrival + MAX_CLOCK_SKEW_S:
        raise _invalid("sent_unix_ms", f"{req.sent_unix_ms} is more than {MAX_CLOCK_SKEW_S:.0f} s ahead of "
                                       "the scheduler's clock")
    start = min(arrival, req.sent_unix_ms / 1000) if req.sent_unix_ms else arrival
    deadlines = [d for d in (grpc_deadline, start + req.slo.deadline_ms / 1000 if req.slo.deadline_ms else None) if d]
    stop_ids = frozenset(req.sampling.stop_token_ids) | (frozenset() if req.sampling.ignore_eos else model.eos_ids)
    return Admitted(
        request_id=request_id, model=model, prompt=prepared, sampling=sampling, max_new_tokens=max_new,
        stop=tuple(req.sampling.stop), stop_ids=stop_ids, ignore_eos=req.sampling.ignore_eos,
        priority=req.priority, arrival=arrival, deadline=min(deadlines) if deadlines else None,
        ttft_target_s=req.slo.ttft_ms / 1000 if req.slo.ttft_ms else None,
        tpot_target_s=req.slo.tpot_ms / 1000 if req.slo.tpot_ms else None,
        source=source, media=tuple(zip(modalities, media)), add_generation_prompt=add_prompt,
        allowed=allowed, accuracy_floor=floor,
    )


def _selection(req: prism_pb2.GenerateRequest) -> tuple[Any, float]:
    """The input reductions the caller allows (`prism.models.reduce.Allowed`) and its floor."""
    from prism.models.reduce import Allowed

    sel = req.selection
    if not math.isfinite(sel.accuracy_floor) or not 0 <= sel.accuracy_floor <= 1:
        raise _invalid("selection.accuracy_floor", f"{sel.accuracy_floor} is outside [0, 1]")
    names = {common_pb2.MODALITY_IMAGE: IMAGE, common_pb2.MODALITY_AUDIO: AUDIO}
    drop = []
    for i, m in enumerate(sel.drop_modalities):
        if m not in names:
            raise _invalid(f"selection.drop_modalities[{i}]", "only image or audio may be dropped")
        drop.append(names[m])
    try:
        allowed = Allowed(drop_modalities=frozenset(drop), drop_images=sel.drop_images,
                          min_images=sel.min_images, downscale_images=sel.downscale_images,
                          min_scale=sel.min_image_scale or 0.25, trim_audio=sel.trim_audio,
                          min_audio_s=sel.min_audio_seconds or 1.0)
    except InputError as exc:
        proto_name = {"min_scale": "min_image_scale", "min_audio_s": "min_audio_seconds"}.get(exc.field, exc.field)
        raise _invalid(f"selection.{proto_name}", exc.reason) from None
    return allowed, float(sel.accuracy_floor)
