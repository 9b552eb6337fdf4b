"""Typed client errors: each carries the gRPC status code name and the daemon's message."""

from __future__ import annotations

from typing import Any


class KVTierClientError(Exception):
    """A call failed. ``code`` is the gRPC status name (``INVALID_ARGUMENT``, ...)."""

    code: str = "UNKNOWN"

    def __init__(self, message: str, *, code: str | None = None, method: str = "") -> None:
        super().__init__(message)
        self.message = message
        self.method = method
        if code is not None:
            self.code = code

    def __str__(self) -> str:
        where = f"{self.method}: " if self.method else ""
        return f"{where}{self.code}: {self.message}"


class InvalidArgumentError(KVTierClientError):
    code = "INVALID_ARGUMENT"


class NotFoundError(KVTierClientError):
    code = "NOT_FOUND"


class ResourceExhaustedError(KVTierClientError):
    code = "RESOURCE_EXHAUSTED"


class PermissionDeniedError(KVTierClientError):
    code = "PERMISSION_DENIED"


class UnauthenticatedError(KVTierClientError):
    code = "UNAUTHENTICATED"


class FailedPreconditionError(KVTierClientError):
    code = "FAILED_PRECONDITION"


class AbortedError(KVTierClientError):
    code = "ABORTED"


class UnavailableError(KVTierClientError):
    code = "UNAVAILABLE"


class DeadlineExceededError(KVTierClientError):
    code = "DEADLINE_EXCEEDED"


class InternalError(KVTierClientError):
    code = "INTERNAL"


_BY_CODE: dict[str, type[KVTierClientError]] = {
    c.code: c
    for c in (InvalidArgumentError, NotFoundError, ResourceExhaustedError,
              PermissionDeniedError, UnauthenticatedError, FailedPreconditionError,
              AbortedError, UnavailableError, DeadlineExceededError, InternalError)
}


def from_rpc_error(err: Any, method: str) -> KVTierClientError:
    """The typed error for a ``grpc.RpcError`` (duck-typed: ``code()`` and ``details()``)."""
    code_obj = err.code()
    code = getattr(code_obj, "name", str(code_obj))
    message = err.details() or code
    cls = _BY_CODE.get(code, KVTierClientError)
    return cls(message, code=code, method=method)


def from_code(code: str, message: str, method: str) -> KVTierClientError:
    """The typed error for a status code name and message (the data channel's ERROR frames)."""
    cls = _BY_CODE.get(code, KVTierClientError)
    return cls(message or code, code=code, method=method)
