"""What the daemon's servers share: :class:`DaemonContext`, health state, the HTTP seam.

The daemon (``kvtier.daemon.Daemon``) builds one :class:`DaemonContext` after the store starts
and hands it to every server it runs: the gRPC server of this package, and the HTTP server
(admin REST, ``/metrics``, ``/healthz``, ``/readyz``) of ``kvtier.admin`` through the
``start_http`` hook, a callable ``(DaemonContext) -> HttpServer``. The context is frozen: the
objects it holds are thread-safe and own their state (the store, the RPC statistics, the
health state), so nobody swaps them behind another server's back.
"""

from __future__ import annotations

import enum
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Protocol

from kvtier.config import Settings
from kvtier.store.buffers import BufferPool
from kvtier.transport.stats import RpcStats

if TYPE_CHECKING:
    from kvtier.store.store import TierStore
    from kvtier.transport.limits import StreamLimits
    from kvtier.transport.auth.tokens import TokenRegistry
    from kvtier.transport.shm.relocate import Relocator


class Readiness(str, enum.Enum):
    """Lifecycle of the daemon, as /readyz and grpc.health.v1 report it."""

    STARTING = "starting"
    SERVING = "serving"
    DRAINING = "draining"  # shutting down: no new work accepted
    STOPPED = "stopped"


class HealthState:
    """The daemon's readiness, with listeners (the gRPC health servicer is one)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._state = Readiness.STARTING
        self._listeners: list[Callable[[Readiness], None]] = []

    @property
    def state(self) -> Readiness:
        with self._lock:
            return self._state

    @property
    def ready(self) -> bool:
        return self.state is Readiness.SERVING

    def add_listener(self, listener: Callable[[Readiness], None]) -> None:
        with self._lock:
            self._listeners.append(listener)
            state = self._state
        listener(state)

    def set(self, state: Readiness) -> None:
        with self._lock:
            self._state = state
            listeners = tuple(self._listeners)
        for listener in listeners:
            listener(state)


@dataclass(frozen=True, slots=True)
class DaemonContext:
    """Everything a server of the daemon needs. Built once per daemon start."""

    settings: Settings
    store: TierStore
    rpc_stats: RpcStats = field(default_factory=RpcStats)
    health: HealthState = field(default_factory=HealthState)
    # Puts' page buffers, reused. The default is the default size; the daemon passes one of
    # settings.host_buffer_pool_bytes.
    buffers: BufferPool = field(default_factory=BufferPool)
    relocator: Relocator | None = None  # copies lent pages out of clients' segments
    started_at: float = field(default_factory=time.time)  # wall clock, for uptime
    limits: StreamLimits | None = None  # open streaming calls (kvtier.transport.limits)
    # tenant tokens (settings.auth.tokens_file); None: the data plane takes no tokens
    tokens: TokenRegistry | None = None


class HttpServer(Protocol):
    """What a ``start_http`` hook returns: a running server the daemon stops on shutdown."""

    @property
    def port(self) -> int: ...

    def stop(self, grace_s: float) -> None: ...


StartHttp = Callable[[DaemonContext], HttpServer]
