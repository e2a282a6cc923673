"""Plain result types of the client SDK (frozen dataclasses built from the response messages)."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

from prism.v1 import common_pb2, prism_pb2

_FINISH = {
    common_pb2.FINISH_REASON_STOP: "stop",
    common_pb2.FINISH_REASON_LENGTH: "length",
    common_pb2.FINISH_REASON_CANCELLED: "cancelled",
}
_MODALITY = {
    common_pb2.MODALITY_TEXT: "text",
    common_pb2.MODALITY_IMAGE: "image",
    common_pb2.MODALITY_AUDIO: "audio",
    common_pb2.MODALITY_VIDEO: "video",
}


def finish_reason_name(value: int) -> str | None:
    """ "stop", "length", "cancelled", or None (unspecified: not finished yet)."""
    return _FINISH.get(value)


@dataclass(frozen=True)
class Usage:
    prompt_tokens: int = 0
    image_tokens: int = 0
    audio_tokens: int = 0
    generated_tokens: int = 0

    @classmethod
    def from_proto(cls, m: prism_pb2.Usage) -> Usage:
        return cls(m.prompt_tokens, m.image_tokens, m.audio_tokens, m.generated_tokens)


@dataclass(frozen=True)
class Timing:
    """Milliseconds: time to first token, end to end, in the encoder, in prefill, and the mean
    time per output token after the first."""

    ttft_ms: float = 0.0
    e2e_ms: float = 0.0
    encode_ms: float = 0.0
    prefill_ms: float = 0.0
    tpot_ms: float = 0.0

    @classmethod
    def from_proto(cls, m: prism_pb2.Timing) -> Timing:
        return cls(m.ttft_ms, m.e2e_ms, m.encode_ms, m.prefill_ms, m.tpot_ms)


@dataclass(frozen=True)
class Reductions:
    """What the scheduler dropped or shrunk to meet the deadline (``strategy`` "full": nothing)."""

    strategy: str
    dropped_images: tuple[int, ...]
    image_scale: float
    audio_seconds: float
    dropped_modalities: tuple[str, ...]
    expected_accuracy: float
    description: str

    @classmethod
    def from_proto(cls, m: prism_pb2.Reductions) -> Reductions:
        names = {1: "text", 2: "image", 3: "audio"}
        return cls(m.strategy, tuple(m.dropped_images), m.image_scale, m.audio_seconds,
                   tuple(names.get(x, str(x)) for x in m.dropped_modalities), m.expected_accuracy, m.description)


@dataclass(frozen=True)
class TokenChunk:
    """One streamed message: the tokens since the previous one and their text. The last chunk
    has ``finish_reason`` and ``usage``; ``timing`` comes on the first (ttft) and the last."""

    request_id: str
    token_ids: tuple[int, ...]
    text: str
    finish_reason: str | None = None
    timing: Timing | None = None
    usage: Usage | None = None
    placement: str | None = None
    """On the last chunk: ``"split"`` or ``"colocated"``, how the scheduler ran the request."""
    reductions: Reductions | None = None
    """On the last chunk: what was dropped or shrunk to meet the deadline."""
    variant: str | None = None
    """On the last chunk: the model variant that served the request (None: no variants)."""

    @classmethod
    def from_proto(cls, m: prism_pb2.GenerateResponse) -> TokenChunk:
        return cls(
            request_id=m.request_id,
            token_ids=tuple(m.token_ids),
            text=m.text,
            finish_reason=finish_reason_name(m.finish_reason),
            timing=Timing.from_proto(m.timing) if m.HasField("timing") else None,
            usage=Usage.from_proto(m.usage) if m.HasField("usage") else None,
            placement=m.placement.path or None if m.HasField("placement") else None,
            reductions=Reductions.from_proto(m.reductions) if m.HasField("reductions") else None,
            variant=m.variant or None,
        )


@dataclass(frozen=True)
class Completion:
    """A whole generation (``complete()``, or a collected stream)."""

    request_id: str
    text: str
    token_ids: tuple[int, ...]
    finish_reason: str | None
    usage: Usage | None
    timing: Timing | None
    placement: str | None = None
    reductions: Reductions | None = None
    variant: str | None = None

    @classmethod
    def from_proto(cls, m: prism_pb2.GenerateUnaryResponse) -> Completion:
        return cls(
            request_id=m.request_id,
            text=m.text,
            token_ids=tuple(m.token_ids),
            finish_reason=finish_reason_name(m.finish_reason),
            usage=Usage.from_proto(m.usage) if m.HasField("usage") else None,
            timing=Timing.from_proto(m.timing) if m.HasField("timing") else None,
            placement=m.placement.path or None if m.HasField("placement") else None,
            reductions=Reductions.from_proto(m.reductions) if m.HasField("reductions") else None,
            variant=m.variant or None,
        )

    @classmethod
    def from_chunks(cls, chunks: list[TokenChunk]) -> Completion:
        """Join a stream's chunks (timing from the last chunk that has it)."""
        last = chunks[-1] if chunks else None
        timing = next((c.timing for c in reversed(chunks) if c.timing is not None), None)
        return cls(
            request_id=next((c.request_id for c in chunks if c.request_id), ""),
            text="".join(c.text for c in chunks),
            token_ids=tuple(t for c in chunks for t in c.token_ids),
            finish_reason=last.finish_reason if last else None,
            usage=next((c.usage for c in reversed(chunks) if c.usage is not None), None),
            timing=timing,
            placement=next((c.placement for c in reversed(chunks) if c.placement), None),
            reductions=next((c.reductions for c in reversed(chunks) if c.reductions is not None), None),
            variant=next((c.variant for c in reversed(chunks) if c.variant), None),
        )


@dataclass(frozen=True)
class ModelInfo:
    name: str
    family: str
    modalities: tuple[str, ...]
    max_context_tokens: int
    max_new_tokens_limit: int
    max_images_per_request: int
    max_audios_per_request: int

    @classmethod
    def from_proto(cls, m: prism_pb2.ModelInfo) -> ModelInfo:
        return cls(
            m.name,
            m.family,
            tuple(_MODALITY.get(x, str(x)) for x in m.modalities),
            m.max_context_tokens,
            m.max_new_tokens_limit,
            m.max_images_per_request,
            m.max_audios_per_request,
        )


@dataclass(frozen=True)
class ModelList:
    """The served models (iterable) and the name an empty ``model`` selects."""

    models: tuple[ModelInfo, ...]
    default_model: str

    def __iter__(self) -> Iterator[ModelInfo]:
        return iter(self.models)

    def __len__(self) -> int:
        return len(self.models)

    def get(self, name: str) -> ModelInfo | None:
        return next((m for m in self.models if m.name == name), None)

    @classmethod
    def from_proto(cls, m: prism_pb2.ListModelsResponse) -> ModelList:
        return cls(tuple(ModelInfo.from_proto(x) for x in m.models), m.default_model)


__all__ = ["Completion", "ModelInfo", "ModelList", "Timing", "TokenChunk", "Usage", "finish_reason_name"]
