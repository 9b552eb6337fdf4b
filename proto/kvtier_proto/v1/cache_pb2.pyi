from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class PutOutcome(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    PUT_OUTCOME_UNSPECIFIED: _ClassVar[PutOutcome]
    PUT_OUTCOME_STORED: _ClassVar[PutOutcome]
    PUT_OUTCOME_EXISTS: _ClassVar[PutOutcome]
PUT_OUTCOME_UNSPECIFIED: PutOutcome
PUT_OUTCOME_STORED: PutOutcome
PUT_OUTCOME_EXISTS: PutOutcome

class PageHeader(_message.Message):
    __slots__ = ("key", "dtype", "shape", "start_position", "k_len", "v_len", "chain_position", "shm_offset", "v_dtype", "v_shape", "expected_reuse_s")
    KEY_FIELD_NUMBER: _ClassVar[int]
    DTYPE_FIELD_NUMBER: _ClassVar[int]
    SHAPE_FIELD_NUMBER: _ClassVar[int]
    START_POSITION_FIELD_NUMBER: _ClassVar[int]
    K_LEN_FIELD_NUMBER: _ClassVar[int]
    V_LEN_FIELD_NUMBER: _ClassVar[int]
    CHAIN_POSITION_FIELD_NUMBER: _ClassVar[int]
    SHM_OFFSET_FIELD_NUMBER: _ClassVar[int]
    V_DTYPE_FIELD_NUMBER: _ClassVar[int]
    V_SHAPE_FIELD_NUMBER: _ClassVar[int]
    EXPECTED_REUSE_S_FIELD_NUMBER: _ClassVar[int]
    key: bytes
    dtype: str
    shape: _containers.RepeatedScalarFieldContainer[int]
    start_position: int
    k_len: int
    v_len: int
    chain_position: int
    shm_offset: int
    v_dtype: str
    v_shape: _containers.RepeatedScalarFieldContainer[int]
    expected_reuse_s: float
    def __init__(self, key: _Optional[bytes] = ..., dtype: _Optional[str] = ..., shape: _Optional[_Iterable[int]] = ..., start_position: _Optional[int] = ..., k_len: _Optional[int] = ..., v_len: _Optional[int] = ..., chain_position: _Optional[int] = ..., shm_offset: _Optional[int] = ..., v_dtype: _Optional[str] = ..., v_shape: _Optional[_Iterable[int]] = ..., expected_reuse_s: _Optional[float] = ...) -> None: ...

class PutRequest(_message.Message):
    __slots__ = ("namespace", "pages", "data", "shm_session", "shm_fill", "shm_ring_offset", "shm_ring_slots", "shm_reclaim", "session")
    NAMESPACE_FIELD_NUMBER: _ClassVar[int]
    PAGES_FIELD_NUMBER: _ClassVar[int]
    DATA_FIELD_NUMBER: _ClassVar[int]
    SHM_SESSION_FIELD_NUMBER: _ClassVar[int]
    SHM_FILL_FIELD_NUMBER: _ClassVar[int]
    SHM_RING_OFFSET_FIELD_NUMBER: _ClassVar[int]
    SHM_RING_SLOTS_FIELD_NUMBER: _ClassVar[int]
    SHM_RECLAIM_FIELD_NUMBER: _ClassVar[int]
    SESSION_FIELD_NUMBER: _ClassVar[int]
    namespace: str
    pages: _containers.RepeatedCompositeFieldContainer[PageHeader]
    data: bytes
    shm_session: str
    shm_fill: int
    shm_ring_offset: int
    shm_ring_slots: int
    shm_reclaim: bool
    session: str
    def __init__(self, namespace: _Optional[str] = ..., pages: _Optional[_Iterable[_Union[PageHeader, _Mapping]]] = ..., data: _Optional[bytes] = ..., shm_session: _Optional[str] = ..., shm_fill: _Optional[int] = ..., shm_ring_offset: _Optional[int] = ..., shm_ring_slots: _Optional[int] = ..., shm_reclaim: _Optional[bool] = ..., session: _Optional[str] = ...) -> None: ...

class PutReply(_message.Message):
    __slots__ = ("outcomes",)
    OUTCOMES_FIELD_NUMBER: _ClassVar[int]
    outcomes: _containers.RepeatedScalarFieldContainer[PutOutcome]
    def __init__(self, outcomes: _Optional[_Iterable[_Union[PutOutcome, str]]] = ...) -> None: ...

class GetRequest(_message.Message):
    __slots__ = ("namespace", "keys", "chunk_bytes", "shm_session", "shm_offset", "shm_capacity")
    NAMESPACE_FIELD_NUMBER: _ClassVar[int]
    KEYS_FIELD_NUMBER: _ClassVar[int]
    CHUNK_BYTES_FIELD_NUMBER: _ClassVar[int]
    SHM_SESSION_FIELD_NUMBER: _ClassVar[int]
    SHM_OFFSET_FIELD_NUMBER: _ClassVar[int]
    SHM_CAPACITY_FIELD_NUMBER: _ClassVar[int]
    namespace: str
    keys: _containers.RepeatedScalarFieldContainer[bytes]
    chunk_bytes: int
    shm_session: str
    shm_offset: int
    shm_capacity: int
    def __init__(self, namespace: _Optional[str] = ..., keys: _Optional[_Iterable[bytes]] = ..., chunk_bytes: _Optional[int] = ..., shm_session: _Optional[str] = ..., shm_offset: _Optional[int] = ..., shm_capacity: _Optional[int] = ...) -> None: ...

class PageResult(_message.Message):
    __slots__ = ("index", "found", "dtype", "shape", "start_position", "tier", "precision", "k_len", "v_len", "shm_offset", "deferred")
    INDEX_FIELD_NUMBER: _ClassVar[int]
    FOUND_FIELD_NUMBER: _ClassVar[int]
    DTYPE_FIELD_NUMBER: _ClassVar[int]
    SHAPE_FIELD_NUMBER: _ClassVar[int]
    START_POSITION_FIELD_NUMBER: _ClassVar[int]
    TIER_FIELD_NUMBER: _ClassVar[int]
    PRECISION_FIELD_NUMBER: _ClassVar[int]
    K_LEN_FIELD_NUMBER: _ClassVar[int]
    V_LEN_FIELD_NUMBER: _ClassVar[int]
    SHM_OFFSET_FIELD_NUMBER: _ClassVar[int]
    DEFERRED_FIELD_NUMBER: _ClassVar[int]
    index: int
    found: bool
    dtype: str
    shape: _containers.RepeatedScalarFieldContainer[int]
    start_position: int
    tier: str
    precision: int
    k_len: int
    v_len: int
    shm_offset: int
    deferred: bool
    def __init__(self, index: _Optional[int] = ..., found: _Optional[bool] = ..., dtype: _Optional[str] = ..., shape: _Optional[_Iterable[int]] = ..., start_position: _Optional[int] = ..., tier: _Optional[str] = ..., precision: _Optional[int] = ..., k_len: _Optional[int] = ..., v_len: _Optional[int] = ..., shm_offset: _Optional[int] = ..., deferred: _Optional[bool] = ...) -> None: ...

class GetReply(_message.Message):
    __slots__ = ("pages", "data")
    PAGES_FIELD_NUMBER: _ClassVar[int]
    DATA_FIELD_NUMBER: _ClassVar[int]
    pages: _containers.RepeatedCompositeFieldContainer[PageResult]
    data: bytes
    def __init__(self, pages: _Optional[_Iterable[_Union[PageResult, _Mapping]]] = ..., data: _Optional[bytes] = ...) -> None: ...

class LookupRequest(_message.Message):
    __slots__ = ("namespace", "keys", "session", "prefetch")
    NAMESPACE_FIELD_NUMBER: _ClassVar[int]
    KEYS_FIELD_NUMBER: _ClassVar[int]
    SESSION_FIELD_NUMBER: _ClassVar[int]
    PREFETCH_FIELD_NUMBER: _ClassVar[int]
    namespace: str
    keys: _containers.RepeatedScalarFieldContainer[bytes]
    session: str
    prefetch: bool
    def __init__(self, namespace: _Optional[str] = ..., keys: _Optional[_Iterable[bytes]] = ..., session: _Optional[str] = ..., prefetch: _Optional[bool] = ...) -> None: ...

class LookupReply(_message.Message):
    __slots__ = ("prefix_length", "tiers")
    PREFIX_LENGTH_FIELD_NUMBER: _ClassVar[int]
    TIERS_FIELD_NUMBER: _ClassVar[int]
    prefix_length: int
    tiers: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, prefix_length: _Optional[int] = ..., tiers: _Optional[_Iterable[str]] = ...) -> None: ...

