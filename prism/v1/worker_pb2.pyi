from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class ComputeShare(_message.Message):
    __slots__ = ("threads", "cpus", "max_batch")
    THREADS_FIELD_NUMBER: _ClassVar[int]
    CPUS_FIELD_NUMBER: _ClassVar[int]
    MAX_BATCH_FIELD_NUMBER: _ClassVar[int]
    threads: int
    cpus: _containers.RepeatedScalarFieldContainer[int]
    max_batch: int
    def __init__(self, threads: _Optional[int] = ..., cpus: _Optional[_Iterable[int]] = ..., max_batch: _Optional[int] = ...) -> None: ...

class SetComputeRequest(_message.Message):
    __slots__ = ("share",)
    SHARE_FIELD_NUMBER: _ClassVar[int]
    share: ComputeShare
    def __init__(self, share: _Optional[_Union[ComputeShare, _Mapping]] = ...) -> None: ...

class SetComputeResponse(_message.Message):
    __slots__ = ("applied", "generation")
    APPLIED_FIELD_NUMBER: _ClassVar[int]
    GENERATION_FIELD_NUMBER: _ClassVar[int]
    applied: ComputeShare
    generation: int
    def __init__(self, applied: _Optional[_Union[ComputeShare, _Mapping]] = ..., generation: _Optional[int] = ...) -> None: ...

class GetComputeRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class GetComputeResponse(_message.Message):
    __slots__ = ("share", "generation", "allowed_cpus")
    SHARE_FIELD_NUMBER: _ClassVar[int]
    GENERATION_FIELD_NUMBER: _ClassVar[int]
    ALLOWED_CPUS_FIELD_NUMBER: _ClassVar[int]
    share: ComputeShare
    generation: int
    allowed_cpus: _containers.RepeatedScalarFieldContainer[int]
    def __init__(self, share: _Optional[_Union[ComputeShare, _Mapping]] = ..., generation: _Optional[int] = ..., allowed_cpus: _Optional[_Iterable[int]] = ...) -> None: ...
