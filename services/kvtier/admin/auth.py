"""Who may change the daemon through the admin API, and where the API may listen.

Reading routes (stats, tiers, pages, policy, health, metrics) are open: they expose no page
data, only metadata an operator's dashboards show anyway. Mutating routes (resize a tier,
promote/demote/delete a page, switch the policy, drain) need ``Authorization: Bearer <token>``
matching ``settings.admin_token``, compared in constant time:

- ``admin_mutations`` off: every mutation is refused (403), token or not;
- no token configured: every mutation is refused (403) - there is nothing to check it against;
- no or malformed ``Authorization`` header: 401 with ``WWW-Authenticate: Bearer``;
- wrong token: 403.

:func:`check_exposure` is the start-up rule: the daemon refuses to serve the admin API with
mutations enabled on a non-loopback address and no token, because that configuration means the
operator expected mutations to work from elsewhere and would otherwise find them silently off.
"""

from __future__ import annotations

import hmac
import ipaddress

from kvtier.config import Settings
from kvtier.errors import ConfigError, PermissionDenied, Unauthenticated

_LOOPBACK_NAMES = frozenset({"localhost", "localhost.localdomain", "ip6-localhost"})


def is_loopback(host: str) -> bool:
    """True for a loopback address or the name ``localhost``; hostnames are never resolved."""
    if host.lower() in _LOOPBACK_NAMES:
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


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
    if not authorization:
        raise Unauthenticated(
            "this route needs an 'Authorization: Bearer <admin token>' header",
            field="authorization",
        )
    scheme, _, presented = authorization.strip().partition(" ")
    if scheme.lower() != "bearer" or not presented.strip():
        raise Unauthenticated(
            "the Authorization header must be 'Bearer <admin token>'", field="authorization"
        )
    if not hmac.compare_digest(presented.strip().encode(), token.encode()):
        raise PermissionDenied("the admin token is not valid", field="authorization")
