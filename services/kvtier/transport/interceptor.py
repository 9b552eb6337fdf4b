"""The one gRPC server interceptor: applies the error table and records per-call statistics.

Every handler of both services (cache and policy) runs inside :class:`ErrorInterceptor`. A
:class:`kvtier.errors.KVTierError` ends the call with the status ``kvtier.errors.status_for``
names and its message (the message names the bad field); anything else, InternalError included,
is logged with its traceback and ends the call with INTERNAL and a generic message, and the
daemon keeps serving. A call that ended outside its handler (the client cancelled it, its
deadline passed, gRPC refused a message for its size) is counted with that status
(CANCELLED, DEADLINE_EXCEEDED, ...) and logged in one line, not as INTERNAL. Each finished
call becomes one :class:`kvtier.transport.stats.RpcSample`
(method, status, latency, message bytes in/out).

Authentication runs here too, when a ``guard`` is given (:class:`kvtier.transport.auth.guard.
TokenGuard`): its check of the method runs inside the call's error mapping, before the handler
(and on each message of a client stream), so a refused call ends with the status of its
UNAUTHENTICATED / PERMISSION_DENIED error and is counted like any other. Interceptors given to
:func:`kvtier.transport.cache.server.make_grpc_server` go before this one; aborts they make are
passed through untouched.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING, Any, Protocol

import grpc

from kvtier.errors import is_internal, status_for
from kvtier.transport.stats import RpcSample, RpcStats

log = logging.getLogger(__name__)

_MAX_WRAPPED = 256


def _size(msg: Any) -> int:
    try:
        return int(msg.ByteSize())
    except AttributeError:
        return 0


class _Call:
    """Book-keeping of one call: bytes counted as messages pass, outcome set once."""

    __slots__ = ("method", "stats", "t0", "bytes_in", "bytes_out", "done", "streamed")

    def __init__(self, method: str, stats: RpcStats, streamed: bool = False) -> None:
        self.method = method
        self.streamed = streamed  # requests come as a stream
        self.stats = stats
        self.t0 = time.perf_counter()
        self.bytes_in = 0
        self.bytes_out = 0
        self.done = False

    def count_in(self, it: Iterator[Any]) -> Iterator[Any]:
        for msg in it:
            self.bytes_in += _size(msg)
            yield msg

    def finish(self, code: str) -> None:
        if self.done:
            return
        self.done = True
        self.stats.record(
            RpcSample(self.method, code, time.perf_counter() - self.t0, self.bytes_in,
                      self.bytes_out)
        )

    def fail(self, exc: BaseException, context: grpc.ServicerContext) -> None:
        """End the call for ``exc``: record it and abort with the mapped status (raises)."""
        already = _aborted_code(context)
        if already is not None:  # an abort by the handler or an inner interceptor
            self.finish(already)
            raise exc
        if isinstance(exc, grpc.RpcError) or not _settled_active(context, self.streamed):
            # the client cancelled, the deadline passed or gRPC refused a message (its size):
            # the call ended outside the handler, which is no fault of the daemon's
            code = _ended_code(context)
            log.info("%s ended by the client or the transport: %s", self.method, code)
            self.finish(code)
            if isinstance(exc, grpc.RpcError):  # gRPC's own: it knows the call is over
                raise exc
            context.abort(grpc.StatusCode[code], "the call ended")  # no "Exception calling"
        code, _http, message = status_for(exc)
        if is_internal(exc):
            log.error("%s failed unexpectedly; answering INTERNAL", self.method, exc_info=exc)
            message = f"internal error in {self.method} ({type(exc).__name__}); see daemon log"
        else:
            log.debug("%s -> %s: %s", self.method, code, message)
        self.finish(code)
        context.abort(grpc.StatusCode[code], message)


def _settled_active(context: grpc.ServicerContext, streamed: bool) -> bool:
    """Whether the call is still active. A request stream that the transport ended (deadline,
    cancel, a message over the size limit) looks like a normal end to the handler for a
    moment before the call is marked ended: a failing stream handler waits up to 20 ms for
    that before its error is taken as the answer."""
    if not streamed:
        return bool(context.is_active())
    for _ in range(4):
        if not context.is_active():
            return False
        time.sleep(0.005)
    return bool(context.is_active())


def _ended_code(context: grpc.ServicerContext) -> str:
    """The status of a call that ended outside its handler: DEADLINE_EXCEEDED once its
    deadline passed, the code gRPC set (e.g. RESOURCE_EXHAUSTED for a message over the size
    limit) if any, else CANCELLED."""
    left = context.time_remaining()
    if left is not None and left <= 0:
        return "DEADLINE_EXCEEDED"
    return _aborted_code(context) or "CANCELLED"


def _aborted_code(context: grpc.ServicerContext) -> str | None:
    code = context.code()  # type: ignore[attr-defined]
    if code is None or code == grpc.StatusCode.OK:
        return None
    if isinstance(code, grpc.StatusCode):
        return str(code.name)
    return str(code)


class MethodCheck(Protocol):
    """What a guard runs for one method (see :mod:`kvtier.transport.auth.guard`)."""

    def unary(self, request: Any, context: grpc.ServicerContext) -> None: ...

    def stream(self, requests: Iterator[Any],
               context: grpc.ServicerContext) -> Iterator[Any]: ...


class Guard(Protocol):
    def check_for(self, path: str) -> MethodCheck | None: ...


if TYPE_CHECKING:
    _ServerInterceptor = grpc.ServerInterceptor[Any, Any]
else:  # the stubs are generic, the runtime class is not
    _ServerInterceptor = grpc.ServerInterceptor


class ErrorInterceptor(_ServerInterceptor):
    """Maps errors by the one table and records an :class:`RpcSample` for every call."""

    def __init__(self, stats: RpcStats, guard: Guard | None = None) -> None:
        self._stats = stats
        self._guard = guard
        # (method path, id(handler)) -> (handler, wrapped): gRPC asks on every call, and the
        # services' handlers are fixed objects, so each is wrapped once (the handler is kept
        # so that its id cannot be reused by another object)
        self._wrapped: dict[tuple[str, int], tuple[Any, Any]] = {}

    def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], grpc.RpcMethodHandler[Any, Any] | None],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler[Any, Any] | None:
        handler = continuation(handler_call_details)
        if handler is None:
            return None
        path = str(handler_call_details.method)
        key = (path, id(handler))
        cached = self._wrapped.get(key)
        if cached is not None and cached[0] is handler:
            wrapped: grpc.RpcMethodHandler[Any, Any] = cached[1]
            return wrapped
        check = self._guard.check_for(path) if self._guard is not None else None
        wrapped = self._wrap(handler, path.rsplit("/", 1)[-1], check)
        if len(self._wrapped) < _MAX_WRAPPED:  # handlers made per call are wrapped per call
            self._wrapped[key] = (handler, wrapped)
        return wrapped

    def _wrap(self, handler: grpc.RpcMethodHandler[Any, Any], method: str,
              check: MethodCheck | None = None) -> grpc.RpcMethodHandler[Any, Any]:
        """``handler`` inside the error mapping, the guard's ``check`` and the per-call
        statistics."""
        if check is not None:
            handler = _checked(handler, check)
        stats = self._stats
        kw = {
            "request_deserializer": handler.request_deserializer,
            "response_serializer": handler.response_serializer,
        }
        if handler.unary_unary is not None:
            inner_uu = handler.unary_unary

            def unary_unary(request: Any, context: grpc.ServicerContext) -> Any:
                call = _Call(method, stats)
                call.bytes_in = _size(request)
                return _one_reply(call, context, lambda: inner_uu(request, context))

            return grpc.unary_unary_rpc_method_handler(unary_unary, **kw)
        if handler.stream_unary is not None:
            inner_su = handler.stream_unary

            def stream_unary(requests: Iterator[Any], context: grpc.ServicerContext) -> Any:
                call = _Call(method, stats, streamed=True)
                return _one_reply(call, context,
                                  lambda: inner_su(call.count_in(requests), context))

            return grpc.stream_unary_rpc_method_handler(stream_unary, **kw)
        if handler.unary_stream is not None:
            inner_us = handler.unary_stream

            def unary_stream(request: Any, context: grpc.ServicerContext) -> Iterator[Any]:
                call = _Call(method, stats)
                call.bytes_in = _size(request)
                return _replies(call, context, lambda: inner_us(request, context))

            return grpc.unary_stream_rpc_method_handler(unary_stream, **kw)
        inner_ss = handler.stream_stream
        if inner_ss is None:
            return handler

        def stream_stream(requests: Iterator[Any], context: grpc.ServicerContext) -> Iterator[Any]:
            call = _Call(method, stats, streamed=True)
            return _replies(call, context, lambda: inner_ss(call.count_in(requests), context))

        return grpc.stream_stream_rpc_method_handler(stream_stream, **kw)


def _checked(handler: grpc.RpcMethodHandler[Any, Any],
             check: MethodCheck) -> grpc.RpcMethodHandler[Any, Any]:
    """``handler`` with ``check`` run first (on the request, or on each streamed request)."""
    kw = {
        "request_deserializer": handler.request_deserializer,
        "response_serializer": handler.response_serializer,
    }
    if handler.unary_unary is not None:
        uu = handler.unary_unary

        def unary_unary(request: Any, context: grpc.ServicerContext) -> Any:
            check.unary(request, context)
            return uu(request, context)

        return grpc.unary_unary_rpc_method_handler(unary_unary, **kw)
    if handler.unary_stream is not None:
        us = handler.unary_stream

        def unary_stream(request: Any, context: grpc.ServicerContext) -> Any:
            check.unary(request, context)
            return us(request, context)

        return grpc.unary_stream_rpc_method_handler(unary_stream, **kw)
    if handler.stream_unary is not None:
        su = handler.stream_unary

        def stream_unary(requests: Iterator[Any], context: grpc.ServicerContext) -> Any:
            return su(check.stream(requests, context), context)

        return grpc.stream_unary_rpc_method_handler(stream_unary, **kw)
    ss = handler.stream_stream
    if ss is None:
        return handler

    def stream_stream(requests: Iterator[Any], context: grpc.ServicerContext) -> Any:
        return ss(check.stream(requests, context), context)

    return grpc.stream_stream_rpc_method_handler(stream_stream, **kw)


def _one_reply(call: _Call, context: grpc.ServicerContext, handle: Callable[[], Any]) -> Any:
    """Run a single-reply handler, recording the call; errors are mapped, logged, re-raised."""
    try:
        reply = handle()
    except BaseException as e:  # noqa: BLE001 - mapped, logged, re-raised
        call.fail(e, context)
        raise
    call.bytes_out = _size(reply)
    call.finish(_aborted_code(context) or "OK")
    return reply


def _replies(call: _Call, context: grpc.ServicerContext,
             handle: Callable[[], Iterator[Any]]) -> Iterator[Any]:
    """Stream a handler's replies, recording the call; a client that goes away is CANCELLED."""
    try:
        for reply in handle():
            call.bytes_out += _size(reply)
            yield reply
    except GeneratorExit:
        call.finish("CANCELLED")
        raise
    except BaseException as e:  # noqa: BLE001 - mapped, logged, re-raised
        call.fail(e, context)
        raise
    call.finish(_aborted_code(context) or "OK")
