from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class CudaIpcHandle(_message.Message):
    __slots__ = ("device", "handle", "size_bytes", "offset_bytes", "ref_counter_handle", "ref_counter_offset", "event_handle", "event_sync_required")
    DEVICE_FIELD_NUMBER: _ClassVar[int]
    HANDLE_FIELD_NUMBER: _ClassVar[int]
    SIZE_BYTES_FIELD_NUMBER: _ClassVar[int]
    OFFSET_BYTES_FIELD_NUMBER: _ClassVar[int]
    REF_COUNTER_HANDLE_FIELD_NUMBER: _ClassVar[int]
    REF_COUNTER_OFFSET_FIELD_NUMBER: _ClassVar[int]
    EVENT_HANDLE_FIELD_NUMBER: _ClassVar[int]
    EVENT_SYNC_REQUIRED_FIELD_NUMBER: _ClassVar[int]
    device: int
    handle: bytes
    size_bytes: int
    offset_bytes: int
    ref_counter_handle: bytes
    ref_counter_offset: int
    event_handle: bytes
    event_sync_required: bool
    def __init__(self, device: _Optional[int] = ..., handle: _Optional[bytes] = ..., size_bytes: _Optional[int] = ..., offset_bytes: _Optional[int] = ..., ref_counter_handle: _Optional[bytes] = ..., ref_counter_offset: _Optional[int] = ..., event_handle: _Optional[bytes] = ..., event_sync_required: _Optional[bool] = ...) -> None: ...

class AttachDeviceRequest(_message.Message):
    __slots__ = ("namespace",)
    NAMESPACE_FIELD_NUMBER: _ClassVar[int]
    namespace: str
    def __init__(self, namespace: _Optional[str] = ...) -> None: ...

class AttachDeviceReply(_message.Message):
    __slots__ = ("session", "pool", "device_uuid", "lease_ttl_s", "max_lease_bytes")
    SESSION_FIELD_NUMBER: _ClassVar[int]
    POOL_FIELD_NUMBER: _ClassVar[int]
    DEVICE_UUID_FIELD_NUMBER: _ClassVar[int]
    LEASE_TTL_S_FIELD_NUMBER: _ClassVar[int]
    MAX_LEASE_BYTES_FIELD_NUMBER: _ClassVar[int]
    session: str
    pool: CudaIpcHandle
    device_uuid: str
    lease_ttl_s: float
    max_lease_bytes: int
    def __init__(self, session: _Optional[str] = ..., pool: _Optional[_Union[CudaIpcHandle, _Mapping]] = ..., device_uuid: _Optional[str] = ..., lease_ttl_s: _Optional[float] = ..., max_lease_bytes: _Optional[int] = ...) -> None: ...

class DeviceLease(_message.Message):
    __slots__ = ("lease", "k_offset", "v_offset", "dtype", "shape", "start_position")
    LEASE_FIELD_NUMBER: _ClassVar[int]
    K_OFFSET_FIELD_NUMBER: _ClassVar[int]
    V_OFFSET_FIELD_NUMBER: _ClassVar[int]
    DTYPE_FIELD_NUMBER: _ClassVar[int]
    SHAPE_FIELD_NUMBER: _ClassVar[int]
    START_POSITION_FIELD_NUMBER: _ClassVar[int]
    lease: int
    k_offset: int
    v_offset: int
    dtype: str
    shape: _containers.RepeatedScalarFieldContainer[int]
    start_position: int
    def __init__(self, lease: _Optional[int] = ..., k_offset: _Optional[int] = ..., v_offset: _Optional[int] = ..., dtype: _Optional[str] = ..., shape: _Optional[_Iterable[int]] = ..., start_position: _Optional[int] = ...) -> None: ...

class GetDeviceRequest(_message.Message):
    __slots__ = ("namespace", "session", "keys", "release")
    NAMESPACE_FIELD_NUMBER: _ClassVar[int]
    SESSION_FIELD_NUMBER: _ClassVar[int]
    KEYS_FIELD_NUMBER: _ClassVar[int]
    RELEASE_FIELD_NUMBER: _ClassVar[int]
    namespace: str
    session: str
    keys: _containers.RepeatedScalarFieldContainer[bytes]
    release: _containers.RepeatedScalarFieldContainer[int]
    def __init__(self, namespace: _Optional[str] = ..., session: _Optional[str] = ..., keys: _Optional[_Iterable[bytes]] = ..., release: _Optional[_Iterable[int]] = ...) -> None: ...

