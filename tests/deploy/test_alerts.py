"""deploy/kvtier-alerts.yml: the alerts fire when they should and stay quiet otherwise.

Checked with ``promtool test rules`` (Debian's prometheus package): synthetic series go in, the
alerts expected at each evaluation time must come out, labels and annotations included.
"""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
ALERTS = ROOT / "deploy" / "kvtier-alerts.yml"
D = 'instance="d:8080",job="kvtier-daemon"'
LABELS = {"instance": "d:8080", "job": "kvtier-daemon"}


def alert(name: str, at: str, expected: list[dict[str, Any]]) -> dict[str, Any]:
    return {"eval_time": at, "alertname": name, "exp_alerts": expected}


def firing(severity: str, summary: str, description: str | None = None,
           **labels: str) -> dict[str, Any]:
    annotations = {"summary": summary}
    if description is not None:
        annotations["description"] = description
    return {"exp_labels": {**labels, "severity": severity}, "exp_annotations": annotations}


REDIS_DOWN_DESC = (
    "Redis-only pages answer as misses; demotions into Redis wait in the tier above until it "
    "is full, then evict with reason remote_down."
)

TESTS: list[dict[str, Any]] = [
    {  # Redis down for longer than a minute; the daemon up the whole time.
        "interval": "1m",
        "input_series": [
            {"series": f"kvtier_redis_up{{{D}}}", "values": "1 1 0 0 0 0"},
            {"series": f"up{{{D}}}", "values": "1 1 1 1 1 1"},
        ],
        "alert_rule_test": [
            alert("KVTierRedisDown", "1m", []),
            alert("KVTierRedisDown", "2m", []),  # pending: not yet down for 1m
            alert("KVTierRedisDown", "4m", [firing(
                "critical", "Redis tier unreachable from d:8080", REDIS_DOWN_DESC, **LABELS)]),
            alert("KVTierDaemonDown", "5m", []),
        ],
    },
    {  # A shard of the Redis Cluster fails over in seconds (quiet), then one stays down.
        "interval": "1m",
        "input_series": [
            {"series": f"kvtier_redis_unavailable_slots{{{D}}}",
             "values": "0 5461 0 0 5461 5461 5461 5461"},
            {"series": f"kvtier_redis_up{{{D}}}", "values": "1 1 1 1 1 1 1 1"},
        ],
        "alert_rule_test": [
            alert("KVTierRedisShardDown", "2m", []),
            alert("KVTierRedisShardDown", "5m", []),  # pending: not yet down for 2m
            alert("KVTierRedisShardDown", "7m", [firing(
                "warning", "5461 Redis Cluster slots unavailable from d:8080",
                "Pages in those slots answer as misses, the other shards serve. A failover "
                "takes seconds; slots down this long have no replica to take over.", **LABELS)]),
            alert("KVTierRedisDown", "7m", []),
        ],
    },
    {  # The daemon stops answering.
        "interval": "1m",
        "input_series": [{"series": f"up{{{D}}}", "values": "1 0 0 0"}],
        "alert_rule_test": [
            alert("KVTierDaemonDown", "3m", [firing(
                "critical", "kvtier daemon d:8080 is not answering /metrics",
                "Workers fall back to recomputing prefill while the daemon is down.",
                **LABELS)]),
        ],
    },
    {  # Fallback for 20 minutes; a tier stuck above 98%; another comfortably below.
        "interval": "1m",
        "input_series": [
            {"series": f"kvtier_policy_fallback_active{{{D}}}", "values": "1x20"},
            {"series": f'kvtier_tier_bytes{{{D},tier="hot"}}', "values": "99x20"},
            {"series": f'kvtier_tier_capacity_bytes{{{D},tier="hot"}}', "values": "100x20"},
            {"series": f'kvtier_tier_bytes{{{D},tier="warm"}}', "values": "50x20"},
            {"series": f'kvtier_tier_capacity_bytes{{{D},tier="warm"}}', "values": "100x20"},
        ],
        "alert_rule_test": [
            alert("KVTierPolicyFallback", "10m", []),
            alert("KVTierPolicyFallback", "16m", [firing(
                "warning", "kvtier policy on d:8080 has been in fallback (LRU) for 15m",
                "The policy service is slow, down or its predictor is untrained.",
                instance="d:8080")]),
            alert("KVTierTierFull", "5m", []),
            alert("KVTierTierFull", "11m", [firing(
                "warning", "tier hot on d:8080 is above 98% for 10m",
                "The mover is not keeping the tier under its high watermark.",
                tier="hot", **LABELS)]),
        ],
    },
    {  # One corrupt page; evictions because Redis is down.
        "interval": "1m",
        "input_series": [
            {"series": f'kvtier_tier_evictions_total{{{D},tier="cold",reason="corrupt"}}',
             "values": "0 0 1 1 1"},
            {"series": f'kvtier_tier_evictions_total{{{D},tier="cold",reason="remote_down"}}',
             "values": "0+10x10"},
            {"series": f'kvtier_tier_evictions_total{{{D},tier="cold",reason="capacity"}}',
             "values": "0+100x10"},
        ],
        "alert_rule_test": [
            alert("KVTierCorruptPages", "1m", []),
            alert("KVTierCorruptPages", "3m", [firing(
                "critical", "pages failed their checksum on d:8080 and were dropped",
                instance="d:8080")]),
            alert("KVTierRemoteDownEvictions", "8m", [firing(
                "critical", "pages evicted because Redis is down on d:8080",
                instance="d:8080")]),
        ],
    },
    {  # 9% of calls fail with INTERNAL: alert. Bad input from clients is not an outage.
        "interval": "1m",
        "input_series": [
            {"series": f'kvtier_rpc_duration_seconds_count{{{D},method="Get",code="OK"}}',
             "values": "0+100x20"},
            {"series": f'kvtier_rpc_duration_seconds_count{{{D},method="Get",code="INTERNAL"}}',
             "values": "0+10x20"},
            {"series": 'kvtier_rpc_duration_seconds_count{instance="e:8080",job="kvtier-daemon",'
                       'method="Put",code="OK"}', "values": "0+100x20"},
            {"series": 'kvtier_rpc_duration_seconds_count{instance="e:8080",job="kvtier-daemon",'
                       'method="Put",code="INVALID_ARGUMENT"}', "values": "0+50x20"},
        ],
        "alert_rule_test": [
            alert("KVTierRpcErrors", "12m", [firing(
                "warning", "more than 5% of gRPC calls fail on d:8080", instance="d:8080")]),
        ],
    },
    {  # A client keeps calling with a revoked token: its own alert, not an outage.
        "interval": "1m",
        "input_series": [
            {"series": f'kvtier_rpc_duration_seconds_count{{{D},method="Get",code="OK"}}',
             "values": "0+6000x20"},
            {"series": f'kvtier_rpc_duration_seconds_count{{{D},method="Get",'
                       'code="UNAUTHENTICATED"}', "values": "0+600x20"},
            {"series": f'kvtier_rpc_duration_seconds_count{{{D},method="Put",'
                       'code="PERMISSION_DENIED"}', "values": "0+30x20"},
        ],
        "alert_rule_test": [
            alert("KVTierRpcErrors", "16m", []),
            alert("KVTierAuthFailures", "5m", []),  # pending for 10m first
            alert("KVTierAuthFailures", "16m", [firing(
                "warning", "gRPC calls refused for their token on d:8080",
                "A client with a wrong, revoked or read-only token, or someone trying tokens; "
                "kvtier_rpc_duration_seconds_count says which methods (by method and code).",
                instance="d:8080")]),
        ],
    },
]


