"""Per-namespace usage in /v1/stats (only what the caller may see) and in /metrics (top N and
"(other)"), and a put past a quota answered RESOURCE_EXHAUSTED over gRPC."""

from __future__ import annotations

import numpy as np
import pytest
from fastapi.testclient import TestClient

from kvtier.admin.app import create_app
from kvtier.config import Settings
from kvtier.daemon import Daemon
from kvtier.store.stats import OTHER_NAMESPACES
from kvtier_client import KVTierClient
from kvtier_client.errors import KVTierClientError

PAGE = (np.ones((1, 8, 1, 8), np.float16), np.ones((1, 8, 1, 8), np.float16), 0)
PAGE_BYTES = 256


@pytest.fixture()
def daemon() -> Daemon:
    d = Daemon(Settings(grpc_port=0, admin_token="admin-secret", quotas={
        "namespaces": {"small": {"bytes": 2 * PAGE_BYTES}}, "top_namespaces": 2})).start()
    yield d  # type: ignore[misc]
    d.stop(grace_s=0.5)


def test_quota_over_grpc_and_usage_in_stats_and_metrics(daemon: Daemon) -> None:
    with KVTierClient(daemon.grpc_address, "small", shared_memory=False) as c:
        big = (np.ones((1, 64, 1, 8), np.float16),) * 2 + (0,)
        with pytest.raises(KVTierClientError) as info:
            c.put([b"big"], [big])  # 2 KiB: more than the whole quota
        assert info.value.code == "RESOURCE_EXHAUSTED" and "quota" in info.value.message
        for i in range(5):
            c.put([b"k%d" % i], [PAGE])  # at the quota, its own oldest pages make room
        c.put([b"k%d" % i for i in range(3)], [PAGE] * 3, namespace="a")
        tiny = (np.ones((1, 2, 1, 8), np.float16),) * 2 + (0,)  # 64 bytes
        for ns in ("b", "c"):
            c.put([b"k"], [tiny], namespace=ns)
    http = TestClient(create_app(daemon.context))
    rows = http.get("/v1/stats", headers={"Authorization": "Bearer admin-secret"}).json()
    names = [r["name"] for r in rows["namespaces"]]
    assert names == ["a", "small", OTHER_NAMESPACES] and rows["quota_refusals"] == 1
    small = rows["namespaces"][1]
    assert small["bytes"] <= 2 * PAGE_BYTES and small["quota_bytes"] == 2 * PAGE_BYTES
    assert rows["namespaces"][2]["namespaces"] == 2
    anonymous = http.get("/v1/stats").json()
    assert anonymous["namespaces"] == [] and anonymous["tiers"]  # no names without a token
    text = http.get("/metrics").text
    assert 'kvtier_namespace_bytes{namespace="a",tier="hot"} 768.0' in text
    assert f'namespace="{OTHER_NAMESPACES}"' in text and 'namespace="b"' not in text
    assert 'kvtier_namespace_quota_bytes{namespace="small"} 512.0' in text
    assert "kvtier_quota_refusals_total 1.0" in text
    assert "kvtier_streams_open 0.0" in text
