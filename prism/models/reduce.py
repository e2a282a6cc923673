"""Input reductions: the concrete, per-family ways to serve a request with media dropped or shrunk.

Deadline-driven modality selection (MOSEL, arXiv 2310.18481) serves a request under overload
with cheaper inputs, within what its caller allows. This module is the pure half: which
reductions a family offers for a request's decoded media (:func:`candidates`), how a reduction
changes the media and the prompt text (:func:`apply`, :func:`reduced_text`), and what it costs
in tokens, measured by the family's own ``prepare`` (:func:`cost`). No serving code.

Families differ through :meth:`FamilyAdapter.reduction_kinds`, never through model names:

* ``drop_images``: drop the last k of several images (LLaVA, Qwen2-VL, Qwen2.5-VL);
* ``downscale_images``: lower every image's resolution (Qwen2-VL, Qwen2.5-VL, whose image
  tokens scale with the area; LLaVA's are fixed per image, so it does not offer it);
* ``trim_audio``: keep the first seconds of each clip (Qwen2-Audio, 25 tokens a second);
* ``drop_modality``: drop every item of a modality (all three).

Contract with the caller (the intake):

1. ``media`` is the request's decoded media in request order, as ``(modality, value)`` pairs:
   PIL images, float32 mono numpy audio at ``adapter.audio_sampling_rate(processor)``.
   Indexes in a :class:`Reduction` (``dropped_images``) and in :attr:`ReducedMedia.kept` count
   every media part of the request in that order (the intake's ``media[i]`` or the i-th media
   part of a chat).
2. :func:`apply` returns the kept media, reduced, in the same order, and their request indexes.
3. The prompt must lose the placeholders of the dropped items. :func:`reduced_text` does it: for
   a chat (a list of messages whose media parts are ``{"type": "image" | "audio"}``, as the
   intake builds them), it removes the dropped media parts and renders the chat template again
   (so per-item numbering such as "Audio 2:" stays right); for a raw prompt string holding one
   ``adapter.media_placeholder(modality)`` per media item, it removes the dropped items'
   placeholders. A prompt string rendered from a chat template is not a raw prompt: pass the
   messages.
4. The reduced text and media then go through ``adapter.prepare`` exactly as an unreduced
   request's (:func:`prepare_reduced`).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Mapping, Sequence

import numpy as np

from prism.models.base import AUDIO, IMAGE, FamilyAdapter, InputError, PreparedPrompt

__all__ = [
    "DROP_MODALITY", "DROP_IMAGES", "DOWNSCALE_IMAGES", "TRIM_AUDIO", "KINDS",
    "IMAGE_SCALES", "AUDIO_FRACTIONS",
    "Allowed", "Reduction", "FULL", "ReducedMedia", "ReducedRequest",
    "candidates", "apply", "drop_from_messages", "drop_from_prompt", "reduced_text", "prepare_reduced",
    "media_tokens", "cost",
]

#: Reduction kinds a family may offer (see FamilyAdapter.reduction_kinds).
DROP_MODALITY = "drop_modality"
DROP_IMAGES = "drop_images"
DOWNSCALE_IMAGES = "downscale_images"
TRIM_AUDIO = "trim_audio"
KINDS = frozenset({DROP_MODALITY, DROP_IMAGES, DOWNSCALE_IMAGES, TRIM_AUDIO})

#: Image scales offered, largest first (each at least Allowed.min_scale).
IMAGE_SCALES = (0.75, 0.5, 0.25)
#: Audio lengths offered, as fractions of the longest clip, largest first (each at least
#: Allowed.min_audio_s seconds).
AUDIO_FRACTIONS = (0.5, 0.25)

MEDIA_MODALITIES = frozenset({IMAGE, AUDIO})

Media = Sequence[tuple[str, Any]]


# ---------------------------------------------------------------------------------------------
# What a caller allows.
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Allowed:
    """The reductions a caller permits for its request. The defaults permit nothing
    (:meth:`none`).

    ``drop_images`` drops some of several images, keeping at least ``max(1, min_images)``;
    dropping every image is ``"image" in drop_modalities``, offered only when ``min_images`` is 0.
    ``min_scale`` is the smallest image scale (of width and height) allowed, ``min_audio_s`` the
    fewest seconds a trimmed clip may keep.
    """

    drop_modalities: frozenset[str] = frozenset()
    drop_images: bool = False
    downscale_images: bool = False
    trim_audio: bool = False
    min_images: int = 0
    min_scale: float = 0.25
    min_audio_s: float = 1.0

    def __post_init__(self) -> None:
        mods = frozenset(self.drop_modalities)
        object.__setattr__(self, "drop_modalities", mods)
        if not mods <= MEDIA_MODALITIES:
            raise InputError("drop_modalities", f"{sorted(mods - MEDIA_MODALITIES)} are not modalities; "
                                                f"use {sorted(MEDIA_MODALITIES)}")
        if self.min_images < 0:
            raise InputError("min_images", f"{self.min_images} is negative")
        if not (math.isfinite(self.min_scale) and 0 < self.min_scale <= 1):
            raise InputError("min_scale", f"{self.min_scale} is outside (0, 1]")
        if not (math.isfinite(self.min_audio_s) and self.min_audio_s >= 0):
            raise InputError("min_audio_s", f"{self.min_audio_s} is not a number of seconds >= 0")

    @classmethod
    def none(cls) -> "Allowed":
        """Nothing may change: the request is served as asked."""
        return cls()

    @property
    def allows_any(self) -> bool:
        return bool(self.drop_modalities) or self.drop_images or self.downscale_images or self.trim_audio


# ---------------------------------------------------------------------------------------------
# One reduction.
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Reduction:
    """One concrete way to serve a request, reportable in its response as is (:meth:`as_dict`).

    ``id`` is machine-readable: ``"full"``, ``"drop_images:K"`` (the last K images),
    ``"image_scale:S"`` (every image's width and height times S), ``"audio_keep:F"`` (each clip cut
    to the first F of the longest clip's seconds: relative, so one id means the same reduction
    on clips of any length and one profiled accuracy applies to all), ``"drop:MODALITY"`` (every item of it). The other fields say the
    same for people: ``dropped_images`` the request indexes of the dropped images (counted over
    all media parts), ``image_scale`` 1.0 for unchanged images, ``audio_seconds`` None for
    untrimmed audio, ``dropped_modalities`` those dropped whole.
    """

    id: str = "full"
    dropped_images: tuple[int, ...] = ()
    image_scale: float = 1.0
    audio_seconds: float | None = None
    dropped_modalities: frozenset[str] = frozenset()

    def __post_init__(self) -> None:
        object.__setattr__(self, "dropped_images", tuple(sorted(int(i) for i in self.dropped_images)))
        object.__setattr__(self, "dropped_modalities", frozenset(self.dropped_modalities))
        if not 0 < self.image_scale <= 1:
            raise ValueError(f"image_scale {self.image_scale} is outside (0, 1]")
        if self.audio_seconds is not None and not self.audio_seconds > 0:
            raise ValueError(f"audio_seconds {self.audio_seconds} must be > 0")

    @property
    def is_full(self) -> bool:
        return (not self.dropped_images and self.image_scale == 1.0 and self.audio_seconds is None
                and not self.dropped_modalities)

    def kept(self, modalities: Sequence[str]) -> tuple[int, ...]:
        """Request indexes of the media items this reduction keeps, for a request whose media
        parts have `modalities` in order."""
        dropped = set(self.dropped_images)
        return tuple(i for i, m in enumerate(modalities)
                     if i not in dropped and m not in self.dropped_modalities)

    def as_dict(self) -> dict[str, Any]:
        """Plain JSON-ready fields (lists, sorted modalities); :meth:`from_dict` inverts it."""
        return {
            "id": self.id,
            "dropped_images": list(self.dropped_images),
            "image_scale": self.image_scale,
            "audio_seconds": self.audio_seconds,
            "dropped_modalities": sorted(self.dropped_modalities),
        }

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "Reduction":
        return cls(id=str(d["id"]), dropped_images=tuple(d.get("dropped_images", ())),
                   image_scale=float(d.get("image_scale", 1.0)),
                   audio_seconds=None if d.get("audio_seconds") is None else float(d["audio_seconds"]),
                   dropped_modalities=frozenset(d.get("dropped_modalities", ())))

    def describe(self) -> str:
        """One line for people, e.g. "images 2, 3 dropped" or "images scaled to 50%"."""
        parts = []
        if self.dropped_images:
            parts.append(f"image{'s' if len(self.dropped_images) > 1 else ''} "
                         f"{', '.join(map(str, self.dropped_images))} dropped")
        if self.image_scale != 1.0:
            parts.append(f"images scaled to {self.image_scale * 100:g}%")
        if self.audio_seconds is not None:
            parts.append(f"audio cut to its first {self.audio_seconds:g} s")
        parts += [f"all {_PLURAL.get(m, m)} dropped" for m in sorted(self.dropped_modalities)]
        return "; ".join(parts) or "full input"


FULL = Reduction()
_PLURAL = {IMAGE: "images", AUDIO: "audio"}


def _fmt(x: float) -> str:
    return f"{x:g}"


# ---------------------------------------------------------------------------------------------
# Applying a reduction to media and text.
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ReducedMedia:
    """The kept media in request order, reduced, and their indexes in the request."""

    media: tuple[tuple[str, Any], ...]
    kept: tuple[int, ...]

    @property
    def modalities(self) -> list[str]:
        return [m for m, _ in self.media]

    @property
    def images(self) -> list[Any]:
        return [v for m, v in self.media if m == IMAGE]

    @property
    def audios(self) -> list[Any]:
        return [v for m, v in self.media if m == AUDIO]


def _min_image_side(processor: Any) -> int:
    """The smallest side the processor handles without padding up: one merged patch of a
    patch-based processor (patch_size x merge_size), else 1 pixel."""
    ip = getattr(processor, "image_processor", None)
    patch, merge = getattr(ip, "patch_size", None), getattr(ip, "merge_size", None) or 1
    return int(patch) * int(merge) if isinstance(patch, int) and isinstance(merge, int) else 1


def _scale_image(image: Any, scale: float, min_side: int) -> Any:
    from PIL import Image

    width, height = image.size
    w = min(width, max(min_side, round(width * scale), 1))
    h = min(height, max(min_side, round(height * scale), 1))
    if (w, h) == (width, height):
        return image
    return image.resize((w, h), Image.Resampling.LANCZOS)


def apply(adapter: FamilyAdapter, processor: Any, media: Media, reduction: Reduction) -> ReducedMedia:
    """The request's media with `reduction` applied: dropped items removed, images resized (PIL
    LANCZOS, aspect ratio kept, never below the processor's minimum side nor above the original),
    audio cut to its first `audio_seconds`. Kept items are new objects where changed, the
    caller's otherwise (never modified)."""
    modalities = [m for m, _ in media]
    for i in reduction.dropped_images:
        if not 0 <= i < len(media) or modalities[i] != IMAGE:
            raise ValueError(f"reduction {reduction.id!r} drops media[{i}], "
                             "which is not an image of this request")
    kept = reduction.kept(modalities)
    min_side = _min_image_side(processor) if reduction.image_scale != 1.0 else 1
    samples = None
    if reduction.audio_seconds is not None and AUDIO in modalities:
        samples = max(1, round(reduction.audio_seconds * adapter.audio_sampling_rate(processor)))
    out = []
    for i in kept:
        modality, value = media[i]
        if modality == IMAGE and reduction.image_scale != 1.0:
            value = _scale_image(value, reduction.image_scale, min_side)
        elif modality == AUDIO and samples is not None and len(value) > samples:
            value = np.array(value[:samples], dtype=np.float32)
        out.append((modality, value))
    return ReducedMedia(tuple(out), kept)


