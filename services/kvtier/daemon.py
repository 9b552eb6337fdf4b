"""The cache daemon: the store, the gRPC server and (through a hook) the HTTP server, composed.

Lifecycle::

    Daemon(settings).start()  ->  store started (mover running, Redis connected if configured)
                                  gRPC server bound and started (port 0 = any free port)
                                  start_http(context) if a hook was given
                                  health SERVING; endpoints and tier stack logged
    Daemon.stop(grace_s, drain)   health DRAINING (readyz / grpc.health say NOT_SERVING)
                                  gRPC stops accepting; in-flight calls get ``grace_s`` to finish
                                  shared-memory sessions end (segments unmapped)
                                  HTTP server stopped
                                  with ``drain``: memory-tier pages written to the Redis tier
                                  store closed (mover stopped); health STOPPED

HTTP seam (for ``kvtier.admin``): pass ``start_http``, a callable taking the
:class:`~kvtier.transport.context.DaemonContext` (settings, store, rpc stats with an observer
list, health state, start time) and returning a running
:class:`~kvtier.transport.context.HttpServer` (``port`` property, ``stop(grace_s)``). The daemon
calls it after the gRPC server is up and stops it on shutdown. :attr:`Daemon.http_port` reports
its port. :func:`default_start_http` is where the admin package plugs in its FastAPI server.
"""

from __future__ import annotations

import logging
import os
import ssl
import threading
from collections.abc import Sequence
from typing import Any

import grpc

from kvtier.config import Settings
from kvtier.store.buffers import BufferPool
from kvtier.store.policy import Policy
from kvtier.store.store import TierStore
from kvtier.transport.auth.exposure import check_grpc_exposure
from kvtier.transport.auth.tokens import TokenRegistry
from kvtier.transport.cache.server import make_grpc_server
from kvtier.transport.context import DaemonContext, HttpServer, Readiness, StartHttp
from kvtier.transport.limits import StreamLimits
from kvtier.transport.tls import ssl_server_context
from kvtier.transport.data.server import DataServer
from kvtier.transport.policy.client import make_policy
from kvtier.transport.shm.relocate import Relocator
from kvtier.transport.shm.session import ShmRegistry

log = logging.getLogger(__name__)


