"""A local Prometheus for ``kvtier up --monitoring``, scraping the daemon and the policy service.

:func:`scrape_config` is the one definition of what Prometheus scrapes; ``deploy/prometheus.yml``
is the same configuration with the docker-compose service names as targets (a test checks they
agree). The config is written as JSON, which Prometheus reads as YAML, so no YAML library is
needed at run time.

:class:`PrometheusProcess` runs Debian's ``prometheus`` binary as a child process on a free
loopback port with its TSDB in a temporary directory (a :class:`kvtier.procs.child.ChildProcess`,
like :class:`kvtier.procs.redis.RedisProcess`). :class:`LocalMonitoring` is what
``kvtier up --monitoring`` uses: the scrape config pointed at the local ports, one
Prometheus started once the daemon's HTTP port is known, and where to look printed.
"""

from __future__ import annotations

import json
import socket
import urllib.error
import urllib.request
from collections.abc import Sequence
from typing import Any

from kvtier.procs.child import ChildProcess
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


class PrometheusProcess(ChildProcess):
    """A private ``prometheus`` child process. Its data lives in a temporary directory."""

    program = "prometheus"
    install_hint = "install it (Debian: apt-get install prometheus) or run without --monitoring"
    stop_timeout_s = 10.0

    def __init__(self, config: dict[str, Any], port: int | None = None,
                 host: str = "127.0.0.1", binary: str | None = None) -> None:
        super().__init__(port, host, binary)
        self.config_path = self.workdir / "prometheus.yml"
        self.config_path.write_text(json.dumps(config, indent=2))

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    def argv(self) -> list[str]:
        return [self.binary, f"--config.file={self.config_path}",
                f"--storage.tsdb.path={self.workdir / 'data'}",
                f"--web.listen-address={self.host}:{self.port}",
                "--storage.tsdb.retention.time=1d", "--log.level=warn"]

    def ready(self) -> bool:
        try:
            with urllib.request.urlopen(f"{self.url}/-/ready", timeout=1) as r:
                return bool(r.status == 200)
        except urllib.error.URLError:
            return False

    def start(self, timeout_s: float = 30.0) -> PrometheusProcess:
        """Start and wait until ``/-/ready`` answers; raise with the log tail if it does not."""
        return super().start(timeout_s)


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
