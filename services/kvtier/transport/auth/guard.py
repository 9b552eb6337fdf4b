"""Who may make which gRPC call: bearer tokens checked against a per-method table.

(:class:`SharedSecretGuard` is the simpler guard of the policy service: one shared token.)

With a tokens file (``auth.tokens_file``) every call of ``kvtier.v1.CacheService`` and
``kvtier.v1.DeviceService`` carries the metadata ``authorization: Bearer <token>``:

- missing, malformed, unknown or revoked token: UNAUTHENTICATED;
- the request's namespace is not granted to the token: PERMISSION_DENIED;
- a read-only token on a writing method: PERMISSION_DENIED.

The table below says which methods read and which write. A method of a guarded service that
is not in it (a newer client, a typo) is treated as writing and must name a granted namespace,
so a gap in the table fails closed. Every message of a client stream is checked (a stream may
repeat its namespace). ``grpc.health.v1`` and server reflection are not guarded: they expose no
tenant data and load balancers call them without credentials. ``Stats`` is daemon-wide: any
valid token may call it, and a namespace it names must be granted.

The checks run inside the one error interceptor (:mod:`kvtier.transport.interceptor`), so a
refused call is counted under its status like any other, and the errors are the core's
(:class:`~kvtier.errors.Unauthenticated`, :class:`~kvtier.errors.PermissionDenied`).

Shared-memory and device sessions are bound to one namespace when they are opened; every call
that uses one names that namespace and is checked here, so a session is only usable with a
token granted its namespace, and stops being usable when that token is revoked.
"""

from __future__ import annotations

import hmac
from collections.abc import Iterator
from typing import Any

import grpc

from kvtier.errors import InvalidArgument, PermissionDenied, Unauthenticated
from kvtier.transport.auth.tokens import Grant, TokenRegistry

GUARDED_SERVICES = ("kvtier.v1.CacheService", "kvtier.v1.DeviceService")

# method -> writes? (True: needs a read-write token)
METHODS: dict[str, bool] = {
    "Put": True, "PutStream": True, "Get": False, "GetStream": False, "Lookup": False,
    "Promote": True, "Delete": True, "Stats": False, "AttachShm": False,
    "AttachDevice": False, "GetDevice": False, "ReserveDevice": True, "CommitDevice": True,
    "ReleaseDevice": False,
    # a data-channel ticket: read-only tokens get read-only tickets (the servicer downgrades)
    "OpenData": False,
    # shared-memory sessions as leases: bound to their namespace, and every call that uses one
    # names it and is checked, so opening one needs only read access
    "OpenShm": False, "RenewShm": False, "CloseShm": False,
    # the worker's queue and session hints steer what the daemon keeps and promotes
    "Hint": True,
}
# methods whose namespace may be empty (daemon-wide answers)
OPTIONAL_NAMESPACE = frozenset({"Stats"})

_SCHEME = "bearer "


def bearer_token(metadata: Any) -> str | None:
    """The token of an ``authorization: Bearer <token>`` entry in gRPC invocation metadata."""
    for key, value in metadata or ():
        if key == "authorization":
            if isinstance(value, bytes):
                return None
            if value[:7].lower() != _SCHEME:
                return None
            token: str = value[7:].strip()
            return token or None
    return None


class MethodCheck:
    """The check of one method: token, then namespace and write permission per message."""

    __slots__ = ("tokens", "method", "writes", "optional_namespace")

    def __init__(self, tokens: TokenRegistry, method: str) -> None:
        self.tokens = tokens
        self.method = method
        self.writes = METHODS.get(method, True)
        self.optional_namespace = method in OPTIONAL_NAMESPACE

    def caller(self, context: grpc.ServicerContext) -> Grant:
        """The grant of the call's token, or UNAUTHENTICATED."""
        token = bearer_token(context.invocation_metadata())
        if token is None:
            raise Unauthenticated(
                f"{self.method} needs the metadata 'authorization: Bearer <token>'",
                field="authorization")
        grant = self.tokens.grant(token)
        if grant is None:
            raise Unauthenticated("the token is not valid (unknown or revoked)",
                                  field="authorization")
        if self.writes and grant.read_only:
            raise PermissionDenied(f"{self.method} writes and the token is read-only",
                                   field="authorization")
        return grant

    def namespace(self, grant: Grant, request: Any, first: bool) -> None:
        """PERMISSION_DENIED unless the namespace ``request`` names is granted."""
        ns = getattr(request, "namespace", None)
        if not isinstance(ns, str):  # a method without a namespace is not a tenant's
            raise PermissionDenied(f"{self.method} names no namespace", field="namespace")
        if not ns:
            if first and not self.optional_namespace:
                raise InvalidArgument("namespace is required", field="namespace")
            return  # Stats without one; later messages of a stream keep the first's
        if ns not in grant.namespaces:
            raise PermissionDenied(f"the token is not granted namespace {ns[:128]!r}",
                                   field="namespace")

    def unary(self, request: Any, context: grpc.ServicerContext) -> None:
        """Check a call with one request message."""
        self.namespace(self.caller(context), request, True)

    def stream(self, requests: Iterator[Any], context: grpc.ServicerContext) -> Iterator[Any]:
        """Check the token now and each message of a client stream as it is read."""
        grant = self.caller(context)
        return self._each(grant, requests)

    def _each(self, grant: Grant, requests: Iterator[Any]) -> Iterator[Any]:
        first = True
        for msg in requests:
            self.namespace(grant, msg, first)
            first = False
            yield msg


class TokenGuard:
    """Hands the error interceptor the check of each method path (None: not guarded)."""

    def __init__(self, tokens: TokenRegistry) -> None:
        self.tokens = tokens

    def check_for(self, path: str) -> MethodCheck | None:
        service, _, method = path.lstrip("/").rpartition("/")
        if service not in GUARDED_SERVICES:
            return None
        return MethodCheck(self.tokens, method)


class SecretCheck:
    """Every call of a service needs the one shared token (UNAUTHENTICATED otherwise)."""

    __slots__ = ("secret", "method")

    def __init__(self, secret: bytes, method: str) -> None:
        self.secret = secret
        self.method = method

    def unary(self, request: Any, context: grpc.ServicerContext) -> None:
        token = bearer_token(context.invocation_metadata())
        if token is None or not hmac.compare_digest(token.encode(), self.secret):
            raise Unauthenticated(f"{self.method} needs 'authorization: Bearer <policy token>' "
                                  "with the service's token", field="authorization")

    def stream(self, requests: Iterator[Any], context: grpc.ServicerContext) -> Iterator[Any]:
        self.unary(None, context)
        return requests


class SharedSecretGuard:
    """The guard of a service with one shared token (the policy service)."""

    def __init__(self, token: str, services: tuple[str, ...]) -> None:
        self.secret = token.encode()
        self.services = services

    def check_for(self, path: str) -> SecretCheck | None:
        service, _, method = path.lstrip("/").rpartition("/")
        return SecretCheck(self.secret, method) if service in self.services else None