class PromoteRequest(_message.Message):
    __slots__ = ("namespace", "keys", "tier")
    NAMESPACE_FIELD_NUMBER: _ClassVar[int]
    KEYS_FIELD_NUMBER: _ClassVar[int]
    TIER_FIELD_NUMBER: _ClassVar[int]
    namespace: str
    keys: _containers.RepeatedScalarFieldContainer[bytes]
    tier: str
    def __init__(self, namespace: _Optional[str] = ..., keys: _Optional[_Iterable[bytes]] = ..., tier: _Optional[str] = ...) -> None: ...

class PromoteReply(_message.Message):
    __slots__ = ("promoted",)
    PROMOTED_FIELD_NUMBER: _ClassVar[int]
    promoted: _containers.RepeatedScalarFieldContainer[bool]
    def __init__(self, promoted: _Optional[_Iterable[bool]] = ...) -> None: ...

class DeleteRequest(_message.Message):
    __slots__ = ("namespace", "keys")
    NAMESPACE_FIELD_NUMBER: _ClassVar[int]
    KEYS_FIELD_NUMBER: _ClassVar[int]
    namespace: str
    keys: _containers.RepeatedScalarFieldContainer[bytes]
    def __init__(self, namespace: _Optional[str] = ..., keys: _Optional[_Iterable[bytes]] = ...) -> None: ...