def drop_from_messages(messages: Sequence[Mapping[str, Any]], kept: Sequence[int]) -> list[dict[str, Any]]:
    """Chat messages without the media parts whose request index is not in `kept` (media parts,
    ``{"type": "image" | "audio", ...}``, are counted in order over all messages). A message
    left without content keeps an empty content list."""
    keep, n, out = set(kept), 0, []
    for msg in messages:
        content = msg.get("content")
        if not isinstance(content, (list, tuple)):
            out.append(dict(msg))
            continue
        parts = []
        for part in content:
            if isinstance(part, Mapping) and part.get("type") in MEDIA_MODALITIES:
                if n in keep:
                    parts.append(part)
                n += 1
            else:
                parts.append(part)
        out.append({**msg, "content": parts})
    return out


def drop_from_prompt(adapter: FamilyAdapter, prompt: str, modalities: Sequence[str],
                     kept: Sequence[int]) -> str:
    """A raw prompt without the placeholders of the media items not in `kept`. The prompt holds
    one ``adapter.media_placeholder(m)`` per media item of modality m, in request order."""
    keep, spans = set(kept), []
    for modality in sorted(set(modalities)):
        mark = adapter.media_placeholder(modality)
        indexes = [i for i, m in enumerate(modalities) if m == modality]
        starts, at = [], prompt.find(mark)
        while at >= 0:
            starts.append(at)
            at = prompt.find(mark, at + len(mark))
        if len(starts) != len(indexes):
            raise ValueError(f"prompt has {len(starts)} {modality} placeholders ({mark!r}) "
                             f"for {len(indexes)} {modality} items")
        spans += [(s, s + len(mark)) for s, i in zip(starts, indexes) if i not in keep]
    for start, end in sorted(spans, reverse=True):
        prompt = prompt[:start] + prompt[end:]
    return prompt


