"""Building ``prism.v1.GenerateRequest`` messages from Python arguments.

:func:`build_request` is what the clients call; other tools (load generators, proxies, tests)
can use it to get the exact request proto the SDK would send. Arguments are checked here with
``TypeError``/``ValueError`` naming the argument, so a malformed request fails before any call.
"""

from __future__ import annotations

from dataclasses import dataclass

import math
import os
import re
import time
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

from prism.client.media import BytesLike, audio_part, image_part, to_audio, to_image
from prism.v1 import common_pb2, prism_pb2

INT32_MAX = 2**31 - 1
INT64_MAX = 2**63 - 1
UINT64_MAX = 2**64 - 1
ROLES = ("system", "user", "assistant")
_REQUEST_ID = re.compile(r"[A-Za-z0-9._-]{1,128}")


def _int(name: str, v: Any, lo: int, hi: int) -> int:
    if isinstance(v, bool) or not isinstance(v, int):
        raise TypeError(f"{name} must be an int, not {type(v).__name__}")
    if not lo <= v <= hi:
        raise ValueError(f"{name} must be in [{lo}, {hi}], not {v}")
    return v


def _float(name: str, v: Any, lo: float, hi: float) -> float:
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        raise TypeError(f"{name} must be a number, not {type(v).__name__}")
    if not (math.isfinite(v) and lo <= v <= hi):
        raise ValueError(f"{name} must be in [{lo}, {hi}], not {v}")
    return float(v)


def _single_or_many(x: Any, *, audio: bool) -> list:
    """Accept one media item where a sequence is expected (bytes, path, PIL image, and for
    audio a ``(samples, sample_rate)`` tuple)."""
    if x is None:
        return []
    if isinstance(x, (str, os.PathLike, *BytesLike)):
        return [x]
    if (
        audio
        and isinstance(x, tuple)
        and len(x) == 2
        and isinstance(x[1], int)
        and not isinstance(x[1], bool)
    ):
        return [x]
    if hasattr(x, "getbands") or hasattr(x, "__array_interface__"):  # a PIL image or an array
        return [x]
    if isinstance(x, Mapping) or not isinstance(x, Iterable):
        kind = "audios" if audio else "images"
        raise TypeError(f"{kind} must be a sequence of media items, not {type(x).__name__}")
    return list(x)


def _part(msg_i: int, part_i: int, part: Any) -> prism_pb2.ContentPart:
    where = f"messages[{msg_i}].content[{part_i}]"
    if isinstance(part, prism_pb2.ContentPart):
        return part
    if isinstance(part, str):
        return prism_pb2.ContentPart(text=part)
    if not isinstance(part, Mapping):
        raise TypeError(
            f"{where} must be a dict like {{'type': 'text', 'text': ...}}, not {type(part).__name__}"
        )
    kind = part.get("type")
    if kind == "text":
        text = part.get("text")
        if not isinstance(text, str):
            raise TypeError(f"{where}.text must be a str")
        return prism_pb2.ContentPart(text=text)
    if kind == "image":
        if "image" not in part:
            raise ValueError(f"{where}: an image part needs an 'image' key")
        return prism_pb2.ContentPart(media=image_part(part["image"], what=where))
    if kind == "image_url":  # OpenAI style; only data URLs (the client fetches nothing)
        url = part.get("image_url")
        url = url.get("url") if isinstance(url, Mapping) else url
        if not isinstance(url, str):
            raise TypeError(f"{where}.image_url must be a data URL string or {{'url': ...}}")
        if not url.startswith("data:"):
            raise ValueError(f"{where}: only data: URLs are accepted; download the image and pass its bytes")
        return prism_pb2.ContentPart(media=image_part(url, what=where))
    if kind == "audio":
        if "audio" not in part:
            raise ValueError(f"{where}: an audio part needs an 'audio' key")
        rate = part.get("sample_rate")
        media = prism_pb2.MediaPart(audio=to_audio(part["audio"], sample_rate=rate, what=where))
        return prism_pb2.ContentPart(media=media)
    if kind == "input_audio":  # OpenAI style: {"data": base64, "format": "wav"}
        spec = part.get("input_audio")
        if not isinstance(spec, Mapping) or not isinstance(spec.get("data"), str):
            raise TypeError(f"{where}.input_audio must be {{'data': <base64>, 'format': 'wav'}}")
        if spec.get("format", "wav") != "wav":
            raise ValueError(f"{where}: only WAV input_audio is accepted, not {spec.get('format')!r}")
        return prism_pb2.ContentPart(media=audio_part("data:audio/wav;base64," + spec["data"], what=where))
    raise ValueError(f"{where}: unknown part type {kind!r} (text, image, image_url, audio or input_audio)")


