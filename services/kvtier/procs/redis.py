"""Start and stop a local ``redis-server`` on a free port (for ``kvtier up``, benches, tests)."""

from __future__ import annotations

import socket
import ssl

from kvtier.procs.certs import CertPair
from kvtier.procs.child import ChildProcess, free_port


class RedisProcess(ChildProcess):
    """A private redis-server child process. Nothing persisted unless ``data_dir`` is given.

    With ``tls`` (a :class:`~kvtier.procs.certs.CertPair` whose certificate is its own CA) it
    speaks TLS only (``--tls-port``, no plaintext port; ``url`` is ``rediss://``), and with
    ``tls_clients`` also requires client certificates signed by that certificate."""

    program = "redis-server"
    install_hint = ("install it (Debian: apt-get install redis-server) or configure "
                    "KVTIER_REDIS__URL")

    def __init__(self, port: int | None = None, host: str = "127.0.0.1",
                 binary: str | None = None, data_dir: str | None = None,
                 maxmemory: int | str | None = None, tls: CertPair | None = None,
                 tls_clients: bool = False) -> None:
        super().__init__(port, host, binary)
        self.tls = tls
        self.tls_clients = tls_clients
        self.data_dir = data_dir or str(self.workdir)
        self.maxmemory = maxmemory  # with allkeys-lru: Redis evicts, the cache never fills

    @property
    def url(self) -> str:
        return f"{'rediss' if self.tls else 'redis'}://{self.host}:{self.port}/0"

    def argv(self) -> list[str]:
        if self.tls is not None:
            port = ["--port", "0", "--tls-port", str(self.port),
                    "--tls-cert-file", self.tls.cert_file, "--tls-key-file", self.tls.key_file,
                    "--tls-ca-cert-file", self.tls.cert_file,
                    "--tls-auth-clients", "yes" if self.tls_clients else "no"]
        else:
            port = ["--port", str(self.port)]
        args = [self.binary, *port, "--bind", self.host, "--save", "",
                "--appendonly", "no", "--dir", self.data_dir, "--protected-mode", "no"]
        if self.maxmemory is not None:
            args += ["--maxmemory", str(self.maxmemory), "--maxmemory-policy", "allkeys-lru"]
        return args

    def ready(self) -> bool:
        with socket.create_connection((self.host, self.port), timeout=0.2) as raw:
            s = raw
            if self.tls is not None:
                ctx = ssl.create_default_context(cafile=self.tls.cert_file)
                if self.tls_clients:
                    ctx.load_cert_chain(self.tls.cert_file, self.tls.key_file)
                s = ctx.wrap_socket(raw, server_hostname=self.host)
            s.sendall(b"PING\r\n")
            return s.recv(16).startswith(b"+PONG")


__all__ = ["RedisProcess", "free_port"]
