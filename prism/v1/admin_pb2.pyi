from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class GetStatusRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class WorkerStatus(_message.Message):
    __slots__ = ("name", "address", "stages", "live", "draining", "pending_tokens", "decode_slots", "decode_active")
    class PendingTokensEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: int
        def __init__(self, key: _Optional[str] = ..., value: _Optional[int] = ...) -> None: ...
    NAME_FIELD_NUMBER: _ClassVar[int]
    ADDRESS_FIELD_NUMBER: _ClassVar[int]
    STAGES_FIELD_NUMBER: _ClassVar[int]
    LIVE_FIELD_NUMBER: _ClassVar[int]
    DRAINING_FIELD_NUMBER: _ClassVar[int]
    PENDING_TOKENS_FIELD_NUMBER: _ClassVar[int]
    DECODE_SLOTS_FIELD_NUMBER: _ClassVar[int]
    DECODE_ACTIVE_FIELD_NUMBER: _ClassVar[int]
    name: str
    address: str
    stages: _containers.RepeatedScalarFieldContainer[str]
    live: bool
    draining: bool
    pending_tokens: _containers.ScalarMap[str, int]
    decode_slots: int
    decode_active: int
    def __init__(self, name: _Optional[str] = ..., address: _Optional[str] = ..., stages: _Optional[_Iterable[str]] = ..., live: _Optional[bool] = ..., draining: _Optional[bool] = ..., pending_tokens: _Optional[_Mapping[str, int]] = ..., decode_slots: _Optional[int] = ..., decode_active: _Optional[int] = ...) -> None: ...

class StageStatus(_message.Message):
    __slots__ = ("stage", "queued", "pending_tokens", "load_tokens_per_s", "capacity_tokens_per_s", "desired_replicas", "actual_replicas", "min_replicas", "max_replicas", "slo_attainment")
    STAGE_FIELD_NUMBER: _ClassVar[int]
    QUEUED_FIELD_NUMBER: _ClassVar[int]
    PENDING_TOKENS_FIELD_NUMBER: _ClassVar[int]
    LOAD_TOKENS_PER_S_FIELD_NUMBER: _ClassVar[int]
    CAPACITY_TOKENS_PER_S_FIELD_NUMBER: _ClassVar[int]
    DESIRED_REPLICAS_FIELD_NUMBER: _ClassVar[int]
    ACTUAL_REPLICAS_FIELD_NUMBER: _ClassVar[int]
    MIN_REPLICAS_FIELD_NUMBER: _ClassVar[int]
    MAX_REPLICAS_FIELD_NUMBER: _ClassVar[int]
    SLO_ATTAINMENT_FIELD_NUMBER: _ClassVar[int]
    stage: str
    queued: int
    pending_tokens: int
    load_tokens_per_s: float
    capacity_tokens_per_s: float
    desired_replicas: int
    actual_replicas: int
    min_replicas: int
    max_replicas: int
    slo_attainment: float
    def __init__(self, stage: _Optional[str] = ..., queued: _Optional[int] = ..., pending_tokens: _Optional[int] = ..., load_tokens_per_s: _Optional[float] = ..., capacity_tokens_per_s: _Optional[float] = ..., desired_replicas: _Optional[int] = ..., actual_replicas: _Optional[int] = ..., min_replicas: _Optional[int] = ..., max_replicas: _Optional[int] = ..., slo_attainment: _Optional[float] = ...) -> None: ...

