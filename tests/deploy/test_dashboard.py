"""The Grafana dashboard: the panels the issue asks for, valid PromQL, the provisioned datasource.

That every query returns data from a running daemon is tests/admin/test_prometheus_scrape.py.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
DASHBOARD = ROOT / "deploy" / "grafana" / "dashboards" / "kvtier.json"
DATASOURCES = ROOT / "deploy" / "grafana" / "provisioning" / "datasources" / "kvtier.yml"


@pytest.fixture(scope="module")
def dashboard() -> dict[str, Any]:
    loaded: dict[str, Any] = json.loads(DASHBOARD.read_text())
    return loaded


def _exprs(dashboard: dict[str, Any]) -> list[str]:
    return [t["expr"] for p in dashboard["panels"] for t in p.get("targets", [])]


def test_panels_cover_what_operators_need(dashboard: dict[str, Any]) -> None:
    assert dashboard["uid"] == "kvtier"
    by_title = {p["title"]: " ".join(t["expr"] for t in p["targets"])
                for p in dashboard["panels"]}
    want = {
        "occupancy": ("kvtier_tier_bytes", "kvtier_tier_capacity_bytes"),
        "hit ratio": ("kvtier_tier_hits_total", "kvtier_tier_misses_total"),
        "latency": ("histogram_quantile(0.5", "histogram_quantile(0.99",
                    "kvtier_rpc_duration_seconds_bucket"),
        "demotions": ("kvtier_tier_demotions_total", "kvtier_tier_promotions_total"),
        "evictions": ("kvtier_tier_evictions_total",),
        "redis": ("kvtier_redis_up",),
        "fallback": ("kvtier_policy_fallback_active",),
        "predictor": ("kvtier_policy_loss", "kvtier_policy_online_accuracy"),
    }
    for word, needles in want.items():
        panels = [exprs for title, exprs in by_title.items() if word in title.lower()]
        assert panels, f"no panel about {word}"
        for needle in needles:
            assert any(needle in exprs for exprs in panels), f"{word} panel lacks {needle}"
    latency = next(e for t, e in by_title.items() if "latency" in t.lower())
    assert 'method=~"Get|Put|DataGet|DataPut"' in latency


def test_panels_use_the_provisioned_datasource(dashboard: dict[str, Any]) -> None:
    ds = yaml.safe_load(DATASOURCES.read_text())["datasources"]
    uid = ds[0]["uid"]
    for panel in dashboard["panels"]:
        assert panel["datasource"]["uid"] == uid, panel["title"]
        assert panel["targets"], panel["title"]
        for target in panel["targets"]:
            assert target["datasource"]["uid"] == uid, panel["title"]
    ids = [p["id"] for p in dashboard["panels"]]
    assert len(set(ids)) == len(ids)
    for p in dashboard["panels"]:  # panels sit inside Grafana's 24-column grid
        g = p["gridPos"]
        assert 0 <= g["x"] and g["x"] + g["w"] <= 24 and g["h"] > 0


def test_every_query_is_valid_promql(dashboard: dict[str, Any], tmp_path: Path) -> None:
    promtool = shutil.which("promtool")
    if promtool is None:
        pytest.skip("promtool is not installed (make system-deps installs prometheus)")
    rules = [{"record": f"kvtier:dashboard_check:{i}",
              "expr": e.replace("$__rate_interval", "1m")}
             for i, e in enumerate(_exprs(dashboard))]
    path = tmp_path / "rules.yml"
    path.write_text(yaml.safe_dump({"groups": [{"name": "dashboard", "rules": rules}]}))
    out = subprocess.run([promtool, "check", "rules", str(path)], capture_output=True,
                         text=True, timeout=60)
    assert out.returncode == 0, out.stdout + out.stderr
    assert f"SUCCESS: {len(rules)} rules found" in out.stdout


def test_only_grafana_variables_it_defines(dashboard: dict[str, Any]) -> None:
    for expr in _exprs(dashboard):
        for var in re.findall(r"\$(\w+)", expr):
            assert var == "__rate_interval", f"undefined variable ${var} in {expr}"
