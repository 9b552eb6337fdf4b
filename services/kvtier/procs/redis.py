"""Start and stop a local ``redis-server`` on a free port (for ``kvtier up``, benches, tests)."""

from __future__ import annotations

import socket

from kvtier.procs.child import ChildProcess, free_port


class RedisProcess(ChildProcess):
    """A private redis-server child process. Nothing persisted unless ``data_dir`` is given."""

    program = "redis-server"
    install_hint = ("install it (Debian: apt-get install redis-server) or configure "
                    "KVTIER_REDIS__URL")

    def __init__(self, port: int | None = None, host: str = "127.0.0.1",
                 binary: str | None = None, data_dir: str | None = None) -> None:
        super().__init__(port, host, binary)
        self.data_dir = data_dir or str(self.workdir)

    @property
    def url(self) -> str:
        return f"redis://{self.host}:{self.port}/0"

    def argv(self) -> list[str]:
        return [self.binary, "--port", str(self.port), "--bind", self.host, "--save", "",
                "--appendonly", "no", "--dir", self.data_dir, "--protected-mode", "no"]

    def ready(self) -> bool:
        with socket.create_connection((self.host, self.port), timeout=0.2) as s:
            s.sendall(b"PING\r\n")
            return s.recv(16).startswith(b"+PONG")


__all__ = ["RedisProcess", "free_port"]