def reduced_text(adapter: FamilyAdapter, processor: Any, text: str | Sequence[Mapping[str, Any]],
                 modalities: Sequence[str], kept: Sequence[int], *,
                 add_generation_prompt: bool = True) -> str:
    """The formatted prompt of the reduced request: `text` is a raw prompt (one placeholder per
    media item) or the chat messages, rendered again with the processor's chat template."""
    if isinstance(text, str):
        return text if len(kept) == len(modalities) else drop_from_prompt(adapter, text, modalities, kept)
    return processor.apply_chat_template(drop_from_messages(text, kept), tokenize=False,
                                         add_generation_prompt=add_generation_prompt)


@dataclass(frozen=True)
class ReducedRequest:
    reduction: Reduction
    text: str
    media: ReducedMedia
    prompt: PreparedPrompt


def prepare_reduced(adapter: FamilyAdapter, processor: Any, text: str | Sequence[Mapping[str, Any]],
                    media: Media, reduction: Reduction, *,
                    add_generation_prompt: bool = True) -> ReducedRequest:
    """Apply `reduction` to the request (text as in :func:`reduced_text`) and prepare it with the
    family's processor, exactly as an unreduced request."""
    reduced = apply(adapter, processor, media, reduction)
    formatted = reduced_text(adapter, processor, text, [m for m, _ in media], reduced.kept,
                             add_generation_prompt=add_generation_prompt)
    prompt = adapter.prepare(processor, formatted, reduced.images, reduced.audios)
    return ReducedRequest(reduction, formatted, reduced, prompt)