def build_chat(messages: Sequence[Any], add_generation_prompt: bool | None = None) -> prism_pb2.Chat:
    """``prism.v1.Chat`` from OpenAI-style message dicts (or ``ChatMessage`` messages).

    ``content`` is a str or a list of parts: ``{"type": "text", "text": ...}``, ``{"type":
    "image", "image": <bytes|path|PIL.Image>}``, ``{"type": "audio", "audio": <wav bytes|path|
    (samples, sample_rate)>}``, and the OpenAI ``image_url`` (data URLs) and ``input_audio`` forms.
    """
    if isinstance(messages, (str, Mapping)) or not isinstance(messages, Iterable):
        raise TypeError("messages must be a list of {'role': ..., 'content': ...} dicts")
    chat = prism_pb2.Chat()
    for i, m in enumerate(messages):
        if isinstance(m, prism_pb2.ChatMessage):
            chat.messages.append(m)
            continue
        if not isinstance(m, Mapping):
            raise TypeError(f"messages[{i}] must be a dict, not {type(m).__name__}")
        role = m.get("role")
        if role not in ROLES:
            raise ValueError(f"messages[{i}].role must be one of {', '.join(ROLES)}, not {role!r}")
        content = m.get("content")
        if content is None:
            parts = []
        elif isinstance(content, str):
            parts = [prism_pb2.ContentPart(text=content)]
        elif isinstance(content, Iterable) and not isinstance(content, (Mapping, *BytesLike)):
            parts = [_part(i, j, p) for j, p in enumerate(content)]
        else:
            raise TypeError(
                f"messages[{i}].content must be a str or a list of parts, not {type(content).__name__}"
            )
        chat.messages.append(prism_pb2.ChatMessage(role=role, content=parts))
    if not chat.messages:
        raise ValueError("messages is empty")
    if add_generation_prompt is not None:
        chat.add_generation_prompt = bool(add_generation_prompt)
    return chat