def test_alert_rules_are_valid() -> None:
    promtool = shutil.which("promtool")
    if promtool is None:
        pytest.skip("promtool is not installed (make system-deps installs prometheus)")
    out = subprocess.run([promtool, "check", "rules", str(ALERTS)], capture_output=True,
                         text=True, timeout=60)
    assert out.returncode == 0, out.stdout + out.stderr
    names = {r["alert"] for g in yaml.safe_load(ALERTS.read_text())["groups"]
             for r in g["rules"]}
    tested = {t["alertname"] for case in TESTS for t in case["alert_rule_test"]}
    assert tested <= names
    assert names - tested <= {"KVTierPolicyEventsDropped"}, names - tested


def test_alerts_fire_when_they_should(tmp_path: Path) -> None:
    promtool = shutil.which("promtool")
    if promtool is None:
        pytest.skip("promtool is not installed (make system-deps installs prometheus)")
    spec = {"rule_files": [str(ALERTS)], "evaluation_interval": "1m", "tests": TESTS}
    path = tmp_path / "alerts_test.yml"
    path.write_text(yaml.safe_dump(spec, sort_keys=False))
    out = subprocess.run([promtool, "test", "rules", str(path)], capture_output=True,
                         text=True, timeout=60)
    assert out.returncode == 0, out.stdout + out.stderr
    assert "SUCCESS" in out.stdout
