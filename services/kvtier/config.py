"""Settings: one pydantic-settings model, ``KVTIER_`` environment prefix, validated at start.

Built once by the CLI and passed down; nothing reads the environment at import time.
Nested fields use ``__`` in environment variables, e.g. ``KVTIER_REDIS__URL`` or
``KVTIER_CODEC__GROUP_SIZE``. A config file is JSON, loaded with
:func:`load_settings` (file values are overridden by environment variables).
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from pydantic import (
    BaseModel, Field, StrictInt, ValidationError, field_validator, model_validator,
)
from pydantic_settings import BaseSettings, PydanticBaseSettingsSource, SettingsConfigDict

from kvtier.errors import ConfigError
from kvtier.types import Codec, Medium

log = logging.getLogger(__name__)

MiB = 1 << 20
GiB = 1 << 30


class TierConfig(BaseModel):
    """One tier of the stack. Order in :attr:`Settings.tiers` is top (hottest) to bottom."""

    model_config = {"frozen": True, "extra": "forbid"}

    name: str = Field(pattern=r"^[a-z][a-z0-9_]{0,31}$")
    medium: Medium
    codec: Codec
    capacity_bytes: int = Field(gt=0, le=2**63 - 1)  # the wire (int64) holds no more
    high_watermark: float = Field(default=0.90, gt=0.0, le=1.0)
    low_watermark: float = Field(default=0.75, ge=0.0, lt=1.0)

    @model_validator(mode="after")
    def _watermarks(self) -> TierConfig:
        if self.low_watermark >= self.high_watermark:
            raise ValueError(
                f"tier {self.name!r}: low_watermark ({self.low_watermark}) must be below "
                f"high_watermark ({self.high_watermark})"
            )
        return self


def default_tiers() -> list[TierConfig]:
    return [
        TierConfig(name="hot", medium=Medium.DEVICE, codec=Codec.NONE, capacity_bytes=1 * GiB),
        TierConfig(name="warm", medium=Medium.HOST, codec=Codec.INT8, capacity_bytes=2 * GiB),
        TierConfig(name="cold", medium=Medium.HOST, codec=Codec.INT4A, capacity_bytes=4 * GiB),
        TierConfig(name="remote", medium=Medium.REDIS, codec=Codec.INT4A,
                   capacity_bytes=16 * GiB),
    ]


class CodecConfig(BaseModel):
    """Quantization parameters shared by the int8, int4 and int4a codecs (int4a keeps the int8
    grid: the same groups, sinks and outlier channels)."""

    model_config = {"frozen": True, "extra": "forbid"}

    group_size: int = Field(default=64, ge=2, le=4096)
    sink_tokens: int = Field(default=4, ge=0, le=1024)
    outlier_fraction: float = Field(default=0.01, ge=0.0, le=0.5)
    min_outlier_channels: int = Field(default=1, ge=0)
    key_bits: float = Field(default=4.0, ge=2.0, le=8.0)  # int4a: K bits a channel on average
    # int3: V bits an element on average (1..4 a group, allocated by the groups' scales); its
    # K bits are int4a's less one a channel (kvtier.codecs.int3)
    int3_value_bits: float = Field(default=3.0, ge=1.0, le=4.0)


class RedisConfig(BaseModel):
    model_config = {"frozen": True, "extra": "forbid"}

    url: str | None = None  # None: no Redis tier backend configured (``kvtier up`` spawns one)
    # a Redis Cluster (the url names any node); None: ask the server (INFO cluster) at connect
    cluster: bool | None = None
    prefix: str = Field(default="kvtier", pattern=r"^[A-Za-z0-9_.:-]{1,64}$")
    socket_timeout_s: float = Field(default=0.5, gt=0)
    connect_timeout_s: float = Field(default=0.5, gt=0)
    retry_interval_s: float = Field(default=1.0, gt=0)
    # expire a shared page this long after its last write (None: only Redis' maxmemory evicts)
    ttl_s: float | None = Field(default=None, gt=0)
    # write each new page to the shared tier too, in the background, so other daemons find it
    # before it is demoted there (see kvtier.store.sharing)
    share_puts: bool = False
    # TLS to Redis (a ``rediss://`` url): the CA that signed the server's certificate (None: the
    # system's roots), and a client certificate and key where Redis requires one (tls-auth-clients)
    ssl_ca_file: str | None = None
    ssl_cert_file: str | None = None
    ssl_key_file: str | None = None

    @model_validator(mode="after")
    def _ssl(self) -> RedisConfig:
        if (self.ssl_cert_file is None) != (self.ssl_key_file is None):
            raise ValueError("redis.ssl_cert_file and redis.ssl_key_file go together")
        tls_files = (self.ssl_ca_file, self.ssl_cert_file)
        if any(f is not None for f in tls_files) and self.url is not None \
                and not self.url.startswith("rediss://"):
            raise ValueError("redis.ssl_* files need a rediss:// url (TLS); got "
                             f"{self.url.split('://', 1)[0]}://")
        return self


class PolicyConfig(BaseModel):
    model_config = {"frozen": True, "extra": "forbid"}

    name: str = "lru"  # lru | lfu | arc | s3fifo | learned
    address: str | None = None  # host:port of a policy service; None = embedded
    timeout_s: float = Field(default=0.05, gt=0)
    queue_size: int = Field(default=65536, ge=16)
    # shared secret of the policy service's gRPC port: the service requires it and daemons
    # send it ("authorization: Bearer <token>"); None: no token
    token: str | None = None


class AuthConfig(BaseModel):
    """Tenant tokens on the data plane (see kvtier.transport.auth)."""

    model_config = {"frozen": True, "extra": "forbid"}

    # JSON file of token hashes written by ``kvtier token create``; None: no tenant auth
    # (then gRPC may only listen on loopback unless insecure_allow_unauthenticated)
    tokens_file: str | None = None
    # how often the daemon looks for changes of the file (revocation takes at most this)
    reload_interval_s: float = Field(default=1.0, gt=0, le=3600)
    # serve gRPC beyond loopback with no tokens: anyone who reaches the port has every namespace
    insecure_allow_unauthenticated: bool = False


class DataConfig(BaseModel):
    """The data channel (``kvtier.transport.data``): page bytes of remote workers' puts and
    gets over plain TCP frames beside gRPC, which stays the control plane (``OpenData``)."""

    model_config = {"frozen": True, "extra": "forbid"}

    enabled: bool = True
    host: str | None = None  # None: grpc_host
    port: int = Field(default=0, ge=0, le=65535)  # 0: any free port (announced by OpenData)
    max_frame_bytes: int = Field(default=1 << 30, ge=1 << 20)  # payload of one frame
    idle_timeout_s: float = Field(default=300.0, gt=0)  # between frames of a connection
    max_connections: int = Field(default=256, ge=1)
    ticket_ttl_s: float = Field(default=30.0, gt=0)  # an OpenData ticket is void after this


class LimitsConfig(BaseModel):
    """What one client may hold of the daemon (``KVTIER_LIMITS__*``): no client, stalled or
    hostile, can take the handler threads or sessions that other clients need.

    Streaming calls (``PutStream``, ``GetStream``, the legacy ``AttachShm``) hold a handler
    thread while open, so they are counted server-wide, per connection (gRPC peer) and per
    tenant, and one that waits on its client for ``stream_idle_s`` is cancelled. Calls past
    ``max_concurrent_rpcs`` are refused with RESOURCE_EXHAUSTED instead of queueing.
    Shared-memory sessions are leases (``shm_lease_s``) that hold no thread."""

    model_config = {"frozen": True, "extra": "forbid"}

    handler_threads: int = Field(default=64, ge=2, le=4096)
    max_concurrent_rpcs: int = Field(default=256, ge=1)
    max_streams: int = Field(default=32, ge=1)
    max_streams_per_peer: int = Field(default=8, ge=1)
    max_streams_per_tenant: int = Field(default=16, ge=1)
    stream_idle_s: float = Field(default=10.0, gt=0)
    shm_lease_s: float = Field(default=30.0, gt=0)
    max_shm_sessions: int = Field(default=32, ge=1)
    max_shm_sessions_per_tenant: int = Field(default=8, ge=1)

    @model_validator(mode="after")
    def _leave_threads(self) -> LimitsConfig:
        if self.max_streams >= self.handler_threads:
            raise ValueError(
                f"max_streams ({self.max_streams}) must be below handler_threads "
                f"({self.handler_threads}): open streams hold a thread each, and unary calls "
                f"need the rest")
        return self


class TlsConfig(BaseModel):
    """TLS on the daemon's gRPC and HTTP ports and the policy service's (``KVTIER_TLS__*``).

    ``cert_file`` and ``key_file`` (PEM) turn it on; ``client_ca_file`` then also requires
    client certificates signed by that CA (mTLS). ``ca_file``: the CA the daemon trusts when it
    calls a policy service over TLS (default: ``cert_file``, right for one self-signed pair)."""

    model_config = {"frozen": True, "extra": "forbid"}

    cert_file: str | None = None
    key_file: str | None = None
    client_ca_file: str | None = None
    ca_file: str | None = None

    @property
    def enabled(self) -> bool:
        return self.cert_file is not None

    @model_validator(mode="after")
    def _pair(self) -> TlsConfig:
        if (self.cert_file is None) != (self.key_file is None):
            raise ValueError("tls.cert_file and tls.key_file go together")
        if self.client_ca_file is not None and self.cert_file is None:
            raise ValueError("tls.client_ca_file (mTLS) needs tls.cert_file and tls.key_file")
        return self


class QuotaConfig(BaseModel):
    """One namespace's byte quota: ``bytes`` across the memory tiers (what they hold of it,
    stored form), and optionally ``tiers``, a quota per memory tier by name. None: no limit."""

    model_config = {"frozen": True, "extra": "forbid"}

    bytes: StrictInt | None = Field(default=None, gt=0, le=1 << 62)
    tiers: dict[str, StrictInt] = Field(default_factory=dict)  # no booleans as sizes

    @field_validator("tiers")
    @classmethod
    def _positive(cls, tiers: dict[str, int]) -> dict[str, int]:
        for name, n in tiers.items():
            if isinstance(n, bool) or not 0 < n <= 1 << 62:
                raise ValueError(f"quota of tier {name!r} must be a byte count above 0, got {n}")
        return tiers


class QuotasConfig(BaseModel):
    """Byte quotas per namespace (``KVTIER_QUOTAS``, JSON). Default: none.

    ``namespaces`` maps a namespace to its :class:`QuotaConfig`; ``default`` applies to each
    namespace not listed, separately. A namespace at its quota demotes or evicts its own pages
    to make room, never another namespace's; a page that cannot fit its quota at all is
    RESOURCE_EXHAUSTED. ``top_namespaces``: how many namespaces, the largest, stats and metrics
    name one by one (the rest are summed as ``(other)``), which bounds label cardinality."""

    model_config = {"frozen": True, "extra": "forbid"}

    namespaces: dict[str, QuotaConfig] = Field(default_factory=dict)
    default: QuotaConfig | None = None
    top_namespaces: int = Field(default=10, ge=0, le=1000)

    def of(self, namespace: str) -> QuotaConfig | None:
        return self.namespaces.get(namespace, self.default)

    @property
    def enabled(self) -> bool:
        return bool(self.namespaces) or self.default is not None


class Settings(BaseSettings):
    """All daemon settings. See the README's config table."""

    model_config = SettingsConfigDict(
        env_prefix="KVTIER_", env_nested_delimiter="__", extra="forbid", frozen=True
    )

    grpc_host: str = "127.0.0.1"
    grpc_port: int = Field(default=50051, ge=0, le=65535)
    http_host: str = "127.0.0.1"
    http_port: int = Field(default=8080, ge=0, le=65535)
    policy_grpc_port: int = Field(default=50052, ge=0, le=65535)
    policy_http_port: int = Field(default=8081, ge=0, le=65535)

    tiers: list[TierConfig] = Field(default_factory=default_tiers)
    codec: CodecConfig = Field(default_factory=CodecConfig)
    redis: RedisConfig = Field(default_factory=RedisConfig)
    policy: PolicyConfig = Field(default_factory=PolicyConfig)

    max_page_bytes: int = Field(default=256 * MiB, gt=0)
    host_buffer_pool_bytes: int = Field(default=64 * MiB, ge=0)  # kvtier.store.buffers
    # of the pool, kept faulted in ahead of use while the cache grows; None: min(32 MiB, pool/2)
    host_buffer_reserve_bytes: int | None = Field(default=None, ge=0)
    max_key_bytes: int = Field(default=1024, ge=1, le=65536)
    max_batch: int = Field(default=4096, ge=1)
    mover_interval_s: float = Field(default=0.05, gt=0)
    admin_token: str | None = None
    admin_mutations: bool = True
    device: str = "auto"  # auto | cpu | cuda | cuda:N
    # the device tier's memory, taken once at start (kvtier.store.device_pool); None: the
    # device tier's capacity on CUDA and no pool on a CPU device; 0: no pool
    device_pool_bytes: int | None = Field(default=None, ge=0)
    auth: AuthConfig = Field(default_factory=AuthConfig)
    data: DataConfig = Field(default_factory=DataConfig)
    limits: LimitsConfig = Field(default_factory=LimitsConfig)
    tls: TlsConfig = Field(default_factory=TlsConfig)
    quotas: QuotasConfig = Field(default_factory=QuotasConfig)

    @field_validator("tiers")
    @classmethod
    def _tier_stack(cls, tiers: list[TierConfig]) -> list[TierConfig]:
        if not tiers:
            raise ValueError("at least one tier is required")
        names = [t.name for t in tiers]
        if len(set(names)) != len(names):
            raise ValueError(f"tier names must be unique, got {names}")
        bits = [t.codec.bits for t in tiers]
        if bits != sorted(bits, reverse=True):
            raise ValueError(
                f"tier codecs must not gain precision going down the stack, got "
                f"{[(t.name, t.codec.value) for t in tiers]}"
            )
        redis_tiers = [t.name for t in tiers if t.medium is Medium.REDIS]
        if len(redis_tiers) > 1 or (redis_tiers and redis_tiers[0] != names[-1]):
            raise ValueError("a redis tier may only be the last tier of the stack")
        if tiers[0].medium is Medium.REDIS:
            raise ValueError("the first tier must be in memory")
        return tiers

    @model_validator(mode="after")
    def _quota_tiers(self) -> Settings:
        memory = {t.name for t in self.tiers if t.medium is not Medium.REDIS}
        quotas = [*self.quotas.namespaces.items()]
        if self.quotas.default is not None:
            quotas.append(("default", self.quotas.default))
        for ns, q in quotas:
            unknown = sorted(set(q.tiers) - memory)
            if unknown:
                raise ValueError(f"quota of {ns!r} names {unknown}, not memory tiers of the "
                                 f"stack {sorted(memory)}")
        return self

    @model_validator(mode="after")
    def _buffer_reserve(self) -> Settings:
        reserve = self.host_buffer_reserve_bytes
        if reserve is not None and reserve > self.host_buffer_pool_bytes // 2:
            raise ValueError(
                f"host_buffer_reserve_bytes ({reserve}) must not exceed half of "
                f"host_buffer_pool_bytes ({self.host_buffer_pool_bytes}): the reserve is kept "
                f"in the pool, beside the buffers that come back")
        return self

    @property
    def buffer_reserve_bytes(self) -> int:
        """``host_buffer_reserve_bytes``, or its default: min(32 MiB, half the pool)."""
        if self.host_buffer_reserve_bytes is not None:
            return self.host_buffer_reserve_bytes
        return min(32 * MiB, self.host_buffer_pool_bytes // 2)

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        # Environment wins over values passed in (which come from a config file).
        return (env_settings, init_settings)

    def tier(self, name: str) -> TierConfig:
        for t in self.tiers:
            if t.name == name:
                return t
        raise KeyError(name)


def load_settings(path: str | Path | None = None, **overrides: Any) -> Settings:
    """Build settings from an optional JSON file, ``overrides`` and ``KVTIER_*`` variables.

    Raises :class:`ConfigError` with every problem spelled out, never a bare traceback.
    """
    data: dict[str, Any] = {}
    if path is not None:
        p = Path(path)
        try:
            data = json.loads(p.read_text())
        except OSError as e:
            raise ConfigError(f"cannot read config file {p}: {e.strerror}") from None
        except json.JSONDecodeError as e:
            raise ConfigError(f"config file {p} is not valid JSON: {e}") from None
        if not isinstance(data, dict):
            raise ConfigError(f"config file {p} must hold a JSON object")
    data.update(overrides)
    for name in unknown_env_vars(os.environ):
        log.warning("unknown environment variable %s ignored: no kvtier setting has that name "
                    "(nested settings use '__', e.g. KVTIER_REDIS__URL)", name)
    try:
        return Settings(**data)
    except ValidationError as e:
        problems = "; ".join(
            f"{'.'.join(str(x) for x in err['loc']) or 'settings'}: {err['msg']}"
            for err in e.errors()
        )
        raise ConfigError(f"invalid configuration: {problems}") from None



# KVTIER_ variables that are not settings: read by docker compose files and test scripts
NON_SETTING_ENV = frozenset({"KVTIER_IMAGE_TAG", "KVTIER_MODEL_DIR",
                             "KVTIER_REDIS_NODE_MAXMEMORY"})


def unknown_env_vars(environ: Mapping[str, str]) -> list[str]:
    """``KVTIER_*`` names in ``environ`` that match no setting (a typo is otherwise silent).

    Names are matched as pydantic-settings does: case-insensitively, nested fields after
    ``__`` (``KVTIER_REDIS__URL``).
    """
    unknown = []
    for name in environ:
        upper = name.upper()
        if not upper.startswith("KVTIER_") or upper in NON_SETTING_ENV:
            continue
        model: Any = Settings
        for part in upper[len("KVTIER_"):].split("__"):
            fields = getattr(model, "model_fields", None)
            field = fields.get(part.lower()) if fields else None
            if field is None:
                unknown.append(name)
                break
            ann = field.annotation
            model = ann if isinstance(ann, type) and issubclass(ann, BaseModel) else None
    return sorted(unknown)
