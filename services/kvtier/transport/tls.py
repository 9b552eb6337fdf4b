"""TLS for the daemon's ports (``KVTIER_TLS__*``, :class:`kvtier.config.TlsConfig`).

One place turns the configured PEM files into what each server wants: gRPC server and channel
credentials (the cache service, the policy service and the daemon's calls to it) and uvicorn's
keyword arguments (the HTTP port). A file that cannot be read, or that holds no PEM block, is a
:class:`~kvtier.errors.ConfigError` at start naming the setting, never a handshake failure later.
With ``client_ca_file`` every port requires a client certificate signed by that CA (mTLS).
"""

from __future__ import annotations

import ssl
from pathlib import Path
from typing import Any

import grpc

from kvtier.config import TlsConfig
from kvtier.errors import ConfigError


def read_pem(path: str, field: str) -> bytes:
    """The bytes of a PEM file; ConfigError naming ``field`` if unreadable or not PEM."""
    try:
        data = Path(path).read_bytes()
    except OSError as e:
        raise ConfigError(f"cannot read {path}: {e.strerror}", field=field) from None
    if b"-----BEGIN " not in data:
        raise ConfigError(f"{path} holds no PEM block", field=field)
    return data


def server_credentials(tls: TlsConfig) -> grpc.ServerCredentials | None:
    """gRPC server credentials for ``tls``; None when TLS is off."""
    if tls.cert_file is None or tls.key_file is None:
        return None
    cert = read_pem(tls.cert_file, "tls.cert_file")
    key = read_pem(tls.key_file, "tls.key_file")
    ca = read_pem(tls.client_ca_file, "tls.client_ca_file") if tls.client_ca_file else None
    try:
        return grpc.ssl_server_credentials([(key, cert)], root_certificates=ca,
                                           require_client_auth=ca is not None)
    except Exception as e:  # grpc checks the pair's format here
        raise ConfigError(f"unusable certificate or key: {e}", field="tls.cert_file") from None


def channel_credentials(ca_file: str | None = None, cert_file: str | None = None,
                        key_file: str | None = None) -> grpc.ChannelCredentials:
    """Credentials of a TLS channel: trust ``ca_file`` (None: the system's roots) and, for
    mTLS, present ``cert_file``/``key_file``."""
    if (cert_file is None) != (key_file is None):
        raise ConfigError("a client certificate and its key go together", field="tls.cert_file")
    ca = read_pem(ca_file, "tls.ca_file") if ca_file else None
    cert = read_pem(cert_file, "tls.cert_file") if cert_file else None
    key = read_pem(key_file, "tls.key_file") if key_file else None
    return grpc.ssl_channel_credentials(ca, key, cert)


def policy_channel_credentials(tls: TlsConfig) -> grpc.ChannelCredentials | None:
    """How the daemon calls a policy service when its own TLS is on: trusting ``tls.ca_file``
    (default: its own certificate) and presenting its own pair (for a policy port with mTLS)."""
    if not tls.enabled:
        return None
    return channel_credentials(tls.ca_file or tls.cert_file, tls.cert_file, tls.key_file)


def ssl_server_context(tls: TlsConfig) -> ssl.SSLContext | None:
    """A server-side :class:`ssl.SSLContext` for ``tls`` (None when TLS is off)."""
    if tls.cert_file is None or tls.key_file is None:
        return None
    kw = uvicorn_ssl(tls)
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(tls.cert_file, tls.key_file)
    if tls.client_ca_file:
        context.load_verify_locations(kw["ssl_ca_certs"])
        context.verify_mode = ssl.CERT_REQUIRED
    return context


def uvicorn_ssl(tls: TlsConfig) -> dict[str, Any]:
    """``uvicorn.Config`` keyword arguments for ``tls`` (empty when TLS is off)."""
    if tls.cert_file is None or tls.key_file is None:
        return {}
    read_pem(tls.cert_file, "tls.cert_file")
    read_pem(tls.key_file, "tls.key_file")
    kw: dict[str, Any] = {"ssl_certfile": tls.cert_file, "ssl_keyfile": tls.key_file}
    if tls.client_ca_file:
        read_pem(tls.client_ca_file, "tls.client_ca_file")
        kw.update(ssl_ca_certs=tls.client_ca_file, ssl_cert_reqs=ssl.CERT_REQUIRED)
    return kw
