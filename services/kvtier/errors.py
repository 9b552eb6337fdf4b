"""The one error hierarchy of kvtier, and the one table that maps it to gRPC and HTTP.

Every error the core raises is a :class:`KVTierError`. Each class names its gRPC status code
(by name, so this module does not import grpc) and its HTTP status. The gRPC interceptors and
the FastAPI exception handler all read :func:`status_for`; nothing else maps errors. Anything
that is not a ``KVTierError``, and an :class:`InternalError` (a broken invariant), becomes
INTERNAL / 500 with a generic message and a logged traceback (:func:`is_internal`).

A cache miss is not an error: ``get`` answers ``found = false``.
"""

from __future__ import annotations

from typing import ClassVar


class KVTierError(Exception):
    """Base of every error kvtier raises on purpose."""

    grpc_code: ClassVar[str] = "INTERNAL"
    http_status: ClassVar[int] = 500

    def __init__(self, message: str, *, field: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.field = field

    def __str__(self) -> str:
        return f"{self.field}: {self.message}" if self.field else self.message


class InvalidArgument(KVTierError):
    """Bad input: wrong dtype, shape, sizes, malformed key, negative position, ..."""

    grpc_code = "INVALID_ARGUMENT"
    http_status = 400


class PageTooLarge(InvalidArgument):
    """A page above the configured maximum page size."""


class BodyTooLarge(InvalidArgument):
    """An admin request body above the admin API's limit (refused before it is read)."""

    http_status = 413


class UnknownTier(InvalidArgument):
    """A tier name that is not in the configured stack."""


class NotFound(KVTierError):
    """An admin lookup of a page or tier that does not exist (a data-path miss is not this)."""

    grpc_code = "NOT_FOUND"
    http_status = 404


class CapacityExhausted(KVTierError):
    """Capacity that cannot be freed (e.g. a page larger than a whole tier)."""

    grpc_code = "RESOURCE_EXHAUSTED"
    http_status = 507


class Unauthenticated(KVTierError):
    grpc_code = "UNAUTHENTICATED"
    http_status = 401


class PermissionDenied(KVTierError):
    grpc_code = "PERMISSION_DENIED"
    http_status = 403


class Conflict(KVTierError):
    """A state transition that is not allowed now (e.g. demote a page above its tier)."""

    grpc_code = "FAILED_PRECONDITION"
    http_status = 409


class Aborted(KVTierError):
    """A call undone by a concurrent change, e.g. shared-memory bytes that were not written in
    time or were overwritten while the daemon copied them. Safe to retry."""

    grpc_code = "ABORTED"
    http_status = 409


class DeadlineExceeded(KVTierError):
    """The caller's deadline passed before its call was served (the data channel reports it
    itself; gRPC calls get it from gRPC)."""

    grpc_code = "DEADLINE_EXCEEDED"
    http_status = 504


class CorruptPage(KVTierError):
    """A stored blob whose checksum or header does not verify. Never served as data."""

    grpc_code = "DATA_LOSS"
    http_status = 500


class NonFinitePage(CorruptPage):
    """A stored page found holding NaN or Inf when it was to be encoded (a lent page its
    client wrote after the put). Dropped like a corrupt blob."""


class BackendUnavailable(KVTierError):
    """A backend (Redis, the policy service) is down or timed out.

    The data path turns this into a miss; it only surfaces on admin calls that need the backend.
    """

    grpc_code = "UNAVAILABLE"
    http_status = 503


class InternalError(KVTierError):
    """An invariant of kvtier's own state broke (a bug, not the caller's doing): the call fails
    with INTERNAL / 500 and the traceback is logged, as for any unexpected exception."""


class ConfigError(KVTierError):
    """Invalid configuration, reported at start with what is wrong."""

    grpc_code = "FAILED_PRECONDITION"
    http_status = 500


def is_internal(exc: BaseException) -> bool:
    """True for what is kvtier's own fault: log its traceback, tell the caller nothing more."""
    return not isinstance(exc, KVTierError) or isinstance(exc, InternalError)


def status_for(exc: BaseException) -> tuple[str, int, str]:
    """The one table: ``(grpc_code_name, http_status, message)`` for any exception."""
    if is_internal(exc):
        return "INTERNAL", 500, "internal error"
    assert isinstance(exc, KVTierError)
    return exc.grpc_code, exc.http_status, str(exc)