def build_request(
    prompt: str | None = None,
    *,
    messages: Sequence[Any] | None = None,
    images: Any = (),
    audios: Any = (),
    model: str = "",
    max_new_tokens: int | None = None,
    temperature: float = 0.0,
    top_p: float = 0.0,
    top_k: int = 0,
    seed: int | None = None,
    stop: str | Sequence[str] = (),
    stop_token_ids: Sequence[int] = (),
    ignore_eos: bool = False,
    ttft_ms: int = 0,
    tpot_ms: int = 0,
    deadline_ms: int = 0,
    priority: int = 0,
    request_id: str = "",
    add_generation_prompt: bool | None = None,
    reduce: "Reduce | None" = None,
    variant: str = "",
) -> prism_pb2.GenerateRequest:
    """The ``GenerateRequest`` for these arguments (see ``PrismClient.generate``).

    Exactly one of ``prompt`` (raw text; ``images``/``audios`` fill the model's placeholders, or
    go before the text) and ``messages`` (chat; media inside the content parts). ``max_new_tokens``
    None or 0 uses the deployment's default; ``temperature`` 0 is greedy; ``top_p`` 0 means 1;
    ``top_k`` 0 means no limit; ``seed`` None lets the server draw one. ``reduce``: what the
    scheduler may drop or shrink to meet ``deadline_ms`` (a :class:`Reduce`); None: never changed.
    ``variant``: the model variant to serve it ("": any at or above ``reduce.accuracy_floor``).
    The request carries the time it is built (``sent_unix_ms``): ``deadline_ms`` counts from it.
    """
    if (prompt is None) == (messages is None):
        raise ValueError("give exactly one of prompt or messages")
    if not isinstance(model, str):
        raise TypeError(f"model must be a str, not {type(model).__name__}")
    if not isinstance(request_id, str):
        raise TypeError(f"request_id must be a str, not {type(request_id).__name__}")
    if request_id and not _REQUEST_ID.fullmatch(request_id):
        raise ValueError("request_id must be 1-128 letters, digits, '-', '_' or '.'")
    if not isinstance(variant, str):
        raise TypeError(f"variant must be a str, not {type(variant).__name__}")
    req = prism_pb2.GenerateRequest(model=model, request_id=request_id, variant=variant,
                                    sent_unix_ms=int(time.time() * 1000))
    image_items = _single_or_many(images, audio=False)
    audio_items = _single_or_many(audios, audio=True)
    if prompt is not None:
        if not isinstance(prompt, str):
            raise TypeError(f"prompt must be a str, not {type(prompt).__name__}")
        req.prompt = prompt
        req.media.extend(
            prism_pb2.MediaPart(image=to_image(x, what=f"images[{i}]")) for i, x in enumerate(image_items)
        )
        req.media.extend(
            prism_pb2.MediaPart(audio=to_audio(x, what=f"audios[{i}]")) for i, x in enumerate(audio_items)
        )
    else:
        if image_items or audio_items:
            raise ValueError("with messages, media go in the content parts, not images=/audios=")
        req.chat.CopyFrom(build_chat(messages, add_generation_prompt))
    if add_generation_prompt is not None and prompt is not None:
        raise ValueError("add_generation_prompt applies to messages only")

    if isinstance(stop, str):
        stop = [stop]
    stops = list(stop)
    for i, s in enumerate(stops):
        if not isinstance(s, str) or not s:
            raise ValueError(f"stop[{i}] must be a non-empty str")
    ids = [_int(f"stop_token_ids[{i}]", t, 0, INT32_MAX) for i, t in enumerate(stop_token_ids)]
    if not isinstance(ignore_eos, bool):
        raise TypeError("ignore_eos must be a bool")
    sampling = common_pb2.SamplingParams(
        temperature=_float("temperature", temperature, 0.0, 1e6),
        top_p=_float("top_p", top_p, 0.0, 1.0),
        top_k=_int("top_k", top_k, 0, INT32_MAX),
        stop=stops,
        stop_token_ids=ids,
        ignore_eos=ignore_eos,
    )
    if max_new_tokens is not None:  # unset: the deployment's default
        sampling.max_new_tokens = _int("max_new_tokens", max_new_tokens, 1, INT32_MAX)
    if seed is not None:
        sampling.seed = _int("seed", seed, 0, UINT64_MAX)
    req.sampling.CopyFrom(sampling)
    req.slo.CopyFrom(
        prism_pb2.Slo(
            ttft_ms=_int("ttft_ms", ttft_ms, 0, INT64_MAX),
            tpot_ms=_int("tpot_ms", tpot_ms, 0, INT64_MAX),
            deadline_ms=_int("deadline_ms", deadline_ms, 0, INT64_MAX),
        )
    )
    req.priority = _int("priority", priority, -(2**31), INT32_MAX)
    if reduce is not None:
        if not isinstance(reduce, Reduce):
            raise TypeError(f"reduce must be a Reduce, not {type(reduce).__name__}")
        req.selection.CopyFrom(reduce.to_proto())
    return req


_MODALITIES = {"image": common_pb2.MODALITY_IMAGE, "audio": common_pb2.MODALITY_AUDIO}


@dataclass(frozen=True)
class Reduce:
    """What the scheduler may drop or shrink when the request would otherwise miss its
    deadline, and the least expected accuracy (as the deployment profiled it) accepted. The
    response's last chunk says what was done (``chunk.reductions``)."""

    accuracy_floor: float = 0.0
    drop_modalities: Sequence[str] = ()
    """"image" and/or "audio": may be dropped entirely."""
    drop_images: bool = False
    """Some of several images may be dropped (the last ones), keeping at least `min_images`."""
    min_images: int = 0
    downscale_images: bool = False
    min_image_scale: float = 0.0
    """Smallest scale of each image side (0: the server's default, 0.25)."""
    trim_audio: bool = False
    min_audio_seconds: float = 0.0
    """Least audio kept, seconds (0: the server's default, 1)."""

    def to_proto(self) -> prism_pb2.Selection:
        unknown = [m for m in self.drop_modalities if m not in _MODALITIES]
        if unknown:
            raise ValueError(f"drop_modalities: {unknown} are not image or audio")
        return prism_pb2.Selection(
            accuracy_floor=_float("accuracy_floor", self.accuracy_floor, 0.0, 1.0),
            drop_modalities=[_MODALITIES[m] for m in self.drop_modalities], drop_images=bool(self.drop_images),
            min_images=_int("min_images", self.min_images, 0, INT32_MAX), downscale_images=bool(self.downscale_images),
            min_image_scale=_float("min_image_scale", self.min_image_scale, 0.0, 1.0),
            trim_audio=bool(self.trim_audio),
            min_audio_seconds=_float("min_audio_seconds", self.min_audio_seconds, 0.0, 1e6))


__all__ = ["Reduce", "build_chat", "build_request"]