class GetStatusResponse(_message.Message):
    __slots__ = ("stages", "workers", "in_flight", "placements", "dead_letters", "selection", "adaptation")
    class PlacementsEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: int
        def __init__(self, key: _Optional[str] = ..., value: _Optional[int] = ...) -> None: ...
    STAGES_FIELD_NUMBER: _ClassVar[int]
    WORKERS_FIELD_NUMBER: _ClassVar[int]
    IN_FLIGHT_FIELD_NUMBER: _ClassVar[int]
    PLACEMENTS_FIELD_NUMBER: _ClassVar[int]
    DEAD_LETTERS_FIELD_NUMBER: _ClassVar[int]
    SELECTION_FIELD_NUMBER: _ClassVar[int]
    ADAPTATION_FIELD_NUMBER: _ClassVar[int]
    stages: _containers.RepeatedCompositeFieldContainer[StageStatus]
    workers: _containers.RepeatedCompositeFieldContainer[WorkerStatus]
    in_flight: int
    placements: _containers.ScalarMap[str, int]
    dead_letters: int
    selection: SelectionStatus
    adaptation: AdaptationStatus
    def __init__(self, stages: _Optional[_Iterable[_Union[StageStatus, _Mapping]]] = ..., workers: _Optional[_Iterable[_Union[WorkerStatus, _Mapping]]] = ..., in_flight: _Optional[int] = ..., placements: _Optional[_Mapping[str, int]] = ..., dead_letters: _Optional[int] = ..., selection: _Optional[_Union[SelectionStatus, _Mapping]] = ..., adaptation: _Optional[_Union[AdaptationStatus, _Mapping]] = ...) -> None: ...

class AdaptedWorkers(_message.Message):
    __slots__ = ("stage", "variant", "replicas", "cores", "max_batch", "share_rps")
    STAGE_FIELD_NUMBER: _ClassVar[int]
    VARIANT_FIELD_NUMBER: _ClassVar[int]
    REPLICAS_FIELD_NUMBER: _ClassVar[int]
    CORES_FIELD_NUMBER: _ClassVar[int]
    MAX_BATCH_FIELD_NUMBER: _ClassVar[int]
    SHARE_RPS_FIELD_NUMBER: _ClassVar[int]
    stage: str
    variant: str
    replicas: int
    cores: int
    max_batch: int
    share_rps: float
    def __init__(self, stage: _Optional[str] = ..., variant: _Optional[str] = ..., replicas: _Optional[int] = ..., cores: _Optional[int] = ..., max_batch: _Optional[int] = ..., share_rps: _Optional[float] = ...) -> None: ...

class AdaptationStatus(_message.Message):
    __slots__ = ("solves", "changes", "forecast_rps", "last_reason", "workers", "expected_accuracy", "cost_cores", "latency_ms", "core_seconds", "errors", "last_actions")
    SOLVES_FIELD_NUMBER: _ClassVar[int]
    CHANGES_FIELD_NUMBER: _ClassVar[int]
    FORECAST_RPS_FIELD_NUMBER: _ClassVar[int]
    LAST_REASON_FIELD_NUMBER: _ClassVar[int]
    WORKERS_FIELD_NUMBER: _ClassVar[int]
    EXPECTED_ACCURACY_FIELD_NUMBER: _ClassVar[int]
    COST_CORES_FIELD_NUMBER: _ClassVar[int]
    LATENCY_MS_FIELD_NUMBER: _ClassVar[int]
    CORE_SECONDS_FIELD_NUMBER: _ClassVar[int]
    ERRORS_FIELD_NUMBER: _ClassVar[int]
    LAST_ACTIONS_FIELD_NUMBER: _ClassVar[int]
    solves: int
    changes: int
    forecast_rps: float
    last_reason: str
    workers: _containers.RepeatedCompositeFieldContainer[AdaptedWorkers]
    expected_accuracy: float
    cost_cores: int
    latency_ms: float
    core_seconds: float
    errors: int
    last_actions: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, solves: _Optional[int] = ..., changes: _Optional[int] = ..., forecast_rps: _Optional[float] = ..., last_reason: _Optional[str] = ..., workers: _Optional[_Iterable[_Union[AdaptedWorkers, _Mapping]]] = ..., expected_accuracy: _Optional[float] = ..., cost_cores: _Optional[int] = ..., latency_ms: _Optional[float] = ..., core_seconds: _Optional[float] = ..., errors: _Optional[int] = ..., last_actions: _Optional[_Iterable[str]] = ...) -> None: ...

