from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class PolicyAccess(_message.Message):
    __slots__ = ("namespace", "key", "seq", "time", "kind", "tier_hit", "nbytes", "chain_position", "attention_mass")
    NAMESPACE_FIELD_NUMBER: _ClassVar[int]
    KEY_FIELD_NUMBER: _ClassVar[int]
    SEQ_FIELD_NUMBER: _ClassVar[int]
    TIME_FIELD_NUMBER: _ClassVar[int]
    KIND_FIELD_NUMBER: _ClassVar[int]
    TIER_HIT_FIELD_NUMBER: _ClassVar[int]
    NBYTES_FIELD_NUMBER: _ClassVar[int]
    CHAIN_POSITION_FIELD_NUMBER: _ClassVar[int]
    ATTENTION_MASS_FIELD_NUMBER: _ClassVar[int]
    namespace: str
    key: bytes
    seq: int
    time: float
    kind: str
    tier_hit: str
    nbytes: int
    chain_position: int
    attention_mass: float
    def __init__(self, namespace: _Optional[str] = ..., key: _Optional[bytes] = ..., seq: _Optional[int] = ..., time: _Optional[float] = ..., kind: _Optional[str] = ..., tier_hit: _Optional[str] = ..., nbytes: _Optional[int] = ..., chain_position: _Optional[int] = ..., attention_mass: _Optional[float] = ...) -> None: ...

class AccessBatch(_message.Message):
    __slots__ = ("accesses", "dropped")
    ACCESSES_FIELD_NUMBER: _ClassVar[int]
    DROPPED_FIELD_NUMBER: _ClassVar[int]
    accesses: _containers.RepeatedCompositeFieldContainer[PolicyAccess]
    dropped: int
    def __init__(self, accesses: _Optional[_Iterable[_Union[PolicyAccess, _Mapping]]] = ..., dropped: _Optional[int] = ...) -> None: ...

class ReportAck(_message.Message):
    __slots__ = ("accepted",)
    ACCEPTED_FIELD_NUMBER: _ClassVar[int]
    accepted: int
    def __init__(self, accepted: _Optional[int] = ...) -> None: ...

class PolicyPage(_message.Message):
    __slots__ = ("namespace", "key", "tier", "tier_index", "nbytes", "created_seq", "last_seq", "last_time", "access_count", "chain_position")
    NAMESPACE_FIELD_NUMBER: _ClassVar[int]
    KEY_FIELD_NUMBER: _ClassVar[int]
    TIER_FIELD_NUMBER: _ClassVar[int]
    TIER_INDEX_FIELD_NUMBER: _ClassVar[int]
    NBYTES_FIELD_NUMBER: _ClassVar[int]
    CREATED_SEQ_FIELD_NUMBER: _ClassVar[int]
    LAST_SEQ_FIELD_NUMBER: _ClassVar[int]
    LAST_TIME_FIELD_NUMBER: _ClassVar[int]
    ACCESS_COUNT_FIELD_NUMBER: _ClassVar[int]
    CHAIN_POSITION_FIELD_NUMBER: _ClassVar[int]
    namespace: str
    key: bytes
    tier: str
    tier_index: int
    nbytes: int
    created_seq: int
    last_seq: int
    last_time: float
    access_count: int
    chain_position: int
    def __init__(self, namespace: _Optional[str] = ..., key: _Optional[bytes] = ..., tier: _Optional[str] = ..., tier_index: _Optional[int] = ..., nbytes: _Optional[int] = ..., created_seq: _Optional[int] = ..., last_seq: _Optional[int] = ..., last_time: _Optional[float] = ..., access_count: _Optional[int] = ..., chain_position: _Optional[int] = ...) -> None: ...

class ScoreRequest(_message.Message):
    __slots__ = ("pages", "tier")
    PAGES_FIELD_NUMBER: _ClassVar[int]
    TIER_FIELD_NUMBER: _ClassVar[int]
    pages: _containers.RepeatedCompositeFieldContainer[PolicyPage]
    tier: str
    def __init__(self, pages: _Optional[_Iterable[_Union[PolicyPage, _Mapping]]] = ..., tier: _Optional[str] = ...) -> None: ...

class ScoreReply(_message.Message):
    __slots__ = ("scores", "admit")
    SCORES_FIELD_NUMBER: _ClassVar[int]
    ADMIT_FIELD_NUMBER: _ClassVar[int]
    scores: _containers.RepeatedScalarFieldContainer[float]
    admit: _containers.RepeatedScalarFieldContainer[bool]
    def __init__(self, scores: _Optional[_Iterable[float]] = ..., admit: _Optional[_Iterable[bool]] = ...) -> None: ...

class PolicyStatusRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class PolicyStatusReply(_message.Message):
    __slots__ = ("name", "active", "fallback_active", "detail", "events", "events_dropped", "labelled", "loss", "accuracy")
    NAME_FIELD_NUMBER: _ClassVar[int]
    ACTIVE_FIELD_NUMBER: _ClassVar[int]
    FALLBACK_ACTIVE_FIELD_NUMBER: _ClassVar[int]
    DETAIL_FIELD_NUMBER: _ClassVar[int]
    EVENTS_FIELD_NUMBER: _ClassVar[int]
    EVENTS_DROPPED_FIELD_NUMBER: _ClassVar[int]
    LABELLED_FIELD_NUMBER: _ClassVar[int]
    LOSS_FIELD_NUMBER: _ClassVar[int]
    ACCURACY_FIELD_NUMBER: _ClassVar[int]
    name: str
    active: str
    fallback_active: bool
    detail: str
    events: int
    events_dropped: int
    labelled: int
    loss: float
    accuracy: float
    def __init__(self, name: _Optional[str] = ..., active: _Optional[str] = ..., fallback_active: _Optional[bool] = ..., detail: _Optional[str] = ..., events: _Optional[int] = ..., events_dropped: _Optional[int] = ..., labelled: _Optional[int] = ..., loss: _Optional[float] = ..., accuracy: _Optional[float] = ...) -> None: ...
