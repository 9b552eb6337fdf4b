"""A local Prometheus for ``kvtier up --monitoring``, scraping the daemon and the policy service.

:func:`scrape_config` is the one definition of what Prometheus scrapes; ``deploy/prometheus.yml``
is the same configuration with the docker-compose service names as targets (a test checks they
agree). The config is written as JSON, which Prometheus reads as YAML, so no YAML library is
needed at run time.

:class:`PrometheusProcess` runs Debian's ``prometheus`` binary as a child process on a free
loopback port with its TSDB in a temporary directory, the way
:class:`kvtier.cli.redis_proc.RedisProcess` runs ``redis-server``. :class:`LocalMonitoring` is
what ``kvtier up --monitoring`` uses: the scrape config pointed at the local ports, one
Prometheus started once the daemon's HTTP port is known, and where to look printed.
"""

from __future__ import annotations

import json
import shutil
import socket
import subprocess
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from kvtier.config import Settings

DAEMON_JOB = "kvtier-daemon"
POLICY_JOB = "kvtier-policy"


def _duration(seconds: float) -> str:
    ms = int(round(seconds * 1000))
    if ms <= 0:
        raise ValueError(f"scrape interval must be positive, got {seconds}")
    return f"{ms // 1000}s" if ms % 1000 == 0 else f"{ms}ms"


def scrape_config(daemon_targets: Sequence[str], policy_targets: Sequence[str] = (),
                  interval_s: float = 5.0, rule_files: Sequence[str] = ()) -> dict[str, Any]:
    """Prometheus configuration scraping ``/metrics`` of daemons and policy services.

    ``rule_files`` are paths relative to the config file (``deploy/prometheus.yml`` loads
    ``kvtier-alerts.yml`` beside it).
    """
    jobs: list[dict[str, Any]] = []
    for job, targets in ((DAEMON_JOB, daemon_targets), (POLICY_JOB, policy_targets)):
        if targets:
            jobs.append({
                "job_name": job,
                "metrics_path": "/metrics",
                "static_configs": [{"targets": list(targets)}],
            })
    interval = _duration(interval_s)
    config: dict[str, Any] = {
        "global": {"scrape_interval": interval, "evaluation_interval": interval},
    }
    if rule_files:
        config["rule_files"] = list(rule_files)
    config["scrape_configs"] = jobs
    return config


def _free_port(host: str) -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


class PrometheusProcess:
    """A private ``prometheus`` child process. Its data lives in a temporary directory."""

    def __init__(self, config: dict[str, Any], port: int | None = None,
                 host: str = "127.0.0.1", binary: str | None = None) -> None:
        found = binary or shutil.which("prometheus")
        if found is None:
            raise FileNotFoundError(
                "prometheus not found on PATH; install it (Debian: apt-get install prometheus) "
                "or run without --monitoring"
            )
        self.binary = found
        self.host = host
        self.port = port or _free_port(host)
        self._tmp = tempfile.TemporaryDirectory(prefix="kvtier-prometheus-")
        self.config_path = Path(self._tmp.name) / "prometheus.yml"
        self.config_path.write_text(json.dumps(config, indent=2))
        self.log_path = Path(self._tmp.name) / "prometheus.log"
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    def start(self, timeout_s: float = 30.0) -> PrometheusProcess:
        """Start and wait until ``/-/ready`` answers; raise with the log tail if it does not."""
        if self.proc is not None and self.proc.poll() is None:
            return self
        with open(self.log_path, "wb") as log_file:
            self.proc = subprocess.Popen(
                [self.binary, f"--config.file={self.config_path}",
                 f"--storage.tsdb.path={Path(self._tmp.name) / 'data'}",
                 f"--web.listen-address={self.host}:{self.port}",
                 "--storage.tsdb.retention.time=1d", "--log.level=warn"],
                stdout=log_file, stderr=subprocess.STDOUT,
            )
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(
                    f"prometheus exited with {self.proc.returncode}: {self._log_tail()}"
                )
            try:
                with urllib.request.urlopen(f"{self.url}/-/ready", timeout=1) as r:
                    if r.status == 200:
                        return self
            except (urllib.error.URLError, OSError):
                pass
            time.sleep(0.1)
        self.stop()
        raise TimeoutError(f"prometheus not ready on port {self.port}: {self._log_tail()}")

    def _log_tail(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")[-2000:]
        except OSError:
            return ""

    def stop(self) -> None:
        if self.proc is None:
            return
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.proc = None

    def close(self) -> None:
        self.stop()
        self._tmp.cleanup()

    def __enter__(self) -> PrometheusProcess:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.close()


def _loopback_for(host: str) -> str:
    """Where to scrape a server bound to ``host``: wildcard binds are reached on loopback."""
    return "127.0.0.1" if host in ("", "0.0.0.0", "::", "[::]") else host


class LocalMonitoring:
    """``kvtier up --monitoring``: a local Prometheus over the daemon (and policy service).

    :meth:`start` is called once the daemon's HTTP port is known; it prints where to look. If
    Debian's ``prometheus`` is not installed it says so and the daemon runs on without it.
    """

    def __init__(self, settings: Settings, preferred_port: int = 9090,
                 interval_s: float = 5.0) -> None:
        self.settings = settings
        self.preferred_port = preferred_port
        self.interval_s = interval_s
        self.process: PrometheusProcess | None = None

    def config(self, http_port: int) -> dict[str, Any]:
        s = self.settings
        daemon = f"{_loopback_for(s.http_host)}:{http_port}"
        policy: list[str] = []
        if s.policy.address:
            policy_host = s.policy.address.rsplit(":", 1)[0]
            policy = [f"{_loopback_for(policy_host)}:{s.policy_http_port}"]
        return scrape_config([daemon], policy, interval_s=self.interval_s)

    def start(self, http_port: int | None) -> PrometheusProcess | None:
        if http_port is None:
            print("kvtier: monitoring: the daemon serves no HTTP, nothing to scrape", flush=True)
            return None
        config = self.config(http_port)
        try:
            port = self.preferred_port if _port_free("127.0.0.1", self.preferred_port) else None
            self.process = PrometheusProcess(config, port=port).start()
        except (FileNotFoundError, RuntimeError, TimeoutError) as e:
            print(f"kvtier: monitoring not started: {e}", flush=True)
            return None
        targets = [t for job in config["scrape_configs"]
                   for t in job["static_configs"][0]["targets"]]
        url = self.process.url
        print(f"kvtier: Prometheus {url} (scraping {', '.join(targets)} every "
              f"{config['global']['scrape_interval']})", flush=True)
        print(f"kvtier:   targets {url}/targets ; occupancy {url}/graph?g0.expr="
              "kvtier_tier_bytes%20%2F%20kvtier_tier_capacity_bytes", flush=True)
        print("kvtier:   Grafana dashboard: deploy/grafana/dashboards/kvtier.json "
              f"(datasource: Prometheus at {url})", flush=True)
        return self.process

    def close(self) -> None:
        if self.process is not None:
            self.process.close()
            self.process = None


def _port_free(host: str, port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        try:
            s.bind((host, port))
        except OSError:
            return False
        return True