class DeleteReply(_message.Message):
    __slots__ = ("deleted",)
    DELETED_FIELD_NUMBER: _ClassVar[int]
    deleted: int
    def __init__(self, deleted: _Optional[int] = ...) -> None: ...

class StatsRequest(_message.Message):
    __slots__ = ("namespace",)
    NAMESPACE_FIELD_NUMBER: _ClassVar[int]
    namespace: str
    def __init__(self, namespace: _Optional[str] = ...) -> None: ...

class TierStats(_message.Message):
    __slots__ = ("name", "medium", "codec", "capacity_bytes", "high_watermark", "low_watermark", "pages", "bytes", "hits", "misses", "demotions", "promotions", "evictions")
    class EvictionsEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: int
        def __init__(self, key: _Optional[str] = ..., value: _Optional[int] = ...) -> None: ...
    NAME_FIELD_NUMBER: _ClassVar[int]
    MEDIUM_FIELD_NUMBER: _ClassVar[int]
    CODEC_FIELD_NUMBER: _ClassVar[int]
    CAPACITY_BYTES_FIELD_NUMBER: _ClassVar[int]
    HIGH_WATERMARK_FIELD_NUMBER: _ClassVar[int]
    LOW_WATERMARK_FIELD_NUMBER: _ClassVar[int]
    PAGES_FIELD_NUMBER: _ClassVar[int]
    BYTES_FIELD_NUMBER: _ClassVar[int]
    HITS_FIELD_NUMBER: _ClassVar[int]
    MISSES_FIELD_NUMBER: _ClassVar[int]
    DEMOTIONS_FIELD_NUMBER: _ClassVar[int]
    PROMOTIONS_FIELD_NUMBER: _ClassVar[int]
    EVICTIONS_FIELD_NUMBER: _ClassVar[int]
    name: str
    medium: str
    codec: str
    capacity_bytes: int
    high_watermark: float
    low_watermark: float
    pages: int
    bytes: int
    hits: int
    misses: int
    demotions: int
    promotions: int
    evictions: _containers.ScalarMap[str, int]
    def __init__(self, name: _Optional[str] = ..., medium: _Optional[str] = ..., codec: _Optional[str] = ..., capacity_bytes: _Optional[int] = ..., high_watermark: _Optional[float] = ..., low_watermark: _Optional[float] = ..., pages: _Optional[int] = ..., bytes: _Optional[int] = ..., hits: _Optional[int] = ..., misses: _Optional[int] = ..., demotions: _Optional[int] = ..., promotions: _Optional[int] = ..., evictions: _Optional[_Mapping[str, int]] = ...) -> None: ...

class StatsReply(_message.Message):
    __slots__ = ("tiers", "redis_up", "gets", "puts", "policy", "uptime_s", "prefetched", "prefetch_hits")
    TIERS_FIELD_NUMBER: _ClassVar[int]
    REDIS_UP_FIELD_NUMBER: _ClassVar[int]
    GETS_FIELD_NUMBER: _ClassVar[int]
    PUTS_FIELD_NUMBER: _ClassVar[int]
    POLICY_FIELD_NUMBER: _ClassVar[int]
    UPTIME_S_FIELD_NUMBER: _ClassVar[int]
    PREFETCHED_FIELD_NUMBER: _ClassVar[int]
    PREFETCH_HITS_FIELD_NUMBER: _ClassVar[int]
    tiers: _containers.RepeatedCompositeFieldContainer[TierStats]
    redis_up: bool
    gets: int
    puts: int
    policy: str
    uptime_s: float
    prefetched: int
    prefetch_hits: int
    def __init__(self, tiers: _Optional[_Iterable[_Union[TierStats, _Mapping]]] = ..., redis_up: _Optional[bool] = ..., gets: _Optional[int] = ..., puts: _Optional[int] = ..., policy: _Optional[str] = ..., uptime_s: _Optional[float] = ..., prefetched: _Optional[int] = ..., prefetch_hits: _Optional[int] = ...) -> None: ...

