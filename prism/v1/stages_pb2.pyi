from prism.v1 import common_pb2 as _common_pb2
from prism.v1 import prism_pb2 as _prism_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class KvPart(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    KV_PART_UNSPECIFIED: _ClassVar[KvPart]
    KV_PART_KEY: _ClassVar[KvPart]
    KV_PART_VALUE: _ClassVar[KvPart]
KV_PART_UNSPECIFIED: KvPart
KV_PART_KEY: KvPart
KV_PART_VALUE: KvPart

class TaskHeader(_message.Message):
    __slots__ = ("request_id", "model", "deadline_unix_ms", "priority", "trace_context", "arrival_unix_ms", "strategy", "placement", "attempt")
    class TraceContextEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: str
        def __init__(self, key: _Optional[str] = ..., value: _Optional[str] = ...) -> None: ...
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    MODEL_FIELD_NUMBER: _ClassVar[int]
    DEADLINE_UNIX_MS_FIELD_NUMBER: _ClassVar[int]
    PRIORITY_FIELD_NUMBER: _ClassVar[int]
    TRACE_CONTEXT_FIELD_NUMBER: _ClassVar[int]
    ARRIVAL_UNIX_MS_FIELD_NUMBER: _ClassVar[int]
    STRATEGY_FIELD_NUMBER: _ClassVar[int]
    PLACEMENT_FIELD_NUMBER: _ClassVar[int]
    ATTEMPT_FIELD_NUMBER: _ClassVar[int]
    request_id: str
    model: str
    deadline_unix_ms: int
    priority: int
    trace_context: _containers.ScalarMap[str, str]
    arrival_unix_ms: int
    strategy: str
    placement: str
    attempt: int
    def __init__(self, request_id: _Optional[str] = ..., model: _Optional[str] = ..., deadline_unix_ms: _Optional[int] = ..., priority: _Optional[int] = ..., trace_context: _Optional[_Mapping[str, str]] = ..., arrival_unix_ms: _Optional[int] = ..., strategy: _Optional[str] = ..., placement: _Optional[str] = ..., attempt: _Optional[int] = ...) -> None: ...

class MediaInfo(_message.Message):
    __slots__ = ("modality", "num_tokens", "meta")
    class MetaEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: _common_pb2.Tensor
        def __init__(self, key: _Optional[str] = ..., value: _Optional[_Union[_common_pb2.Tensor, _Mapping]] = ...) -> None: ...
    MODALITY_FIELD_NUMBER: _ClassVar[int]
    NUM_TOKENS_FIELD_NUMBER: _ClassVar[int]
    META_FIELD_NUMBER: _ClassVar[int]
    modality: _common_pb2.Modality
    num_tokens: int
    meta: _containers.MessageMap[str, _common_pb2.Tensor]
    def __init__(self, modality: _Optional[_Union[_common_pb2.Modality, str]] = ..., num_tokens: _Optional[int] = ..., meta: _Optional[_Mapping[str, _common_pb2.Tensor]] = ...) -> None: ...

class MediaInput(_message.Message):
    __slots__ = ("info", "tensors")
    class TensorsEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: _common_pb2.Tensor
        def __init__(self, key: _Optional[str] = ..., value: _Optional[_Union[_common_pb2.Tensor, _Mapping]] = ...) -> None: ...
    INFO_FIELD_NUMBER: _ClassVar[int]
    TENSORS_FIELD_NUMBER: _ClassVar[int]
    info: MediaInfo
    tensors: _containers.MessageMap[str, _common_pb2.Tensor]
    def __init__(self, info: _Optional[_Union[MediaInfo, _Mapping]] = ..., tensors: _Optional[_Mapping[str, _common_pb2.Tensor]] = ...) -> None: ...

class EncodeRequest(_message.Message):
    __slots__ = ("header", "items")
    HEADER_FIELD_NUMBER: _ClassVar[int]
    ITEMS_FIELD_NUMBER: _ClassVar[int]
    header: TaskHeader
    items: _containers.RepeatedCompositeFieldContainer[MediaInput]
    def __init__(self, header: _Optional[_Union[TaskHeader, _Mapping]] = ..., items: _Optional[_Iterable[_Union[MediaInput, _Mapping]]] = ...) -> None: ...

class EncodeResponse(_message.Message):
    __slots__ = ("state", "item_tokens", "compute_ms", "worker", "batch_tokens", "compute_cpu_ms")
    STATE_FIELD_NUMBER: _ClassVar[int]
    ITEM_TOKENS_FIELD_NUMBER: _ClassVar[int]
    COMPUTE_MS_FIELD_NUMBER: _ClassVar[int]
    WORKER_FIELD_NUMBER: _ClassVar[int]
    BATCH_TOKENS_FIELD_NUMBER: _ClassVar[int]
    COMPUTE_CPU_MS_FIELD_NUMBER: _ClassVar[int]
    state: _common_pb2.TaskState
    item_tokens: _containers.RepeatedScalarFieldContainer[int]
    compute_ms: float
    worker: str
    batch_tokens: int
    compute_cpu_ms: float
    def __init__(self, state: _Optional[_Union[_common_pb2.TaskState, str]] = ..., item_tokens: _Optional[_Iterable[int]] = ..., compute_ms: _Optional[float] = ..., worker: _Optional[str] = ..., batch_tokens: _Optional[int] = ..., compute_cpu_ms: _Optional[float] = ...) -> None: ...

class FetchEmbeddingsRequest(_message.Message):
    __slots__ = ("request_id",)
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    request_id: str
    def __init__(self, request_id: _Optional[str] = ...) -> None: ...

class FetchEmbeddingsResponse(_message.Message):
    __slots__ = ("item", "total_rows", "chunk")
    ITEM_FIELD_NUMBER: _ClassVar[int]
    TOTAL_ROWS_FIELD_NUMBER: _ClassVar[int]
    CHUNK_FIELD_NUMBER: _ClassVar[int]
    item: int
    total_rows: int
    chunk: _common_pb2.TensorChunk
    def __init__(self, item: _Optional[int] = ..., total_rows: _Optional[int] = ..., chunk: _Optional[_Union[_common_pb2.TensorChunk, _Mapping]] = ...) -> None: ...

class PrefillRequest(_message.Message):
    __slots__ = ("header", "input_ids", "media", "encoder_address", "sampling", "embedding_sources")
    HEADER_FIELD_NUMBER: _ClassVar[int]
    INPUT_IDS_FIELD_NUMBER: _ClassVar[int]
    MEDIA_FIELD_NUMBER: _ClassVar[int]
    ENCODER_ADDRESS_FIELD_NUMBER: _ClassVar[int]
    SAMPLING_FIELD_NUMBER: _ClassVar[int]
    EMBEDDING_SOURCES_FIELD_NUMBER: _ClassVar[int]
    header: TaskHeader
    input_ids: _containers.RepeatedScalarFieldContainer[int]
    media: _containers.RepeatedCompositeFieldContainer[MediaInfo]
    encoder_address: str
    sampling: _common_pb2.SamplingParams
    embedding_sources: _containers.RepeatedCompositeFieldContainer[EmbeddingSource]
    def __init__(self, header: _Optional[_Union[TaskHeader, _Mapping]] = ..., input_ids: _Optional[_Iterable[int]] = ..., media: _Optional[_Iterable[_Union[MediaInfo, _Mapping]]] = ..., encoder_address: _Optional[str] = ..., sampling: _Optional[_Union[_common_pb2.SamplingParams, _Mapping]] = ..., embedding_sources: _Optional[_Iterable[_Union[EmbeddingSource, _Mapping]]] = ...) -> None: ...

class EmbeddingSource(_message.Message):
    __slots__ = ("address", "task_id", "items")
    ADDRESS_FIELD_NUMBER: _ClassVar[int]
    TASK_ID_FIELD_NUMBER: _ClassVar[int]
    ITEMS_FIELD_NUMBER: _ClassVar[int]
    address: str
    task_id: str
    items: _containers.RepeatedScalarFieldContainer[int]
    def __init__(self, address: _Optional[str] = ..., task_id: _Optional[str] = ..., items: _Optional[_Iterable[int]] = ...) -> None: ...

class PrefillResponse(_message.Message):
    __slots__ = ("state", "first_token", "prompt_tokens", "rope_delta", "compute_ms", "transfer_ms", "worker", "batch_tokens", "compute_cpu_ms")
    STATE_FIELD_NUMBER: _ClassVar[int]
    FIRST_TOKEN_FIELD_NUMBER: _ClassVar[int]
    PROMPT_TOKENS_FIELD_NUMBER: _ClassVar[int]
    ROPE_DELTA_FIELD_NUMBER: _ClassVar[int]
    COMPUTE_MS_FIELD_NUMBER: _ClassVar[int]
    TRANSFER_MS_FIELD_NUMBER: _ClassVar[int]
    WORKER_FIELD_NUMBER: _ClassVar[int]
    BATCH_TOKENS_FIELD_NUMBER: _ClassVar[int]
    COMPUTE_CPU_MS_FIELD_NUMBER: _ClassVar[int]
    state: _common_pb2.TaskState
    first_token: int
    prompt_tokens: int
    rope_delta: int
    compute_ms: float
    transfer_ms: float
    worker: str
    batch_tokens: int
    compute_cpu_ms: float
    def __init__(self, state: _Optional[_Union[_common_pb2.TaskState, str]] = ..., first_token: _Optional[int] = ..., prompt_tokens: _Optional[int] = ..., rope_delta: _Optional[int] = ..., compute_ms: _Optional[float] = ..., transfer_ms: _Optional[float] = ..., worker: _Optional[str] = ..., batch_tokens: _Optional[int] = ..., compute_cpu_ms: _Optional[float] = ...) -> None: ...

class FetchKvRequest(_message.Message):
    __slots__ = ("request_id",)
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    request_id: str
    def __init__(self, request_id: _Optional[str] = ...) -> None: ...

class KvHeader(_message.Message):
    __slots__ = ("num_layers", "num_kv_heads", "head_dim", "prompt_tokens", "dtype", "rope_delta")
    NUM_LAYERS_FIELD_NUMBER: _ClassVar[int]
    NUM_KV_HEADS_FIELD_NUMBER: _ClassVar[int]
    HEAD_DIM_FIELD_NUMBER: _ClassVar[int]
    PROMPT_TOKENS_FIELD_NUMBER: _ClassVar[int]
    DTYPE_FIELD_NUMBER: _ClassVar[int]
    ROPE_DELTA_FIELD_NUMBER: _ClassVar[int]
    num_layers: int
    num_kv_heads: int
    head_dim: int
    prompt_tokens: int
    dtype: _common_pb2.DType
    rope_delta: int
    def __init__(self, num_layers: _Optional[int] = ..., num_kv_heads: _Optional[int] = ..., head_dim: _Optional[int] = ..., prompt_tokens: _Optional[int] = ..., dtype: _Optional[_Union[_common_pb2.DType, str]] = ..., rope_delta: _Optional[int] = ...) -> None: ...

class KvChunk(_message.Message):
    __slots__ = ("layer", "part", "chunk")
    LAYER_FIELD_NUMBER: _ClassVar[int]
    PART_FIELD_NUMBER: _ClassVar[int]
    CHUNK_FIELD_NUMBER: _ClassVar[int]
    layer: int
    part: KvPart
    chunk: _common_pb2.TensorChunk
    def __init__(self, layer: _Optional[int] = ..., part: _Optional[_Union[KvPart, str]] = ..., chunk: _Optional[_Union[_common_pb2.TensorChunk, _Mapping]] = ...) -> None: ...

class KvTrailer(_message.Message):
    __slots__ = ("first_token",)
    FIRST_TOKEN_FIELD_NUMBER: _ClassVar[int]
    first_token: int
    def __init__(self, first_token: _Optional[int] = ...) -> None: ...

class FetchKvResponse(_message.Message):
    __slots__ = ("header", "chunk", "trailer")
    HEADER_FIELD_NUMBER: _ClassVar[int]
    CHUNK_FIELD_NUMBER: _ClassVar[int]
    TRAILER_FIELD_NUMBER: _ClassVar[int]
    header: KvHeader
    chunk: KvChunk
    trailer: KvTrailer
    def __init__(self, header: _Optional[_Union[KvHeader, _Mapping]] = ..., chunk: _Optional[_Union[KvChunk, _Mapping]] = ..., trailer: _Optional[_Union[KvTrailer, _Mapping]] = ...) -> None: ...

class DecodeRequest(_message.Message):
    __slots__ = ("header", "prefill_address", "sampling", "stop_token_ids", "prefill_task_id")
    HEADER_FIELD_NUMBER: _ClassVar[int]
    PREFILL_ADDRESS_FIELD_NUMBER: _ClassVar[int]
    SAMPLING_FIELD_NUMBER: _ClassVar[int]
    STOP_TOKEN_IDS_FIELD_NUMBER: _ClassVar[int]
    PREFILL_TASK_ID_FIELD_NUMBER: _ClassVar[int]
    header: TaskHeader
    prefill_address: str
    sampling: _common_pb2.SamplingParams
    stop_token_ids: _containers.RepeatedScalarFieldContainer[int]
    prefill_task_id: str
    def __init__(self, header: _Optional[_Union[TaskHeader, _Mapping]] = ..., prefill_address: _Optional[str] = ..., sampling: _Optional[_Union[_common_pb2.SamplingParams, _Mapping]] = ..., stop_token_ids: _Optional[_Iterable[int]] = ..., prefill_task_id: _Optional[str] = ...) -> None: ...

class DecodeResponse(_message.Message):
    __slots__ = ("state", "token_ids", "finish_reason", "worker")
    STATE_FIELD_NUMBER: _ClassVar[int]
    TOKEN_IDS_FIELD_NUMBER: _ClassVar[int]
    FINISH_REASON_FIELD_NUMBER: _ClassVar[int]
    WORKER_FIELD_NUMBER: _ClassVar[int]
    state: _common_pb2.TaskState
    token_ids: _containers.RepeatedScalarFieldContainer[int]
    finish_reason: _common_pb2.FinishReason
    worker: str
    def __init__(self, state: _Optional[_Union[_common_pb2.TaskState, str]] = ..., token_ids: _Optional[_Iterable[int]] = ..., finish_reason: _Optional[_Union[_common_pb2.FinishReason, str]] = ..., worker: _Optional[str] = ...) -> None: ...

class StoredRequest(_message.Message):
    __slots__ = ("request", "reduction", "expected_accuracy")
    REQUEST_FIELD_NUMBER: _ClassVar[int]
    REDUCTION_FIELD_NUMBER: _ClassVar[int]
    EXPECTED_ACCURACY_FIELD_NUMBER: _ClassVar[int]
    request: _prism_pb2.GenerateRequest
    reduction: str
    expected_accuracy: float
    def __init__(self, request: _Optional[_Union[_prism_pb2.GenerateRequest, _Mapping]] = ..., reduction: _Optional[str] = ..., expected_accuracy: _Optional[float] = ...) -> None: ...