# ---------------------------------------------------------------------------------------------
# Costs and candidates.
# ---------------------------------------------------------------------------------------------


def _item_tokens(adapter: FamilyAdapter, processor: Any, reduced: ReducedMedia) -> list[int]:
    """Tokens of each kept item, from the family's own processor (a prompt of placeholders only:
    an item's tokens do not depend on the text around it)."""
    if not reduced.media:
        return []
    text = "".join(adapter.media_placeholder(m) for m in reduced.modalities)
    prepared = adapter.prepare(processor, text, reduced.images, reduced.audios)
    return [item.num_tokens for item in prepared.items]


def media_tokens(adapter: FamilyAdapter, processor: Any, media: Media, reduction: Reduction) -> int:
    """Media tokens of the request under `reduction` (exact; independent of the prompt text)."""
    return sum(_item_tokens(adapter, processor, apply(adapter, processor, media, reduction)))


def cost(adapter: FamilyAdapter, processor: Any, text: str | Sequence[Mapping[str, Any]], media: Media,
         reduction: Reduction, *, add_generation_prompt: bool = True) -> dict[str, Any]:
    """Token counts of the request under `reduction`, per stage, from the family's own
    ``prepare`` on the reduced request (exact): the encoder stage embeds ``media_tokens``
    (``image_tokens`` + ``audio_tokens``, over ``media_items`` items); the prefill stage runs
    ``prompt_tokens`` (``text_tokens`` + ``media_tokens``), the KV cache a decode starts from."""
    prompt = prepare_reduced(adapter, processor, text, media, reduction,
                             add_generation_prompt=add_generation_prompt).prompt
    return prompt_cost(prompt, reduction)


