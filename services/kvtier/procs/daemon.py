"""A cache daemon (``kvtier serve``) as a private child process, for the benchmarks and tests
that need daemons of their own: two nodes sharing one Redis Cluster, a daemon killed and
started again.

Its settings are written to a JSON config file in its directory; ``KVTIER_*`` variables of this
process are not passed on (the config says everything), other variables are. It listens on
free loopback ports (gRPC and HTTP) and is ready once it prints ``kvtier: ready``.
"""

from __future__ import annotations

import json
import os
import sys
from typing import Any

from kvtier.procs.child import ChildProcess, free_port


class DaemonProcess(ChildProcess):
    """``python -m kvtier.cli serve`` with ``settings`` (a dict of Settings fields)."""

    program = "kvtier"
    install_hint = "install kvtier"
    stop_timeout_s = 15.0

    def __init__(self, settings: dict[str, Any], host: str = "127.0.0.1",
                 extra_env: dict[str, str] | None = None) -> None:
        super().__init__(None, host, binary=sys.executable)
        self.http_port = free_port(host)
        self.settings = {**settings, "grpc_host": host, "grpc_port": self.port,
                         "http_host": host, "http_port": self.http_port}
        self.config_path = self.workdir / "kvtier.json"
        self.config_path.write_text(json.dumps(self.settings))
        self._extra_env = dict(extra_env or {})

    @property
    def address(self) -> str:
        return f"{self.host}:{self.port}"

    @property
    def http_url(self) -> str:
        return f"http://{self.host}:{self.http_port}"

    def argv(self) -> list[str]:
        return [self.binary, "-m", "kvtier.cli", "serve", "--config", str(self.config_path)]

    def env(self) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items() if not k.startswith("KVTIER_")}
        env.update(self._extra_env)
        return env

    def ready(self) -> bool:
        return "kvtier: ready" in self.log_tail()

    def log_tail(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")[-4000:]
        except OSError:
            return ""

    def start(self, timeout_s: float = 180.0) -> DaemonProcess:
        """Start and wait until it serves (the first start in a fresh environment compiles
        the codec kernels: tens of seconds)."""
        self._truncate_log()
        super().start(timeout_s)
        return self

    def _truncate_log(self) -> None:
        if self.log_path.exists():  # a restart: "ready" must come from the new process
            self.log_path.write_text("")
