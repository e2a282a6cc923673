from prism.v1 import common_pb2 as _common_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class Image(_message.Message):
    __slots__ = ("data", "mime_type")
    DATA_FIELD_NUMBER: _ClassVar[int]
    MIME_TYPE_FIELD_NUMBER: _ClassVar[int]
    data: bytes
    mime_type: str
    def __init__(self, data: _Optional[bytes] = ..., mime_type: _Optional[str] = ...) -> None: ...

class PcmAudio(_message.Message):
    __slots__ = ("samples_f32le", "sample_rate", "channels")
    SAMPLES_F32LE_FIELD_NUMBER: _ClassVar[int]
    SAMPLE_RATE_FIELD_NUMBER: _ClassVar[int]
    CHANNELS_FIELD_NUMBER: _ClassVar[int]
    samples_f32le: bytes
    sample_rate: int
    channels: int
    def __init__(self, samples_f32le: _Optional[bytes] = ..., sample_rate: _Optional[int] = ..., channels: _Optional[int] = ...) -> None: ...

class Audio(_message.Message):
    __slots__ = ("wav", "pcm")
    WAV_FIELD_NUMBER: _ClassVar[int]
    PCM_FIELD_NUMBER: _ClassVar[int]
    wav: bytes
    pcm: PcmAudio
    def __init__(self, wav: _Optional[bytes] = ..., pcm: _Optional[_Union[PcmAudio, _Mapping]] = ...) -> None: ...

class MediaPart(_message.Message):
    __slots__ = ("image", "audio")
    IMAGE_FIELD_NUMBER: _ClassVar[int]
    AUDIO_FIELD_NUMBER: _ClassVar[int]
    image: Image
    audio: Audio
    def __init__(self, image: _Optional[_Union[Image, _Mapping]] = ..., audio: _Optional[_Union[Audio, _Mapping]] = ...) -> None: ...

class ContentPart(_message.Message):
    __slots__ = ("text", "media")
    TEXT_FIELD_NUMBER: _ClassVar[int]
    MEDIA_FIELD_NUMBER: _ClassVar[int]
    text: str
    media: MediaPart
    def __init__(self, text: _Optional[str] = ..., media: _Optional[_Union[MediaPart, _Mapping]] = ...) -> None: ...

class ChatMessage(_message.Message):
    __slots__ = ("role", "content")
    ROLE_FIELD_NUMBER: _ClassVar[int]
    CONTENT_FIELD_NUMBER: _ClassVar[int]
    role: str
    content: _containers.RepeatedCompositeFieldContainer[ContentPart]
    def __init__(self, role: _Optional[str] = ..., content: _Optional[_Iterable[_Union[ContentPart, _Mapping]]] = ...) -> None: ...

class Chat(_message.Message):
    __slots__ = ("messages", "add_generation_prompt")
    MESSAGES_FIELD_NUMBER: _ClassVar[int]
    ADD_GENERATION_PROMPT_FIELD_NUMBER: _ClassVar[int]
    messages: _containers.RepeatedCompositeFieldContainer[ChatMessage]
    add_generation_prompt: bool
    def __init__(self, messages: _Optional[_Iterable[_Union[ChatMessage, _Mapping]]] = ..., add_generation_prompt: _Optional[bool] = ...) -> None: ...

class Slo(_message.Message):
    __slots__ = ("ttft_ms", "tpot_ms", "deadline_ms")
    TTFT_MS_FIELD_NUMBER: _ClassVar[int]
    TPOT_MS_FIELD_NUMBER: _ClassVar[int]
    DEADLINE_MS_FIELD_NUMBER: _ClassVar[int]
    ttft_ms: int
    tpot_ms: int
    deadline_ms: int
    def __init__(self, ttft_ms: _Optional[int] = ..., tpot_ms: _Optional[int] = ..., deadline_ms: _Optional[int] = ...) -> None: ...

