"""Server binaries run as private child processes (``redis-server``, ``prometheus``).

``kvtier up``, the benchmarks and the tests start their own servers on free loopback ports, with
their files in a temporary directory, and stop them cleanly. :class:`ChildProcess` is that
lifecycle once; a subclass names the binary, its arguments and how to tell it is ready.
"""

from __future__ import annotations

import abc
import shutil
import socket
import subprocess
import tempfile
import time
from pathlib import Path
from typing import ClassVar, Self


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


class ChildProcess(abc.ABC):
    """One child server process; ``start`` waits until it answers, ``close`` removes its files."""

    program: ClassVar[str]  # the binary looked up on PATH
    install_hint: ClassVar[str]  # appended to the "not found" message
    stop_timeout_s: ClassVar[float] = 5.0

    def __init__(self, port: int | None = None, host: str = "127.0.0.1",
                 binary: str | None = None) -> None:
        found = binary or shutil.which(self.program)
        if found is None:
            raise FileNotFoundError(f"{self.program} not found on PATH; {self.install_hint}")
        self.binary = found
        self.host = host
        self.port = port or free_port(host)
        self._tmp = tempfile.TemporaryDirectory(prefix=f"kvtier-{self.program}-")
        self.workdir = Path(self._tmp.name)
        self.log_path = self.workdir / f"{self.program}.log"
        self.proc: subprocess.Popen[bytes] | None = None

    @abc.abstractmethod
    def argv(self) -> list[str]:
        """The command line, binary first."""

    @abc.abstractmethod
    def ready(self) -> bool:
        """True once the server answers; may raise OSError while it is still starting."""

    def start(self, timeout_s: float = 10.0) -> Self:
        """Start (if not running) and wait until ready; raise with the log tail otherwise."""
        if self.proc is not None and self.proc.poll() is None:
            return self
        with open(self.log_path, "ab") as log_file:
            self.proc = subprocess.Popen(self.argv(), stdout=log_file,
                                         stderr=subprocess.STDOUT)
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"{self.program} exited with {self.proc.returncode}: "
                                   f"{self.log_tail()}")
            try:
                if self.ready():
                    return self
            except OSError:
                pass
            time.sleep(0.05)
        self.stop()
        raise TimeoutError(f"{self.program} not ready on port {self.port}: {self.log_tail()}")

    def log_tail(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")[-2000:]
        except OSError:
            return ""

    def stop(self) -> None:
        """SIGTERM, then SIGKILL after ``stop_timeout_s``. The files stay until ``close``."""
        if self.proc is None:
            return
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(self.stop_timeout_s)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.proc = None

    def close(self) -> None:
        self.stop()
        self._tmp.cleanup()

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.close()
