"""A real Prometheus (Debian's binary) scrapes a running daemon; the dashboard's queries answer.

The daemon runs in-process (gRPC and HTTP on free ports, a real redis-server) beside a policy
service, a client drives traffic over gRPC while Prometheus scrapes both every 0.5 s, then every
PromQL expression of deploy/grafana/dashboards/kvtier.json goes through Prometheus's HTTP query
API and must return a non-empty result, and every alerting rule of deploy/kvtier-alerts.yml
evaluates without error. ``$__rate_interval`` is Grafana's; it becomes a window that holds
enough scrapes here.
"""

from __future__ import annotations

import json
import shutil
import threading
import time
import urllib.parse
import urllib.request
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from kvtier.admin.server import start_http
from kvtier.daemon import Daemon
from kvtier.procs.prometheus import DAEMON_JOB, POLICY_JOB, PrometheusProcess, scrape_config
from kvtier.store.policy import LRUPolicy, PageMeta, PolicyStatus
from kvtier.transport.policy.service import make_metrics_server, make_policy_server
from kvtier_client import KVTierClient, Page

from .conftest import PAGE_SHAPE, make_settings

ROOT = Path(__file__).resolve().parents[2]
DASHBOARD = ROOT / "deploy" / "grafana" / "dashboards" / "kvtier.json"
ALERTS = ROOT / "deploy" / "kvtier-alerts.yml"
RATE_WINDOW = "10s"

pytestmark = pytest.mark.skipif(
    shutil.which("prometheus") is None,
    reason="prometheus is not installed (make system-deps installs Debian's package)",
)


class TrainingPolicy(LRUPolicy):
    """LRU deciding, reporting predictor figures the way the learned policy does."""

    name = "learned"

    def score(self, pages: Sequence[PageMeta]) -> list[float]:
        return super().score(pages)

    def status(self) -> PolicyStatus:
        return PolicyStatus(name="learned", active="learned", fallback_active=False,
                               loss=0.4, online_accuracy=0.7)


def dashboard_exprs() -> list[tuple[str, str]]:
    dash = json.loads(DASHBOARD.read_text())
    return [(p["title"], t["expr"]) for p in dash["panels"] for t in p.get("targets", [])]


def query(prom: PrometheusProcess, expr: str) -> list[dict[str, Any]]:
    url = f"{prom.url}/api/v1/query?" + urllib.parse.urlencode({"query": expr})
    with urllib.request.urlopen(url, timeout=5) as r:
        body = json.loads(r.read())
    assert body["status"] == "success", (expr, body)
    result: list[dict[str, Any]] = body["data"]["result"]
    return result


@pytest.fixture()
def daemon(redis_url: str) -> Iterator[Daemon]:
    settings = make_settings(redis_url, http_port=0, grpc_port=0)
    d = Daemon(settings, policy=TrainingPolicy(), start_http=start_http).start()
    try:
        yield d
    finally:
        d.stop(grace_s=1.0)


@pytest.fixture()
def policy_service() -> Iterator[int]:
    """A policy service (gRPC + /metrics) as the kvtier-policy job; yields its HTTP port."""
    server, _port, servicer = make_policy_server(LRUPolicy(), "127.0.0.1", 0)
    httpd, http_port = make_metrics_server(servicer, "127.0.0.1", 0)
    server.start()
    web = threading.Thread(target=httpd.serve_forever, daemon=True)
    web.start()
    try:
        yield http_port
    finally:
        httpd.shutdown()
        server.stop(0).wait()


def drive_traffic(daemon: Daemon, stop: threading.Event, errors: list[BaseException]) -> None:
    """Puts, hits in several tiers, misses, demotions, promotions and deletes, in a loop."""
    try:
        _traffic(daemon, stop)
    except BaseException as e:  # reported by the test, not lost in a thread
        errors.append(e)


def _traffic(daemon: Daemon, stop: threading.Event) -> None:
    rng = np.random.default_rng(0)
    store = daemon.context.store
    ns = "prom"
    with KVTierClient(daemon.grpc_address, namespace=ns, shared_memory=False,
                      data_channel=False) as client:
        i = 0
        while not stop.is_set():
            keys = [f"k{i}-{j}".encode() for j in range(3)]
            pages = [Page(rng.standard_normal(PAGE_SHAPE).astype(np.float16),
                          rng.standard_normal(PAGE_SHAPE).astype(np.float16), 16 * j)
                     for j in range(3)]
            client.put(keys, pages)
            store.demote(ns, keys[1:2], "warm")
            store.demote(ns, keys[2:3], "remote")
            client.get(keys + [b"never-stored"])
            client.promote(keys[1:2], "hot")
            client.delete(keys[:1])
            i += 1
            stop.wait(0.05)


def test_every_dashboard_query_returns_data(daemon: Daemon, policy_service: int) -> None:
    exprs = dashboard_exprs()
    assert len(exprs) >= 10
    stop = threading.Event()
    errors: list[BaseException] = []
    traffic = threading.Thread(target=drive_traffic, args=(daemon, stop, errors), daemon=True)
    traffic.start()
    # The compose topology's two jobs; the daemon embeds its policy (the `kvtier up` default).
    config = scrape_config([f"127.0.0.1:{daemon.http_port}"],
                           [f"127.0.0.1:{policy_service}"], interval_s=0.5,
                           rule_files=[str(ALERTS)])
    try:
        with PrometheusProcess(config) as prom:
            deadline = time.monotonic() + 45
            empty = exprs
            while empty and time.monotonic() < deadline:
                time.sleep(1.0)
                empty = [(title, e) for title, e in exprs
                         if not query(prom, e.replace("$__rate_interval", RATE_WINDOW))]
            assert not empty, f"dashboard queries without data: {empty}"
            for job in (DAEMON_JOB, POLICY_JOB):
                up = query(prom, f'up{{job="{job}"}}')
                assert [float(r["value"][1]) for r in up] == [1.0], job
            # The series carry real numbers, not only NaN placeholders.
            ratio = query(prom, "sum by (tier) (rate(kvtier_tier_hits_total[10s]))")
            by_tier = {r["metric"]["tier"]: float(r["value"][1]) for r in ratio}
            assert not errors, errors
            assert by_tier["hot"] > 0 and by_tier["warm"] > 0 and by_tier["remote"] > 0, by_tier
            # The alerting rules evaluate cleanly against the real series.
            with urllib.request.urlopen(f"{prom.url}/api/v1/rules", timeout=5) as r:
                groups = json.loads(r.read())["data"]["groups"]
            rules = [rule for g in groups for rule in g["rules"]]
            assert len(rules) >= 8
            for rule in rules:
                assert rule["health"] == "ok", (rule["name"], rule.get("lastError"))
            firing = {rule["name"] for rule in rules if rule["state"] != "inactive"}
            assert not firing & {"KVTierDaemonDown", "KVTierRedisDown"}, firing
            p99 = query(prom, 'histogram_quantile(0.99, sum by (le) '
                              '(rate(kvtier_rpc_duration_seconds_bucket{method="Get"}[10s])))')
            assert 0 < float(p99[0]["value"][1]) < 10
    finally:
        stop.set()
        traffic.join(10)
