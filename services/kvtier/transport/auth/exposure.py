"""Where the daemon may listen without authentication: the start-up rule.

A gRPC port beyond loopback without a tokens file would let anyone on the network read,
overwrite and delete every tenant's pages, so the daemon refuses to start that way
(:func:`check_grpc_exposure`) unless the operator sets the loudly named switch
``auth.insecure_allow_unauthenticated`` (``KVTIER_AUTH__INSECURE_ALLOW_UNAUTHENTICATED=true``),
which is then logged as a warning at every start. The admin API's own rule is
:func:`kvtier.admin.auth.check_exposure`; the policy service's is :func:`check_policy_exposure`.
"""

from __future__ import annotations

import ipaddress
import logging

from kvtier.config import Settings
from kvtier.errors import ConfigError

log = logging.getLogger(__name__)

_LOOPBACK_NAMES = frozenset({"localhost", "localhost.localdomain", "ip6-localhost"})


def is_loopback(host: str) -> bool:
    """True for a loopback address or the name ``localhost``; hostnames are never resolved."""
    if host.lower() in _LOOPBACK_NAMES:
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def check_grpc_exposure(settings: Settings, host: str | None = None) -> None:
    """ConfigError if the cache daemon's gRPC port would be open beyond loopback without
    tokens (and the insecure switch is off); a warning when the switch lets it through."""
    host = settings.grpc_host if host is None else host
    if settings.auth.tokens_file or is_loopback(host):
        return
    if settings.auth.insecure_allow_unauthenticated:
        log.warning("INSECURE: gRPC on %s without tenant tokens "
                    "(KVTIER_AUTH__INSECURE_ALLOW_UNAUTHENTICATED=true): anyone who can reach "
                    "the port can read, overwrite and delete every namespace's pages", host)
        return
    raise ConfigError(
        f"refusing to serve gRPC on non-loopback address {host!r} without tenant tokens; set "
        "KVTIER_AUTH__TOKENS_FILE (create tokens with 'kvtier token create'), or bind "
        "KVTIER_GRPC_HOST to 127.0.0.1, or set KVTIER_AUTH__INSECURE_ALLOW_UNAUTHENTICATED=true "
        "to serve every namespace to anyone who reaches the port",
        field="auth.tokens_file",
    )


def check_policy_exposure(settings: Settings, host: str) -> None:
    """The same rule for the policy service: beyond loopback it needs ``policy.token``."""
    if settings.policy.token or is_loopback(host):
        return
    if settings.auth.insecure_allow_unauthenticated:
        log.warning("INSECURE: policy service on %s without a token "
                    "(KVTIER_AUTH__INSECURE_ALLOW_UNAUTHENTICATED=true)", host)
        return
    raise ConfigError(
        f"refusing to serve the policy service on non-loopback address {host!r} without a "
        "token; set KVTIER_POLICY__TOKEN (the same value on the daemons), or bind to "
        "127.0.0.1, or set KVTIER_AUTH__INSECURE_ALLOW_UNAUTHENTICATED=true",
        field="policy.token",
    )
