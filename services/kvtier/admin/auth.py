"""Who may read and change the daemon through the admin API, and where the API may listen.

Daemon-wide reading routes (stats, tiers, policy, health, metrics) are open: they expose no
tenant's data, only what an operator's dashboards show anyway. Page reads
(``GET /v1/pages/{namespace}/{key}``) reveal which keys a tenant holds, so they take
``Authorization: Bearer <token>`` with the admin token (any namespace) or a tenant token granted
that namespace (:func:`authorize_page_read`); only a daemon with no token of any kind, serving
HTTP on loopback, answers them without one (the same trust as its loopback gRPC port).

Mutating routes (resize a tier, promote/demote/delete a page, switch the policy, drain) need
the admin token, compared in constant time (a tenant token never mutates):

- ``admin_mutations`` off: every mutation is refused (403), token or not;
- no token configured: every mutation is refused (403) - there is nothing to check it against;
- no or malformed ``Authorization`` header: 401 with ``WWW-Authenticate: Bearer``;
- wrong token (a tenant token included): 403.

Mutations are authorized before their body is read (see ``kvtier.admin.app``), so an
unauthenticated client cannot make the daemon read a large body.

:func:`check_exposure` is the start-up rule: the daemon refuses to serve the admin API with
mutations enabled on a non-loopback address and no token, because that configuration means the
operator expected mutations to work from elsewhere and would otherwise find them silently off.
"""

from __future__ import annotations

import hmac

from kvtier.config import Settings
from kvtier.errors import ConfigError, PermissionDenied, Unauthenticated
from kvtier.transport.auth.exposure import is_loopback
from kvtier.transport.auth.tokens import TokenRegistry

__all__ = ["authorize_mutation", "authorize_page_read", "check_exposure", "configured_token",
           "is_loopback"]


def configured_token(settings: Settings) -> str | None:
    """The admin token, with an empty string meaning none (``KVTIER_ADMIN_TOKEN=``)."""
    return settings.admin_token or None


def check_exposure(settings: Settings, host: str | None = None) -> None:
    """Raise ConfigError if mutations would be enabled on a non-loopback address without a token."""
    host = settings.http_host if host is None else host
    if settings.admin_mutations and configured_token(settings) is None and not is_loopback(host):
        raise ConfigError(
            f"refusing to serve the admin API on non-loopback address {host!r} with admin "
            "mutations enabled and no admin token; set KVTIER_ADMIN_TOKEN, or "
            "KVTIER_ADMIN_MUTATIONS=false for a read-only admin API, or bind KVTIER_HTTP_HOST "
            "to 127.0.0.1",
            field="admin_token",
        )


def authorize_mutation(settings: Settings, authorization: str | None) -> None:
    """Return if ``authorization`` (the raw header) may mutate; raise 401/403 errors otherwise."""
    if not settings.admin_mutations:
        raise PermissionDenied(
            "admin mutations are disabled on this daemon (KVTIER_ADMIN_MUTATIONS=false)",
            field="authorization",
        )
    token = configured_token(settings)
    if token is None:
        raise PermissionDenied(
            "no admin token is configured, so mutations are refused; set KVTIER_ADMIN_TOKEN",
            field="authorization",
        )
    presented = _bearer(authorization, "admin token")
    if not hmac.compare_digest(presented.encode(), token.encode()):
        raise PermissionDenied("the admin token is not valid", field="authorization")


def authorize_page_read(settings: Settings, tokens: TokenRegistry | None,
                        authorization: str | None, namespace: str) -> None:
    """Return if ``authorization`` may read pages of ``namespace``; raise 401/403 otherwise."""
    admin = configured_token(settings)
    if admin is None and tokens is None:
        if is_loopback(settings.http_host):
            return
        raise PermissionDenied(
            "page reads beyond loopback need a token; set KVTIER_ADMIN_TOKEN or "
            "KVTIER_AUTH__TOKENS_FILE", field="authorization")
    presented = _bearer(authorization, "admin or tenant token")
    if admin is not None and hmac.compare_digest(presented.encode(), admin.encode()):
        return
    grant = tokens.grant(presented) if tokens is not None else None
    if grant is None:
        raise PermissionDenied("the token is not valid", field="authorization")
    if namespace not in grant.namespaces:
        raise PermissionDenied(f"the token is not granted namespace {namespace[:128]!r}",
                               field="authorization")


def visible_namespaces(settings: Settings, tokens: TokenRegistry | None,
                       authorization: str | None) -> frozenset[str] | None:
    """Which namespaces' usage a stats read may see by name: None for all (the admin token,
    or no token configured on a loopback-only daemon), a tenant token's own namespaces, else
    none. Never raises: the rest of the stats stays readable."""
    admin = configured_token(settings)
    if admin is None and tokens is None:
        return None if is_loopback(settings.http_host) else frozenset()
    try:
        presented = _bearer(authorization, "admin or tenant token")
    except Unauthenticated:
        return frozenset()
    if admin is not None and hmac.compare_digest(presented.encode(), admin.encode()):
        return None
    grant = tokens.grant(presented) if tokens is not None else None
    return frozenset(grant.namespaces) if grant is not None else frozenset()


def _bearer(authorization: str | None, what: str) -> str:
    """The token of an ``Authorization: Bearer <token>`` header, or Unauthenticated."""
    if not authorization:
        raise Unauthenticated(
            f"this route needs an 'Authorization: Bearer <{what}>' header",
            field="authorization",
        )
    scheme, _, presented = authorization.strip().partition(" ")
    if scheme.lower() != "bearer" or not presented.strip():
        raise Unauthenticated(
            f"the Authorization header must be 'Bearer <{what}>'", field="authorization"
        )
    return presented.strip()
