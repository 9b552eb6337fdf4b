"""Stream limits: no client, stalled or hostile, can take the handler threads others need.

A synchronous gRPC server runs each call on a thread of a fixed pool, and a streaming call
holds its thread for as long as it is open, also while it waits on a client that sends nothing
(``PutStream``) or reads nothing (``GetStream``). :class:`StreamLimits` bounds what such calls
can hold (``KVTIER_LIMITS__*``, :class:`kvtier.config.LimitsConfig`):

* at most ``max_streams`` open streaming calls in the daemon, ``max_streams_per_peer`` per
  connection (gRPC peer) and ``max_streams_per_tenant`` per namespace; one more is refused
  with RESOURCE_EXHAUSTED at once (:class:`~kvtier.errors.CapacityExhausted`);
* a stream that waits on its client for ``stream_idle_s`` is cancelled by a watchdog thread
  (the client sees CANCELLED, the call is counted as :class:`StreamIdle`), which gives its
  thread back. Time the daemon spends working on a stream does not count as idle.

``max_streams`` is below the thread count (a validated setting), so unary calls always find a
thread; past the server's ``maximum_concurrent_rpcs`` gRPC itself answers RESOURCE_EXHAUSTED.
Shared-memory sessions are leases that hold no thread (:mod:`kvtier.transport.shm.session`).

:class:`LimitInterceptor` applies the limits to every streaming method. It goes inside the
error interceptor, so refusals are mapped and counted by the one error table.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING, Any

import grpc

from kvtier.config import LimitsConfig
from kvtier.errors import CapacityExhausted, KVTierError

log = logging.getLogger(__name__)


class StreamIdle(KVTierError):
    """A streaming call that waited on its client past ``stream_idle_s``; it was cancelled."""

    grpc_code = "CANCELLED"
    http_status = 408


class StreamTicket:
    """One open streaming call: its peer, its tenant once known, and whether it waits on the
    client (only waiting time counts toward the idle limit)."""

    __slots__ = ("_limits", "method", "peer", "tenant", "_context", "_waiting_since",
                 "expired", "_closed")

    def __init__(self, limits: StreamLimits, method: str, peer: str,
                 context: grpc.ServicerContext) -> None:
        self._limits = limits
        self.method = method
        self.peer = peer
        self.tenant: str | None = None
        self._context = context
        self._waiting_since: float | None = None
        self.expired = False
        self._closed = False

    def bind_tenant(self, namespace: str) -> None:
        """Count the call against ``namespace`` (once); CapacityExhausted past its limit."""
        if self.tenant is None and namespace:
            self._limits._bind(self, namespace)

    def wait_on_client(self) -> None:
        self._waiting_since = time.monotonic()

    def working(self) -> None:
        self._waiting_since = None

    @property
    def idle_limit_s(self) -> float:
        return self._limits.config.stream_idle_s

    def idle_for(self, now: float) -> float:
        since = self._waiting_since
        return 0.0 if since is None else now - since

    def expire(self) -> None:
        """Cancel the call (from the watchdog thread): its handler's wait on the client ends
        with an error, and the thread is free again."""
        self.expired = True
        self._context.cancel()  # type: ignore[no-untyped-call,unused-ignore]

    def watch_requests(self, requests: Iterator[Any]) -> Iterator[Any]:
        """``requests`` with the waits on the client timed; binds the tenant from the first
        message's ``namespace``."""
        while True:
            self.wait_on_client()
            try:
                msg = next(requests)
            except StopIteration:
                self.working()
                return
            self.working()
            if self.tenant is None:
                self.bind_tenant(str(getattr(msg, "namespace", "") or ""))
            yield msg

    def close(self) -> None:
        if not self._closed:
            self._closed = True
            self._limits._release(self)