class GenerateRequest(_message.Message):
    __slots__ = ("model", "request_id", "prompt", "chat", "media", "sampling", "slo", "priority", "selection", "variant", "sent_unix_ms")
    MODEL_FIELD_NUMBER: _ClassVar[int]
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    PROMPT_FIELD_NUMBER: _ClassVar[int]
    CHAT_FIELD_NUMBER: _ClassVar[int]
    MEDIA_FIELD_NUMBER: _ClassVar[int]
    SAMPLING_FIELD_NUMBER: _ClassVar[int]
    SLO_FIELD_NUMBER: _ClassVar[int]
    PRIORITY_FIELD_NUMBER: _ClassVar[int]
    SELECTION_FIELD_NUMBER: _ClassVar[int]
    VARIANT_FIELD_NUMBER: _ClassVar[int]
    SENT_UNIX_MS_FIELD_NUMBER: _ClassVar[int]
    model: str
    request_id: str
    prompt: str
    chat: Chat
    media: _containers.RepeatedCompositeFieldContainer[MediaPart]
    sampling: _common_pb2.SamplingParams
    slo: Slo
    priority: int
    selection: Selection
    variant: str
    sent_unix_ms: int
    def __init__(self, model: _Optional[str] = ..., request_id: _Optional[str] = ..., prompt: _Optional[str] = ..., chat: _Optional[_Union[Chat, _Mapping]] = ..., media: _Optional[_Iterable[_Union[MediaPart, _Mapping]]] = ..., sampling: _Optional[_Union[_common_pb2.SamplingParams, _Mapping]] = ..., slo: _Optional[_Union[Slo, _Mapping]] = ..., priority: _Optional[int] = ..., selection: _Optional[_Union[Selection, _Mapping]] = ..., variant: _Optional[str] = ..., sent_unix_ms: _Optional[int] = ...) -> None: ...

class Selection(_message.Message):
    __slots__ = ("accuracy_floor", "drop_modalities", "drop_images", "min_images", "downscale_images", "min_image_scale", "trim_audio", "min_audio_seconds")
    ACCURACY_FLOOR_FIELD_NUMBER: _ClassVar[int]
    DROP_MODALITIES_FIELD_NUMBER: _ClassVar[int]
    DROP_IMAGES_FIELD_NUMBER: _ClassVar[int]
    MIN_IMAGES_FIELD_NUMBER: _ClassVar[int]
    DOWNSCALE_IMAGES_FIELD_NUMBER: _ClassVar[int]
    MIN_IMAGE_SCALE_FIELD_NUMBER: _ClassVar[int]
    TRIM_AUDIO_FIELD_NUMBER: _ClassVar[int]
    MIN_AUDIO_SECONDS_FIELD_NUMBER: _ClassVar[int]
    accuracy_floor: float
    drop_modalities: _containers.RepeatedScalarFieldContainer[_common_pb2.Modality]
    drop_images: bool
    min_images: int
    downscale_images: bool
    min_image_scale: float
    trim_audio: bool
    min_audio_seconds: float
    def __init__(self, accuracy_floor: _Optional[float] = ..., drop_modalities: _Optional[_Iterable[_Union[_common_pb2.Modality, str]]] = ..., drop_images: _Optional[bool] = ..., min_images: _Optional[int] = ..., downscale_images: _Optional[bool] = ..., min_image_scale: _Optional[float] = ..., trim_audio: _Optional[bool] = ..., min_audio_seconds: _Optional[float] = ...) -> None: ...

class Reductions(_message.Message):
    __slots__ = ("strategy", "dropped_images", "image_scale", "audio_seconds", "dropped_modalities", "expected_accuracy", "description")
    STRATEGY_FIELD_NUMBER: _ClassVar[int]
    DROPPED_IMAGES_FIELD_NUMBER: _ClassVar[int]
    IMAGE_SCALE_FIELD_NUMBER: _ClassVar[int]
    AUDIO_SECONDS_FIELD_NUMBER: _ClassVar[int]
    DROPPED_MODALITIES_FIELD_NUMBER: _ClassVar[int]
    EXPECTED_ACCURACY_FIELD_NUMBER: _ClassVar[int]
    DESCRIPTION_FIELD_NUMBER: _ClassVar[int]
    strategy: str
    dropped_images: _containers.RepeatedScalarFieldContainer[int]
    image_scale: float
    audio_seconds: float
    dropped_modalities: _containers.RepeatedScalarFieldContainer[_common_pb2.Modality]
    expected_accuracy: float
    description: str
    def __init__(self, strategy: _Optional[str] = ..., dropped_images: _Optional[_Iterable[int]] = ..., image_scale: _Optional[float] = ..., audio_seconds: _Optional[float] = ..., dropped_modalities: _Optional[_Iterable[_Union[_common_pb2.Modality, str]]] = ..., expected_accuracy: _Optional[float] = ..., description: _Optional[str] = ...) -> None: ...