def configure_torch_threads() -> int:
    """Limit torch's intra-op threads for a daemon process; returns the count in use.

    The daemon's torch work is many small, memory-bound ops (copies, per-group quantization)
    run from many gRPC threads at once; intra-op thread pools only add spinning and contention
    there (measured: a 1 MiB CPU copy took 11 ms with the default pool on a busy 2-core host,
    1.1 ms with one thread). An explicit ``OMP_NUM_THREADS`` wins. Process-wide, so only the
    command line calls it, never a library constructor.
    """
    import torch

    if "OMP_NUM_THREADS" not in os.environ:
        torch.set_num_threads(max(1, min(4, (os.cpu_count() or 1) // 4)))
    return int(torch.get_num_threads())


def configure_allocator() -> bool:
    """Keep freed page memory in the process for reuse (glibc only); True if applied.

    Pages are MiB-sized buffers allocated and freed all day. glibc serves such sizes with
    fresh ``mmap``s and gives them back on free, so every new page pays a page fault per 4 KiB
    (measured: a third of a 2 MiB put). Raising the mmap and trim thresholds lets freed pages
    be reused, which is what a cache daemon that refills its tiers wants. ``MALLOC_*``
    environment variables set by the operator win. Process-wide: called by the command line.
    """
    if any(k.startswith("MALLOC_") for k in os.environ):
        return False
    try:
        import ctypes

        libc = ctypes.CDLL("libc.so.6")
    except OSError:
        return False
    m_trim_threshold, m_mmap_threshold = -1, -3
    ok = libc.mallopt(m_mmap_threshold, 32 << 20) == 1
    return bool(ok and libc.mallopt(m_trim_threshold, 1 << 30) == 1)


def default_start_http() -> StartHttp | None:
    """The HTTP server hook ``kvtier serve`` uses: admin REST, /metrics, /healthz, /readyz."""
    from kvtier.admin.server import start_http  # fastapi/uvicorn: only when serving HTTP

    return start_http


class Daemon:
    """One cache daemon. Not restartable: build a new one after :meth:`stop`."""

    def __init__(
        self,
        settings: Settings,
        *,
        policy: Policy | None = None,
        start_http: StartHttp | None = None,
        interceptors: Sequence[grpc.ServerInterceptor[Any, Any]] = (),
    ) -> None:
        self.settings = settings
        self._policy = policy
        self._start_http = start_http
        self._interceptors = tuple(interceptors)
        self._lock = threading.Lock()
        self._stopped = threading.Event()
        self._context: DaemonContext | None = None
        self._server: grpc.Server | None = None
        self._shm = ShmRegistry(settings.limits.max_shm_sessions,
                                settings.limits.max_shm_sessions_per_tenant)
        self._http: HttpServer | None = None
        self.grpc_port: int | None = None
        self._data: DataServer | None = None

    @property
    def context(self) -> DaemonContext:
        if self._context is None:
            raise RuntimeError("daemon not started")
        return self._context

    @property
    def relocator(self) -> Relocator | None:
        return self.context.relocator

    @property
    def http_port(self) -> int | None:
        return self._http.port if self._http is not None else None

    @property
    def data_port(self) -> int | None:
        """The data channel's port (None: off)."""
        return self._data.port if self._data is not None else None

    def _data_ssl(self) -> ssl.SSLContext | None:
        """The data channel's TLS: the daemon's TLS settings (None: plain TCP, as the gRPC
        port); client certificates required as on the gRPC port (mTLS)."""
        return ssl_server_context(self.settings.tls)

    @property
    def grpc_address(self) -> str:
        return f"{self.settings.grpc_host}:{self.grpc_port}"

    def reload_tokens(self) -> bool:
        """Re-read the tokens file now (``kvtier serve`` calls it on SIGHUP); False if there
        is none or it is unusable (then every token is denied until it is fixed)."""
        tokens = self._context.tokens if self._context is not None else None
        return tokens.reload() if tokens is not None else False

    def start(self) -> Daemon:
        s = self.settings
        check_grpc_exposure(s)
        tokens = (TokenRegistry(s.auth.tokens_file, s.auth.reload_interval_s)
                  if s.auth.tokens_file else None)
        policy = self._policy if self._policy is not None else make_policy(s.policy, s.tls)
        store = TierStore(s, policy)
        store.start()
        try:
            buffers = BufferPool(s.host_buffer_pool_bytes, s.buffer_reserve_bytes)
            ctx = DaemonContext(settings=s, store=store, buffers=buffers,
                                relocator=Relocator(store, buffers), tokens=tokens,
                                limits=StreamLimits(s.limits))
            if s.data.enabled:
                self._data = DataServer(ctx, s.data.host or s.grpc_host, s.data.port,
                                        ssl_context=self._data_ssl())
            server, port = make_grpc_server(ctx, s.grpc_host, s.grpc_port, shm=self._shm,
                                            interceptors=self._interceptors, data=self._data)
            server.start()
            if self._data is not None:
                self._data.start()
            self._context, self._server, self.grpc_port = ctx, server, port
            if self._start_http is not None:
                self._http = self._start_http(ctx)
        except BaseException:
            if self._server is not None:
                self._server.stop(0).wait(5.0)  # the port is closed when start() raises
            if self._data is not None:
                self._data.stop()
            store.close()
            raise
        ctx.health.set(Readiness.SERVING)
        log.info("kvtier daemon serving gRPC%s on %s:%d (kvtier.v1.CacheService, "
                 "grpc.health.v1, reflection)",
                 (" with TLS (client certificates required)" if s.tls.client_ca_file else
                  " with TLS") if s.tls.enabled else "", s.grpc_host, port)
        if self._data is not None:
            log.info("kvtier daemon serving the data channel on %s:%d%s",
                     s.data.host or s.grpc_host, self._data.port,
                     " (TLS)" if self._data.tls else "")
        if self._http is not None:
            log.info("kvtier daemon serving HTTP on %s://%s:%d",
                     "https" if s.tls.enabled else "http", s.http_host, self._http.port)
        for t in s.tiers:
            log.info("tier %-8s %-6s codec=%-4s capacity=%d B watermarks=%.2f/%.2f",
                     t.name, t.medium.value, t.codec.value, t.capacity_bytes,
                     t.high_watermark, t.low_watermark)
        log.info("redis tier backend: %s; policy: %s; max page %d B",
                 s.redis.url or "none", policy.name, s.max_page_bytes)
        if tokens is not None:
            log.info("tenant tokens from %s (%d tokens; reloaded on change and on SIGHUP)",
                     s.auth.tokens_file, len(tokens))
        else:
            log.info("no tenant tokens: every gRPC caller may use every namespace")
        return self

    def stop(self, grace_s: float = 5.0, drain: bool = False) -> None:
        """Shut down in order (see the module docstring). Safe to call twice."""
        with self._lock:
            if self._stopped.is_set() or self._context is None:
                self._stopped.set()
                return
            ctx = self._context
            ctx.health.set(Readiness.DRAINING)
            log.info("kvtier daemon stopping (grace %.1fs%s)", grace_s,
                     ", draining memory tiers to redis" if drain else "")
            done = self._server.stop(grace_s) if self._server is not None else None
            self._shm.close_all()  # ends AttachShm calls so they do not hold the grace period
            if self._data is not None:  # its frames in flight fail; clients go to gRPC
                self._data.stop()
            if done is not None:
                done.wait(grace_s + 1.0)
            if ctx.limits is not None:
                ctx.limits.close()
            if ctx.relocator is not None:  # no copy-outs beside the drain and the close
                ctx.relocator.close()
            if self._http is not None:
                try:
                    self._http.stop(grace_s)
                except Exception:
                    log.exception("HTTP server did not stop cleanly")
            if drain:
                n = ctx.store.drain()
                log.info("drained %d memory-tier pages to the redis tier", n)
            ctx.store.close()
            ctx.buffers.close()
            ctx.store.policy.close()
            ctx.health.set(Readiness.STOPPED)
            self._stopped.set()
            log.info("kvtier daemon stopped")

    def wait(self, timeout_s: float | None = None) -> bool:
        """Block until :meth:`stop` finished; True if it did within ``timeout_s``."""
        return self._stopped.wait(timeout_s)

    def __enter__(self) -> Daemon:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop(grace_s=1.0)