class SelectionStatus(_message.Message):
    __slots__ = ("decisions", "decision_p50_ms", "decision_p99_ms", "decision_max_ms", "fitted", "refused", "reassigned", "lost_races", "load_price", "offered_load", "slowdown")
    DECISIONS_FIELD_NUMBER: _ClassVar[int]
    DECISION_P50_MS_FIELD_NUMBER: _ClassVar[int]
    DECISION_P99_MS_FIELD_NUMBER: _ClassVar[int]
    DECISION_MAX_MS_FIELD_NUMBER: _ClassVar[int]
    FITTED_FIELD_NUMBER: _ClassVar[int]
    REFUSED_FIELD_NUMBER: _ClassVar[int]
    REASSIGNED_FIELD_NUMBER: _ClassVar[int]
    LOST_RACES_FIELD_NUMBER: _ClassVar[int]
    LOAD_PRICE_FIELD_NUMBER: _ClassVar[int]
    OFFERED_LOAD_FIELD_NUMBER: _ClassVar[int]
    SLOWDOWN_FIELD_NUMBER: _ClassVar[int]
    decisions: int
    decision_p50_ms: float
    decision_p99_ms: float
    decision_max_ms: float
    fitted: int
    refused: int
    reassigned: int
    lost_races: int
    load_price: float
    offered_load: float
    slowdown: float
    def __init__(self, decisions: _Optional[int] = ..., decision_p50_ms: _Optional[float] = ..., decision_p99_ms: _Optional[float] = ..., decision_max_ms: _Optional[float] = ..., fitted: _Optional[int] = ..., refused: _Optional[int] = ..., reassigned: _Optional[int] = ..., lost_races: _Optional[int] = ..., load_price: _Optional[float] = ..., offered_load: _Optional[float] = ..., slowdown: _Optional[float] = ...) -> None: ...

class ListRequestsRequest(_message.Message):
    __slots__ = ("limit",)
    LIMIT_FIELD_NUMBER: _ClassVar[int]
    limit: int
    def __init__(self, limit: _Optional[int] = ...) -> None: ...

class InFlightRequest(_message.Message):
    __slots__ = ("request_id", "stage", "placement", "instances", "age_ms", "attempt", "generated_tokens")
    class InstancesEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: str
        def __init__(self, key: _Optional[str] = ..., value: _Optional[str] = ...) -> None: ...
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    STAGE_FIELD_NUMBER: _ClassVar[int]
    PLACEMENT_FIELD_NUMBER: _ClassVar[int]
    INSTANCES_FIELD_NUMBER: _ClassVar[int]
    AGE_MS_FIELD_NUMBER: _ClassVar[int]
    ATTEMPT_FIELD_NUMBER: _ClassVar[int]
    GENERATED_TOKENS_FIELD_NUMBER: _ClassVar[int]
    request_id: str
    stage: str
    placement: str
    instances: _containers.ScalarMap[str, str]
    age_ms: float
    attempt: int
    generated_tokens: int
    def __init__(self, request_id: _Optional[str] = ..., stage: _Optional[str] = ..., placement: _Optional[str] = ..., instances: _Optional[_Mapping[str, str]] = ..., age_ms: _Optional[float] = ..., attempt: _Optional[int] = ..., generated_tokens: _Optional[int] = ...) -> None: ...

class ListRequestsResponse(_message.Message):
    __slots__ = ("requests",)
    REQUESTS_FIELD_NUMBER: _ClassVar[int]
    requests: _containers.RepeatedCompositeFieldContainer[InFlightRequest]
    def __init__(self, requests: _Optional[_Iterable[_Union[InFlightRequest, _Mapping]]] = ...) -> None: ...

class DrainWorkerRequest(_message.Message):
    __slots__ = ("name",)
    NAME_FIELD_NUMBER: _ClassVar[int]
    name: str
    def __init__(self, name: _Optional[str] = ...) -> None: ...

class DrainWorkerResponse(_message.Message):
    __slots__ = ("moved_tasks",)
    MOVED_TASKS_FIELD_NUMBER: _ClassVar[int]
    moved_tasks: int
    def __init__(self, moved_tasks: _Optional[int] = ...) -> None: ...