class DevicePageResult(_message.Message):
    __slots__ = ("found", "lease", "tier", "precision")
    FOUND_FIELD_NUMBER: _ClassVar[int]
    LEASE_FIELD_NUMBER: _ClassVar[int]
    TIER_FIELD_NUMBER: _ClassVar[int]
    PRECISION_FIELD_NUMBER: _ClassVar[int]
    found: bool
    lease: DeviceLease
    tier: str
    precision: int
    def __init__(self, found: _Optional[bool] = ..., lease: _Optional[_Union[DeviceLease, _Mapping]] = ..., tier: _Optional[str] = ..., precision: _Optional[int] = ...) -> None: ...

class GetDeviceReply(_message.Message):
    __slots__ = ("pages",)
    PAGES_FIELD_NUMBER: _ClassVar[int]
    pages: _containers.RepeatedCompositeFieldContainer[DevicePageResult]
    def __init__(self, pages: _Optional[_Iterable[_Union[DevicePageResult, _Mapping]]] = ...) -> None: ...

class DevicePageSpec(_message.Message):
    __slots__ = ("dtype", "shape", "start_position")
    DTYPE_FIELD_NUMBER: _ClassVar[int]
    SHAPE_FIELD_NUMBER: _ClassVar[int]
    START_POSITION_FIELD_NUMBER: _ClassVar[int]
    dtype: str
    shape: _containers.RepeatedScalarFieldContainer[int]
    start_position: int
    def __init__(self, dtype: _Optional[str] = ..., shape: _Optional[_Iterable[int]] = ..., start_position: _Optional[int] = ...) -> None: ...

class ReserveDeviceRequest(_message.Message):
    __slots__ = ("namespace", "session", "pages", "release")
    NAMESPACE_FIELD_NUMBER: _ClassVar[int]
    SESSION_FIELD_NUMBER: _ClassVar[int]
    PAGES_FIELD_NUMBER: _ClassVar[int]
    RELEASE_FIELD_NUMBER: _ClassVar[int]
    namespace: str
    session: str
    pages: _containers.RepeatedCompositeFieldContainer[DevicePageSpec]
    release: _containers.RepeatedScalarFieldContainer[int]
    def __init__(self, namespace: _Optional[str] = ..., session: _Optional[str] = ..., pages: _Optional[_Iterable[_Union[DevicePageSpec, _Mapping]]] = ..., release: _Optional[_Iterable[int]] = ...) -> None: ...

class ReserveDeviceReply(_message.Message):
    __slots__ = ("leases",)
    LEASES_FIELD_NUMBER: _ClassVar[int]
    leases: _containers.RepeatedCompositeFieldContainer[DeviceLease]
    def __init__(self, leases: _Optional[_Iterable[_Union[DeviceLease, _Mapping]]] = ...) -> None: ...

class CommitDeviceRequest(_message.Message):
    __slots__ = ("namespace", "session", "keys", "leases", "chain_positions")
    NAMESPACE_FIELD_NUMBER: _ClassVar[int]
    SESSION_FIELD_NUMBER: _ClassVar[int]
    KEYS_FIELD_NUMBER: _ClassVar[int]
    LEASES_FIELD_NUMBER: _ClassVar[int]
    CHAIN_POSITIONS_FIELD_NUMBER: _ClassVar[int]
    namespace: str
    session: str
    keys: _containers.RepeatedScalarFieldContainer[bytes]
    leases: _containers.RepeatedScalarFieldContainer[int]
    chain_positions: _containers.RepeatedScalarFieldContainer[int]
    def __init__(self, namespace: _Optional[str] = ..., session: _Optional[str] = ..., keys: _Optional[_Iterable[bytes]] = ..., leases: _Optional[_Iterable[int]] = ..., chain_positions: _Optional[_Iterable[int]] = ...) -> None: ...

class CommitDeviceReply(_message.Message):
    __slots__ = ("stored",)
    STORED_FIELD_NUMBER: _ClassVar[int]
    stored: _containers.RepeatedScalarFieldContainer[bool]
    def __init__(self, stored: _Optional[_Iterable[bool]] = ...) -> None: ...

class ReleaseDeviceRequest(_message.Message):
    __slots__ = ("namespace", "session", "leases")
    NAMESPACE_FIELD_NUMBER: _ClassVar[int]
    SESSION_FIELD_NUMBER: _ClassVar[int]
    LEASES_FIELD_NUMBER: _ClassVar[int]
    namespace: str
    session: str
    leases: _containers.RepeatedScalarFieldContainer[int]
    def __init__(self, namespace: _Optional[str] = ..., session: _Optional[str] = ..., leases: _Optional[_Iterable[int]] = ...) -> None: ...

class ReleaseDeviceReply(_message.Message):
    __slots__ = ("released",)
    RELEASED_FIELD_NUMBER: _ClassVar[int]
    released: int
    def __init__(self, released: _Optional[int] = ...) -> None: ...
