from specmesh.v1 import common_pb2 as _common_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class DraftRequest(_message.Message):
    __slots__ = ("sequence", "sync", "release", "sync_batch")
    SEQUENCE_FIELD_NUMBER: _ClassVar[int]
    SYNC_FIELD_NUMBER: _ClassVar[int]
    RELEASE_FIELD_NUMBER: _ClassVar[int]
    SYNC_BATCH_FIELD_NUMBER: _ClassVar[int]
    sequence: int
    sync: DraftSync
    release: DraftRelease
    sync_batch: DraftSyncBatch
    def __init__(self, sequence: _Optional[int] = ..., sync: _Optional[_Union[DraftSync, _Mapping]] = ..., release: _Optional[_Union[DraftRelease, _Mapping]] = ..., sync_batch: _Optional[_Union[DraftSyncBatch, _Mapping]] = ...) -> None: ...

class DraftSyncBatch(_message.Message):
    __slots__ = ("syncs",)
    SYNCS_FIELD_NUMBER: _ClassVar[int]
    syncs: _containers.RepeatedCompositeFieldContainer[DraftSync]
    def __init__(self, syncs: _Optional[_Iterable[_Union[DraftSync, _Mapping]]] = ...) -> None: ...

class DraftSync(_message.Message):
    __slots__ = ("session_id", "num_cached_tokens", "new_tokens", "num_tokens", "sampling", "num_generated_tokens", "trace_context")
    class TraceContextEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: str
        def __init__(self, key: _Optional[str] = ..., value: _Optional[str] = ...) -> None: ...
    SESSION_ID_FIELD_NUMBER: _ClassVar[int]
    NUM_CACHED_TOKENS_FIELD_NUMBER: _ClassVar[int]
    NEW_TOKENS_FIELD_NUMBER: _ClassVar[int]
    NUM_TOKENS_FIELD_NUMBER: _ClassVar[int]
    SAMPLING_FIELD_NUMBER: _ClassVar[int]
    NUM_GENERATED_TOKENS_FIELD_NUMBER: _ClassVar[int]
    TRACE_CONTEXT_FIELD_NUMBER: _ClassVar[int]
    session_id: str
    num_cached_tokens: int
    new_tokens: _containers.RepeatedScalarFieldContainer[int]
    num_tokens: int
    sampling: _common_pb2.SamplingParams
    num_generated_tokens: int
    trace_context: _containers.ScalarMap[str, str]
    def __init__(self, session_id: _Optional[str] = ..., num_cached_tokens: _Optional[int] = ..., new_tokens: _Optional[_Iterable[int]] = ..., num_tokens: _Optional[int] = ..., sampling: _Optional[_Union[_common_pb2.SamplingParams, _Mapping]] = ..., num_generated_tokens: _Optional[int] = ..., trace_context: _Optional[_Mapping[str, str]] = ...) -> None: ...

class DraftRelease(_message.Message):
    __slots__ = ("session_id",)
    SESSION_ID_FIELD_NUMBER: _ClassVar[int]
    session_id: str
    def __init__(self, session_id: _Optional[str] = ...) -> None: ...

class DraftChunk(_message.Message):
    __slots__ = ("session_id", "sequence", "status", "base_length", "tokens", "confidences", "distributions", "last", "cache_miss", "error_message", "batch")
    SESSION_ID_FIELD_NUMBER: _ClassVar[int]
    SEQUENCE_FIELD_NUMBER: _ClassVar[int]
    STATUS_FIELD_NUMBER: _ClassVar[int]
    BASE_LENGTH_FIELD_NUMBER: _ClassVar[int]
    TOKENS_FIELD_NUMBER: _ClassVar[int]
    CONFIDENCES_FIELD_NUMBER: _ClassVar[int]
    DISTRIBUTIONS_FIELD_NUMBER: _ClassVar[int]
    LAST_FIELD_NUMBER: _ClassVar[int]
    CACHE_MISS_FIELD_NUMBER: _ClassVar[int]
    ERROR_MESSAGE_FIELD_NUMBER: _ClassVar[int]
    BATCH_FIELD_NUMBER: _ClassVar[int]
    session_id: str
    sequence: int
    status: _common_pb2.SessionStatus
    base_length: int
    tokens: _containers.RepeatedScalarFieldContainer[int]
    confidences: _containers.RepeatedScalarFieldContainer[float]
    distributions: _containers.RepeatedCompositeFieldContainer[_common_pb2.SparseDistribution]
    last: bool
    cache_miss: _common_pb2.CacheMiss
    error_message: str
    batch: _containers.RepeatedCompositeFieldContainer[DraftChunk]
    def __init__(self, session_id: _Optional[str] = ..., sequence: _Optional[int] = ..., status: _Optional[_Union[_common_pb2.SessionStatus, str]] = ..., base_length: _Optional[int] = ..., tokens: _Optional[_Iterable[int]] = ..., confidences: _Optional[_Iterable[float]] = ..., distributions: _Optional[_Iterable[_Union[_common_pb2.SparseDistribution, _Mapping]]] = ..., last: _Optional[bool] = ..., cache_miss: _Optional[_Union[_common_pb2.CacheMiss, _Mapping]] = ..., error_message: _Optional[str] = ..., batch: _Optional[_Iterable[_Union[DraftChunk, _Mapping]]] = ...) -> None: ...