class AttachShmRequest(_message.Message):
    __slots__ = ("namespace", "path", "size", "token")
    NAMESPACE_FIELD_NUMBER: _ClassVar[int]
    PATH_FIELD_NUMBER: _ClassVar[int]
    SIZE_FIELD_NUMBER: _ClassVar[int]
    TOKEN_FIELD_NUMBER: _ClassVar[int]
    namespace: str
    path: str
    size: int
    token: bytes
    def __init__(self, namespace: _Optional[str] = ..., path: _Optional[str] = ..., size: _Optional[int] = ..., token: _Optional[bytes] = ...) -> None: ...

class AttachShmReply(_message.Message):
    __slots__ = ("session",)
    SESSION_FIELD_NUMBER: _ClassVar[int]
    session: str
    def __init__(self, session: _Optional[str] = ...) -> None: ...

class ShmLeaseRequest(_message.Message):
    __slots__ = ("namespace", "session")
    NAMESPACE_FIELD_NUMBER: _ClassVar[int]
    SESSION_FIELD_NUMBER: _ClassVar[int]
    namespace: str
    session: str
    def __init__(self, namespace: _Optional[str] = ..., session: _Optional[str] = ...) -> None: ...

class ShmLeaseReply(_message.Message):
    __slots__ = ("session", "lease_s")
    SESSION_FIELD_NUMBER: _ClassVar[int]
    LEASE_S_FIELD_NUMBER: _ClassVar[int]
    session: str
    lease_s: float
    def __init__(self, session: _Optional[str] = ..., lease_s: _Optional[float] = ...) -> None: ...

class OpenDataRequest(_message.Message):
    __slots__ = ("namespace", "writable")
    NAMESPACE_FIELD_NUMBER: _ClassVar[int]
    WRITABLE_FIELD_NUMBER: _ClassVar[int]
    namespace: str
    writable: bool
    def __init__(self, namespace: _Optional[str] = ..., writable: _Optional[bool] = ...) -> None: ...

class OpenDataReply(_message.Message):
    __slots__ = ("ticket", "port", "tls", "max_frame_bytes", "ticket_ttl_s", "writable")
    TICKET_FIELD_NUMBER: _ClassVar[int]
    PORT_FIELD_NUMBER: _ClassVar[int]
    TLS_FIELD_NUMBER: _ClassVar[int]
    MAX_FRAME_BYTES_FIELD_NUMBER: _ClassVar[int]
    TICKET_TTL_S_FIELD_NUMBER: _ClassVar[int]
    WRITABLE_FIELD_NUMBER: _ClassVar[int]
    ticket: bytes
    port: int
    tls: bool
    max_frame_bytes: int
    ticket_ttl_s: float
    writable: bool
    def __init__(self, ticket: _Optional[bytes] = ..., port: _Optional[int] = ..., tls: _Optional[bool] = ..., max_frame_bytes: _Optional[int] = ..., ticket_ttl_s: _Optional[float] = ..., writable: _Optional[bool] = ...) -> None: ...

class KeyChain(_message.Message):
    __slots__ = ("keys",)
    KEYS_FIELD_NUMBER: _ClassVar[int]
    keys: _containers.RepeatedScalarFieldContainer[bytes]
    def __init__(self, keys: _Optional[_Iterable[bytes]] = ...) -> None: ...

class HintRequest(_message.Message):
    __slots__ = ("namespace", "queued", "ended_sessions")
    NAMESPACE_FIELD_NUMBER: _ClassVar[int]
    QUEUED_FIELD_NUMBER: _ClassVar[int]
    ENDED_SESSIONS_FIELD_NUMBER: _ClassVar[int]
    namespace: str
    queued: _containers.RepeatedCompositeFieldContainer[KeyChain]
    ended_sessions: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, namespace: _Optional[str] = ..., queued: _Optional[_Iterable[_Union[KeyChain, _Mapping]]] = ..., ended_sessions: _Optional[_Iterable[str]] = ...) -> None: ...

class HintReply(_message.Message):
    __slots__ = ("prefetching",)
    PREFETCHING_FIELD_NUMBER: _ClassVar[int]
    prefetching: int
    def __init__(self, prefetching: _Optional[int] = ...) -> None: ...
