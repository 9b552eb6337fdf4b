"""The gRPC server factory of the cache daemon.

:func:`make_grpc_server` returns ``(server, port)`` so tests bind port 0. It serves
``kvtier.v1.CacheService``, ``grpc.health.v1`` (fed from the daemon's
:class:`~kvtier.transport.context.HealthState`) and server reflection. Message limits are raised
above the configured ``max_page_bytes`` so that setting, not gRPC's 4 MiB default, is what limits
a page (and pages stream in chunks anyway).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from concurrent import futures
from typing import Any

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from kvtier.transport.auth.guard import TokenGuard
from kvtier.transport.cache.servicer import CacheServicer
from kvtier.transport.bind import bind_port
from kvtier.transport.context import DaemonContext, Readiness
from kvtier.transport.data.server import DataServer
from kvtier.transport.device_ipc import DeviceServicer
from kvtier.transport.interceptor import ErrorInterceptor
from kvtier.transport.limits import LimitInterceptor, StreamLimits
from kvtier.transport.shm.relocate import Relocator
from kvtier.transport.tls import server_credentials
from kvtier.transport.shm.session import ShmRegistry
from kvtier_proto.v1 import cache_pb2, cache_pb2_grpc, device_pb2_grpc

log = logging.getLogger(__name__)

SERVICE_NAME = cache_pb2.DESCRIPTOR.services_by_name["CacheService"].full_name
MESSAGE_OVERHEAD = 8 << 20  # headers of a full batch beside the largest page


def message_limit(max_page_bytes: int) -> int:
    """The gRPC message size limit for a daemon whose pages may reach ``max_page_bytes``."""
    return min(max_page_bytes + MESSAGE_OVERHEAD, 2**31 - 1)


def make_grpc_server(
    ctx: DaemonContext,
    host: str,
    port: int,
    *,
    shm: ShmRegistry | None = None,
    interceptors: Sequence[grpc.ServerInterceptor[Any, Any]] = (),
    max_workers: int | None = None,
    data: DataServer | None = None,
) -> tuple[grpc.Server, int]:
    """Build and bind (not start) the daemon's gRPC server; returns it and its bound port.

    ``interceptors`` run before the error interceptor. With ``ctx.tokens`` every call of the
    cache and device services is checked against them (:mod:`kvtier.transport.auth.guard`).
    ``data``: the data channel whose tickets ``OpenData`` hands out (None: it answers port 0).
    The stream limits (``ctx.limits``, else new ones from ``settings.limits``) run inside the
    error interceptor. ``max_workers`` (default ``settings.limits.handler_threads``) is the
    handler pool; calls past ``limits.max_concurrent_rpcs`` are answered RESOURCE_EXHAUSTED.
    """
    cfg = ctx.settings.limits
    limit = message_limit(ctx.settings.max_page_bytes)
    streams = ctx.limits if ctx.limits is not None else StreamLimits(cfg)
    server = grpc.server(
        futures.ThreadPoolExecutor(max_workers=max_workers or cfg.handler_threads,
                                   thread_name_prefix="kvtier-grpc"),
        interceptors=[*interceptors, ErrorInterceptor(
            ctx.rpc_stats, TokenGuard(ctx.tokens) if ctx.tokens is not None else None),
            LimitInterceptor(streams)],
        maximum_concurrent_rpcs=cfg.max_concurrent_rpcs,
        options=[
            ("grpc.max_receive_message_length", limit),
            ("grpc.max_send_message_length", limit),
            ("grpc.so_reuseport", 0),
        ],
    )
    cache_pb2_grpc.add_CacheServiceServicer_to_server(
        CacheServicer(ctx, shm if shm is not None else ShmRegistry(),
                      ctx.relocator or Relocator(ctx.store, ctx.buffers), data), server
    )
    device_pb2_grpc.add_DeviceServiceServicer_to_server(DeviceServicer(ctx), server)
    health_servicer = health.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)

    def on_state(state: Readiness) -> None:
        status = (health_pb2.HealthCheckResponse.SERVING if state is Readiness.SERVING
                  else health_pb2.HealthCheckResponse.NOT_SERVING)
        for name in ("", SERVICE_NAME):
            health_servicer.set(name, status)

    ctx.health.add_listener(on_state)
    reflection.enable_server_reflection(
        (SERVICE_NAME, health.SERVICE_NAME, reflection.SERVICE_NAME), server
    )
    bound = bind_port(server, host, port, "grpc_port", server_credentials(ctx.settings.tls))
    return server, bound

