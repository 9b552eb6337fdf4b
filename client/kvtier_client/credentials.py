"""Call credentials: the tenant token a daemon with tenant auth wants on every call.

A token (``kvtier token create`` prints one) travels as the gRPC metadata
``authorization: Bearer <token>``. :func:`with_token` binds it to every method of a stub.
"""

from __future__ import annotations

import functools
from typing import Any


def bearer_metadata(token: str | None) -> tuple[tuple[str, str], ...] | None:
    """The call metadata that carries ``token`` (``authorization: Bearer <token>``), or None."""
    if token is None:
        return None
    if not token or not token.isascii() or not token.isprintable() or " " in token:
        raise ValueError("token must be non-empty printable ASCII without spaces")
    return (("authorization", f"Bearer {token}"),)


def with_token(stub: Any, token: str | None) -> Any:
    """``stub`` whose every method sends ``token`` as call metadata (nothing when None).

    The stub's multi-callables are replaced by partials with the metadata bound, so a call
    costs no interceptor; every call site keeps calling ``stub.Method(request, timeout=...)``.
    """
    metadata = bearer_metadata(token)
    if metadata is None:
        return stub
    for name, method in list(vars(stub).items()):
        if not name.startswith("_") and callable(method):
            setattr(stub, name, functools.partial(method, metadata=metadata))
    return stub