class StreamLimits:
    """Counts of open streaming calls and the idle watchdog. Thread-safe; :meth:`close` stops
    the watchdog."""

    def __init__(self, config: LimitsConfig) -> None:
        self.config = config
        self._lock = threading.Lock()
        self._open: set[StreamTicket] = set()
        self._peers: Counter[str] = Counter()
        self._tenants: Counter[str] = Counter()
        self._refused = 0
        self._idle_cancelled = 0
        self._stop = threading.Event()
        self._watchdog: threading.Thread | None = None

    def open(self, method: str, context: grpc.ServicerContext) -> StreamTicket:
        """A ticket for a new streaming call, or CapacityExhausted if it would pass a limit."""
        peer = str(context.peer())
        cfg = self.config
        with self._lock:
            if len(self._open) >= cfg.max_streams:
                self._refused += 1
                raise CapacityExhausted(
                    f"{len(self._open)} streaming calls open in the daemon, its limit "
                    f"(limits.max_streams); retry later", field="stream")
            if self._peers[peer] >= cfg.max_streams_per_peer:
                self._refused += 1
                raise CapacityExhausted(
                    f"{self._peers[peer]} streaming calls open on this connection, its limit "
                    f"(limits.max_streams_per_peer)", field="stream")
            ticket = StreamTicket(self, method, peer, context)
            self._open.add(ticket)
            self._peers[peer] += 1
            if self._watchdog is None:
                self._watchdog = threading.Thread(target=self._watch, name="kvtier-stream-idle",
                                                  daemon=True)
                self._watchdog.start()
        return ticket

    def _bind(self, ticket: StreamTicket, tenant: str) -> None:
        with self._lock:
            if self._tenants[tenant] >= self.config.max_streams_per_tenant:
                self._refused += 1
                raise CapacityExhausted(
                    f"{self._tenants[tenant]} streaming calls open for namespace {tenant!r}, "
                    f"its limit (limits.max_streams_per_tenant)", field="stream")
            self._tenants[tenant] += 1
            ticket.tenant = tenant

    def _release(self, ticket: StreamTicket) -> None:
        with self._lock:
            if ticket not in self._open:
                return
            self._open.discard(ticket)
            self._peers[ticket.peer] -= 1
            if self._peers[ticket.peer] <= 0:
                del self._peers[ticket.peer]
            if ticket.tenant is not None:
                self._tenants[ticket.tenant] -= 1
                if self._tenants[ticket.tenant] <= 0:
                    del self._tenants[ticket.tenant]

    def _watch(self) -> None:
        idle_s = self.config.stream_idle_s
        period = min(1.0, idle_s / 4)
        while not self._stop.wait(period):
            now = time.monotonic()
            with self._lock:
                stale = [t for t in self._open if not t.expired and t.idle_for(now) >= idle_s]
            for t in stale:
                log.info("%s from %s (namespace %s) waited on its client for %.0f s; cancelled",
                         t.method, t.peer, t.tenant or "?", idle_s)
                with self._lock:
                    self._idle_cancelled += 1
                t.expire()

    @property
    def open_streams(self) -> int:
        with self._lock:
            return len(self._open)

    @property
    def refused(self) -> int:
        """Streaming calls refused for a limit since start."""
        with self._lock:
            return self._refused

    @property
    def idle_cancelled(self) -> int:
        """Streaming calls cancelled by the idle watchdog since start."""
        with self._lock:
            return self._idle_cancelled

    def close(self) -> None:
        self._stop.set()


if TYPE_CHECKING:
    _ServerInterceptor = grpc.ServerInterceptor[Any, Any]
else:  # the stubs are generic, the runtime class is not
    _ServerInterceptor = grpc.ServerInterceptor


class LimitInterceptor(_ServerInterceptor):
    """Applies :class:`StreamLimits` to every streaming method (unary calls pass untouched)."""

    def __init__(self, limits: StreamLimits) -> None:
        self._limits = limits
        self._wrapped: dict[int, tuple[Any, Any]] = {}

    def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], grpc.RpcMethodHandler[Any, Any] | None],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler[Any, Any] | None:
        handler = continuation(handler_call_details)
        if handler is None or (handler.unary_unary is not None):
            return handler
        cached = self._wrapped.get(id(handler))
        if cached is not None and cached[0] is handler:
            wrapped: grpc.RpcMethodHandler[Any, Any] = cached[1]
            return wrapped
        method = str(handler_call_details.method).rsplit("/", 1)[-1]
        wrapped = self._wrap(handler, method)
        if len(self._wrapped) < 256:
            self._wrapped[id(handler)] = (handler, wrapped)
        return wrapped

    def _wrap(self, handler: grpc.RpcMethodHandler[Any, Any],
              method: str) -> grpc.RpcMethodHandler[Any, Any]:
        limits = self._limits
        kw = {"request_deserializer": handler.request_deserializer,
              "response_serializer": handler.response_serializer}
        if handler.stream_unary is not None:
            inner_su = handler.stream_unary

            def stream_unary(requests: Iterator[Any], context: grpc.ServicerContext) -> Any:
                ticket = limits.open(method, context)
                try:
                    return inner_su(ticket.watch_requests(requests), context)
                except Exception:
                    _raise_if_idle(ticket)
                    raise
                finally:
                    ticket.close()

            return grpc.stream_unary_rpc_method_handler(stream_unary, **kw)
        if handler.unary_stream is not None:
            inner_us = handler.unary_stream

            def unary_stream(request: Any, context: grpc.ServicerContext) -> Iterator[Any]:
                ticket = limits.open(method, context)
                try:
                    ticket.bind_tenant(str(getattr(request, "namespace", "") or ""))
                    yield from _watch_replies(ticket, inner_us(request, context))
                except Exception:
                    _raise_if_idle(ticket)
                    raise
                finally:
                    ticket.close()

            return grpc.unary_stream_rpc_method_handler(unary_stream, **kw)
        inner_ss = handler.stream_stream
        if inner_ss is None:
            return handler

        def stream_stream(requests: Iterator[Any], context: grpc.ServicerContext) -> Iterator[Any]:
            ticket = limits.open(method, context)
            try:
                yield from _watch_replies(ticket, inner_ss(ticket.watch_requests(requests),
                                                            context))
            except Exception:
                _raise_if_idle(ticket)
                raise
            finally:
                ticket.close()

        return grpc.stream_stream_rpc_method_handler(stream_stream, **kw)


def _watch_replies(ticket: StreamTicket, replies: Iterator[Any]) -> Iterator[Any]:
    """``replies``, with the time each one waits for the client to take it counted as idle."""
    for reply in replies:
        ticket.wait_on_client()
        yield reply
        ticket.working()


def _raise_if_idle(ticket: StreamTicket) -> None:
    """In a failing handler: if the watchdog cancelled the call, say so (StreamIdle)."""
    if ticket.expired:
        raise StreamIdle(f"{ticket.method} waited on the client for more than "
                         f"{ticket.idle_limit_s:g} s (limits.stream_idle_s)",
                         field="stream") from None
