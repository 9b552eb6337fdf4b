"""A self-signed certificate and key for trying TLS (``kvtier up --tls``, tests), made by the
``openssl`` command line.

The certificate is its own CA (``basicConstraints CA:TRUE``) and names ``localhost``,
``127.0.0.1`` and ``::1`` (plus any ``hosts`` given) as subject alternative names, so a client
that trusts the certificate file itself (``tls_ca_file``, ``KVTIER_REDIS__SSL_CA_FILE``) can
verify a server on this machine. For anything but trying it, use certificates of your own CA.
"""

from __future__ import annotations

import ipaddress
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path

from kvtier.errors import ConfigError


@dataclass(frozen=True, slots=True)
class CertPair:
    """PEM files: the certificate (which is also its CA) and its private key (mode 0600)."""

    cert_file: str
    key_file: str


def self_signed(directory: str | Path, name: str = "kvtier", hosts: tuple[str, ...] = (),
                days: int = 30) -> CertPair:
    """Write ``<name>.crt`` and ``<name>.key`` (EC P-256) into ``directory``; the pair."""
    openssl = shutil.which("openssl")
    if openssl is None:
        raise ConfigError("openssl is not on PATH: install it (Debian: apt-get install openssl) "
                          "or give KVTIER_TLS__CERT_FILE and KVTIER_TLS__KEY_FILE")
    d = Path(directory)
    d.mkdir(parents=True, exist_ok=True)
    cert, key = d / f"{name}.crt", d / f"{name}.key"
    sans = []
    for h in ("localhost", "127.0.0.1", "::1", *hosts):
        try:
            ipaddress.ip_address(h)
            sans.append(f"IP:{h}")
        except ValueError:
            sans.append(f"DNS:{h}")
    argv = [openssl, "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256",
            "-nodes", "-keyout", str(key), "-out", str(cert), "-days", str(days),
            "-subj", f"/CN={name}", "-addext", "subjectAltName=" + ",".join(dict.fromkeys(sans)),
            "-addext", "basicConstraints=critical,CA:TRUE",
            "-addext", "keyUsage=critical,digitalSignature,keyCertSign"]
    res = subprocess.run(argv, capture_output=True, text=True, check=False)
    if res.returncode != 0:
        raise ConfigError(f"openssl could not make a certificate: {res.stderr.strip()}")
    key.chmod(0o600)
    return CertPair(str(cert), str(key))