def prompt_cost(prompt: PreparedPrompt, reduction: Reduction) -> dict[str, Any]:
    """:func:`cost` of a reduced request already prepared (``prepare_reduced(...).prompt``)."""
    image, audio = prompt.tokens_of(IMAGE), prompt.tokens_of(AUDIO)
    return {
        "reduction": reduction.id,
        "media_items": len(prompt.items),
        "image_tokens": image,
        "audio_tokens": audio,
        "media_tokens": image + audio,
        "prompt_tokens": len(prompt.input_ids),
        "text_tokens": len(prompt.input_ids) - image - audio,
    }


def _options(adapter: FamilyAdapter, processor: Any, media: Media, allowed: Allowed) -> list[Reduction]:
    """Every reduction the family offers and the caller allows, before measuring."""
    kinds = adapter.reduction_kinds()
    modalities = [m for m, _ in media]
    images = [i for i, m in enumerate(modalities) if m == IMAGE]
    audios = [v for m, v in media if m == AUDIO]
    out: list[Reduction] = []
    if DOWNSCALE_IMAGES in kinds and allowed.downscale_images and images:
        out += [Reduction(f"image_scale:{_fmt(s)}", image_scale=s)
                for s in IMAGE_SCALES if s >= allowed.min_scale]
    if DROP_IMAGES in kinds and allowed.drop_images:
        keep = max(1, allowed.min_images)
        out += [Reduction(f"drop_images:{k}", dropped_images=tuple(images[-k:]))
                for k in range(1, len(images) - keep + 1)]
    if TRIM_AUDIO in kinds and allowed.trim_audio and audios:
        longest = max(len(a) for a in audios) / adapter.audio_sampling_rate(processor)
        seen = set()
        for fraction in AUDIO_FRACTIONS:
            seconds = round(longest * fraction, 2)
            if seconds > 0 and seconds >= allowed.min_audio_s and seconds not in seen:
                seen.add(seconds)
                out.append(Reduction(f"audio_keep:{_fmt(fraction)}", audio_seconds=seconds))
    if DROP_MODALITY in kinds:
        for modality in sorted(allowed.drop_modalities & set(modalities)):
            if modality == IMAGE and allowed.min_images > 0:
                continue
            out.append(Reduction(f"drop:{modality}", dropped_modalities=frozenset({modality})))
    return out


def candidates(adapter: FamilyAdapter, processor: Any, media: Media, allowed: Allowed) -> list[Reduction]:
    """The family's concrete reductions of a request that `allowed` permits, "full" first, then
    in strictly decreasing media tokens (measured with the family's processor).

    Offered: image scales 0.75, 0.5, 0.25 (at least ``min_scale``; families that downscale);
    dropping the last k images, keeping at least ``max(1, min_images)`` (families that drop
    images); each clip cut to 50% and 25% of the longest clip's seconds, at least
    ``min_audio_s`` (families that trim audio); dropping a whole modality the request has
    (``drop_modalities``; for images only when ``min_images`` is 0). The options are sorted by
    media tokens (ties keep the order above) and one that costs no fewer than the candidate
    before it (e.g. a scale below the processor's minimum pixels), or that leaves a kept item
    without tokens, is left out: every candidate costs strictly fewer media tokens than the one
    before it. ``Allowed.none()`` gives ["full"]. Each option is measured with the processor, a
    few ``prepare`` calls per request.
    """
    if not allowed.allows_any or not media:
        return [FULL]
    per_item = _item_tokens(adapter, processor, apply(adapter, processor, media, FULL))
    measured = []
    for reduction in _options(adapter, processor, media, allowed):
        reduced = apply(adapter, processor, media, reduction)
        if reduction.image_scale == 1.0 and reduction.audio_seconds is None:
            tokens = [per_item[i] for i in reduced.kept]  # items unchanged: an item's tokens are its own
        else:
            tokens = _item_tokens(adapter, processor, reduced)
        if all(t >= 1 for t in tokens):
            measured.append((sum(tokens), reduction))
    full = sum(per_item)
    out, last = [FULL], full
    for tokens, reduction in sorted(measured, key=lambda tr: -tr[0]):  # stable: ties keep offer order
        if tokens < last:
            out.append(reduction)
            last = tokens
    return out
