"""``kvtier up --monitoring``: a local Prometheus scraping the daemon, without containers."""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest

from kvtier.procs.prometheus import DAEMON_JOB, LocalMonitoring, scrape_config
from kvtier.procs.redis import free_port
from kvtier.config import Settings

ROOT = Path(__file__).resolve().parents[2]
needs_prometheus = pytest.mark.skipif(shutil.which("prometheus") is None,
                                      reason="prometheus is not installed")


def test_scrape_config_points_at_the_local_ports() -> None:
    s = Settings(http_host="0.0.0.0", policy={"address": "127.0.0.1:50052"},
                 policy_http_port=18081)
    assert LocalMonitoring(s).config(18080) == scrape_config(
        ["127.0.0.1:18080"], ["127.0.0.1:18081"], interval_s=5.0
    )
    embedded = LocalMonitoring(Settings(http_host="127.0.0.2"), interval_s=0.25).config(9)
    assert embedded["scrape_configs"] == [{
        "job_name": DAEMON_JOB, "metrics_path": "/metrics",
        "static_configs": [{"targets": ["127.0.0.2:9"]}],
    }]
    assert embedded["global"]["scrape_interval"] == "250ms"
    with pytest.raises(ValueError, match="positive"):
        scrape_config(["a:1"], interval_s=0)


class Up:
    """``kvtier up`` as a child process, its output read line by line."""

    def __init__(self, *extra: str, path: str | None = None) -> None:
        env = {k: v for k, v in os.environ.items() if not k.startswith("KVTIER_")}
        env.update(KVTIER_GRPC_PORT="0", KVTIER_HTTP_PORT=str(free_port()),
                   PYTHONUNBUFFERED="1")
        if path is not None:
            env["PATH"] = path
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "kvtier.cli", "up", *extra], cwd=ROOT, env=env,
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        )
        self.lines: list[str] = []

    def wait_for(self, pattern: str, timeout_s: float = 90.0) -> re.Match[str]:
        assert self.proc.stdout is not None
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            line = self.proc.stdout.readline()
            if not line:
                break
            self.lines.append(line)
            m = re.search(pattern, line)
            if m:
                return m
        raise AssertionError(f"no line matching {pattern!r}:\n{''.join(self.lines)}")

    def stop(self) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        try:
            rc = self.proc.wait(30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            rc = self.proc.wait()
        if self.proc.stdout is not None:
            self.lines.extend(self.proc.stdout.readlines())
        return rc


@pytest.fixture()
def up_processes() -> Iterator[list[Up]]:
    started: list[Up] = []
    yield started
    for up in started:
        up.stop()


def _query(url: str, expr: str) -> list[dict[str, object]]:
    q = f"{url}/api/v1/query?" + urllib.parse.urlencode({"query": expr})
    with urllib.request.urlopen(q, timeout=5) as r:
        result: list[dict[str, object]] = json.loads(r.read())["data"]["result"]
        return result


@needs_prometheus
def test_up_monitoring_scrapes_the_daemon(up_processes: list[Up]) -> None:
    up = Up("--monitoring")
    up_processes.append(up)
    prom = up.wait_for(r"Prometheus (http://\S+) \(scraping (\S+) every")
    url, target = prom.group(1), prom.group(2)
    http = re.search(r"kvtier: HTTP\s+(http://\S+)", "".join(up.lines))  # printed before
    assert http is not None and http.group(1).endswith(":" + target.rsplit(":", 1)[1])
    up.wait_for(r"kvtier: ready")
    deadline = time.monotonic() + 30
    samples: list[dict[str, object]] = []
    while time.monotonic() < deadline and not samples:
        samples = _query(url, f'up{{job="{DAEMON_JOB}"}} == 1')
        time.sleep(0.5)
    assert samples, "Prometheus never scraped the daemon"
    assert _query(url, "kvtier_tier_capacity_bytes"), "kvtier metrics reached Prometheus"
    assert up.stop() == 0
    with pytest.raises((urllib.error.URLError, OSError)):
        urllib.request.urlopen(f"{url}/-/ready", timeout=2)


def test_monitoring_without_prometheus_says_so(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("PATH", str(tmp_path))  # no prometheus binary anywhere
    monitoring = LocalMonitoring(Settings())
    assert monitoring.start(free_port()) is None  # `kvtier up` then serves on without it
    out = capsys.readouterr().out
    assert "monitoring not started" in out and "apt-get install prometheus" in out
    monitoring.close()
    assert LocalMonitoring(Settings()).start(None) is None
    assert "nothing to scrape" in capsys.readouterr().out