class GenerateUnaryRequest(_message.Message):
    __slots__ = ("request",)
    REQUEST_FIELD_NUMBER: _ClassVar[int]
    request: GenerateRequest
    def __init__(self, request: _Optional[_Union[GenerateRequest, _Mapping]] = ...) -> None: ...

class Usage(_message.Message):
    __slots__ = ("prompt_tokens", "image_tokens", "audio_tokens", "generated_tokens")
    PROMPT_TOKENS_FIELD_NUMBER: _ClassVar[int]
    IMAGE_TOKENS_FIELD_NUMBER: _ClassVar[int]
    AUDIO_TOKENS_FIELD_NUMBER: _ClassVar[int]
    GENERATED_TOKENS_FIELD_NUMBER: _ClassVar[int]
    prompt_tokens: int
    image_tokens: int
    audio_tokens: int
    generated_tokens: int
    def __init__(self, prompt_tokens: _Optional[int] = ..., image_tokens: _Optional[int] = ..., audio_tokens: _Optional[int] = ..., generated_tokens: _Optional[int] = ...) -> None: ...

class Timing(_message.Message):
    __slots__ = ("ttft_ms", "e2e_ms", "encode_ms", "prefill_ms", "tpot_ms")
    TTFT_MS_FIELD_NUMBER: _ClassVar[int]
    E2E_MS_FIELD_NUMBER: _ClassVar[int]
    ENCODE_MS_FIELD_NUMBER: _ClassVar[int]
    PREFILL_MS_FIELD_NUMBER: _ClassVar[int]
    TPOT_MS_FIELD_NUMBER: _ClassVar[int]
    ttft_ms: float
    e2e_ms: float
    encode_ms: float
    prefill_ms: float
    tpot_ms: float
    def __init__(self, ttft_ms: _Optional[float] = ..., e2e_ms: _Optional[float] = ..., encode_ms: _Optional[float] = ..., prefill_ms: _Optional[float] = ..., tpot_ms: _Optional[float] = ...) -> None: ...

class GenerateResponse(_message.Message):
    __slots__ = ("request_id", "token_ids", "text", "finish_reason", "timing", "usage", "placement", "reductions", "variant")
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    TOKEN_IDS_FIELD_NUMBER: _ClassVar[int]
    TEXT_FIELD_NUMBER: _ClassVar[int]
    FINISH_REASON_FIELD_NUMBER: _ClassVar[int]
    TIMING_FIELD_NUMBER: _ClassVar[int]
    USAGE_FIELD_NUMBER: _ClassVar[int]
    PLACEMENT_FIELD_NUMBER: _ClassVar[int]
    REDUCTIONS_FIELD_NUMBER: _ClassVar[int]
    VARIANT_FIELD_NUMBER: _ClassVar[int]
    request_id: str
    token_ids: _containers.RepeatedScalarFieldContainer[int]
    text: str
    finish_reason: _common_pb2.FinishReason
    timing: Timing
    usage: Usage
    placement: Placement
    reductions: Reductions
    variant: str
    def __init__(self, request_id: _Optional[str] = ..., token_ids: _Optional[_Iterable[int]] = ..., text: _Optional[str] = ..., finish_reason: _Optional[_Union[_common_pb2.FinishReason, str]] = ..., timing: _Optional[_Union[Timing, _Mapping]] = ..., usage: _Optional[_Union[Usage, _Mapping]] = ..., placement: _Optional[_Union[Placement, _Mapping]] = ..., reductions: _Optional[_Union[Reductions, _Mapping]] = ..., variant: _Optional[str] = ...) -> None: ...

