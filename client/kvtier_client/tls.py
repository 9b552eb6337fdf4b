"""TLS for the clients: what ``tls_ca_file``, ``tls_cert_file`` and ``tls_key_file`` mean.

Any of them turns TLS on, for the gRPC channel and the data channel alike. ``tls_ca_file`` is
the CA (PEM) that signed the daemon's certificate (for a self-signed daemon, its certificate
file itself); without it the system's roots are trusted. ``tls_cert_file`` and
``tls_key_file`` are the client's own pair, for a daemon that requires client certificates
(``KVTIER_TLS__CLIENT_CA_FILE``).
"""

from __future__ import annotations

import ssl
from pathlib import Path

import grpc


def _read(path: str, what: str) -> bytes:
    try:
        data = Path(path).read_bytes()
    except OSError as e:
        raise ValueError(f"cannot read {what} {path}: {e.strerror}") from None
    if b"-----BEGIN " not in data:
        raise ValueError(f"{what} {path} holds no PEM block")
    return data


def channel_credentials(ca_file: str | None, cert_file: str | None,
                        key_file: str | None) -> grpc.ChannelCredentials | None:
    """Credentials for a TLS channel, or None (plaintext) when no file is given."""
    if ca_file is None and cert_file is None and key_file is None:
        return None
    if (cert_file is None) != (key_file is None):
        raise ValueError("tls_cert_file and tls_key_file go together (a client certificate "
                         "and its key)")
    return grpc.ssl_channel_credentials(
        _read(ca_file, "tls_ca_file") if ca_file else None,
        _read(key_file, "tls_key_file") if key_file else None,
        _read(cert_file, "tls_cert_file") if cert_file else None,
    )


def data_ssl_context(ca_file: str | None, cert_file: str | None,
                     key_file: str | None) -> ssl.SSLContext | None:
    """The same trust and client pair for the data channel's TCP connection (None: plain)."""
    if ca_file is None and cert_file is None and key_file is None:
        return None
    if cert_file is not None:
        _read(cert_file, "tls_cert_file")
    context = ssl.create_default_context(cafile=ca_file)
    if cert_file is not None and key_file is not None:
        context.load_cert_chain(cert_file, key_file)
    return context