class Placement(_message.Message):
    __slots__ = ("path", "attempts")
    PATH_FIELD_NUMBER: _ClassVar[int]
    ATTEMPTS_FIELD_NUMBER: _ClassVar[int]
    path: str
    attempts: int
    def __init__(self, path: _Optional[str] = ..., attempts: _Optional[int] = ...) -> None: ...

class GenerateUnaryResponse(_message.Message):
    __slots__ = ("request_id", "token_ids", "text", "finish_reason", "timing", "usage", "placement", "reductions", "variant")
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    TOKEN_IDS_FIELD_NUMBER: _ClassVar[int]
    TEXT_FIELD_NUMBER: _ClassVar[int]
    FINISH_REASON_FIELD_NUMBER: _ClassVar[int]
    TIMING_FIELD_NUMBER: _ClassVar[int]
    USAGE_FIELD_NUMBER: _ClassVar[int]
    PLACEMENT_FIELD_NUMBER: _ClassVar[int]
    REDUCTIONS_FIELD_NUMBER: _ClassVar[int]
    VARIANT_FIELD_NUMBER: _ClassVar[int]
    request_id: str
    token_ids: _containers.RepeatedScalarFieldContainer[int]
    text: str
    finish_reason: _common_pb2.FinishReason
    timing: Timing
    usage: Usage
    placement: Placement
    reductions: Reductions
    variant: str
    def __init__(self, request_id: _Optional[str] = ..., token_ids: _Optional[_Iterable[int]] = ..., text: _Optional[str] = ..., finish_reason: _Optional[_Union[_common_pb2.FinishReason, str]] = ..., timing: _Optional[_Union[Timing, _Mapping]] = ..., usage: _Optional[_Union[Usage, _Mapping]] = ..., placement: _Optional[_Union[Placement, _Mapping]] = ..., reductions: _Optional[_Union[Reductions, _Mapping]] = ..., variant: _Optional[str] = ...) -> None: ...

class ListModelsRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class ModelInfo(_message.Message):
    __slots__ = ("name", "family", "modalities", "max_context_tokens", "max_new_tokens_limit", "max_images_per_request", "max_audios_per_request")
    NAME_FIELD_NUMBER: _ClassVar[int]
    FAMILY_FIELD_NUMBER: _ClassVar[int]
    MODALITIES_FIELD_NUMBER: _ClassVar[int]
    MAX_CONTEXT_TOKENS_FIELD_NUMBER: _ClassVar[int]
    MAX_NEW_TOKENS_LIMIT_FIELD_NUMBER: _ClassVar[int]
    MAX_IMAGES_PER_REQUEST_FIELD_NUMBER: _ClassVar[int]
    MAX_AUDIOS_PER_REQUEST_FIELD_NUMBER: _ClassVar[int]
    name: str
    family: str
    modalities: _containers.RepeatedScalarFieldContainer[_common_pb2.Modality]
    max_context_tokens: int
    max_new_tokens_limit: int
    max_images_per_request: int
    max_audios_per_request: int
    def __init__(self, name: _Optional[str] = ..., family: _Optional[str] = ..., modalities: _Optional[_Iterable[_Union[_common_pb2.Modality, str]]] = ..., max_context_tokens: _Optional[int] = ..., max_new_tokens_limit: _Optional[int] = ..., max_images_per_request: _Optional[int] = ..., max_audios_per_request: _Optional[int] = ...) -> None: ...

class ListModelsResponse(_message.Message):
    __slots__ = ("models", "default_model")
    MODELS_FIELD_NUMBER: _ClassVar[int]
    DEFAULT_MODEL_FIELD_NUMBER: _ClassVar[int]
    models: _containers.RepeatedCompositeFieldContainer[ModelInfo]
    default_model: str
    def __init__(self, models: _Optional[_Iterable[_Union[ModelInfo, _Mapping]]] = ..., default_model: _Optional[str] = ...) -> None: ...
