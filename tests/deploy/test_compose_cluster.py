"""deploy/compose.cluster.yml (a Redis Cluster and two daemons) agrees with the code.

Checked like docker-compose.yml, without a container engine: `docker-compose config` validates
and resolves the base file with the overlay; each daemon's KVTIER_ variables build Settings in
cluster mode, sharing new pages, on a node of the cluster; the nodes run in cluster mode with
the settings kvtier relies on (a dead shard fails its own slots only; allkeys-lru under
maxmemory is the shared tier's capacity); the cluster is formed from every node before any
daemon starts; ports, healthchecks and commands match.
"""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest

from kvtier.cli import build_parser

from .test_compose import (
    COMPOSE, COMPOSE_ENV, ROOT, _compose_config, _env, _published, _settings_from_env,
)

OVERLAY = ROOT / "deploy" / "compose.cluster.yml"
NODES = ("redis", "redis-2", "redis-3", "redis-4", "redis-5", "redis-6")
DAEMONS = ("kvtier-daemon", "kvtier-daemon-2")


@pytest.fixture(scope="module")
def merged() -> dict[str, Any]:
    return _compose_config(COMPOSE, OVERLAY)


def _flag(command: list[str], name: str) -> str:
    return command[command.index(name) + 1]


def test_overlay_validates() -> None:
    exe = shutil.which("docker-compose")
    if exe is None:
        pytest.skip("docker-compose is not installed")
    ok = subprocess.run([exe, "-f", str(COMPOSE), "-f", str(OVERLAY), "config", "-q"],
                        cwd=ROOT, env={"PATH": "/usr/bin:/bin", **COMPOSE_ENV},
                        capture_output=True, text=True, timeout=60)
    assert ok.returncode == 0, ok.stderr


def test_nodes_run_in_cluster_mode(merged: dict[str, Any]) -> None:
    services = merged["services"]
    for name in NODES:
        command = services[name]["command"]
        assert command[0] == "redis-server"
        assert _flag(command, "--cluster-enabled") == "yes"
        assert _flag(command, "--cluster-require-full-coverage") == "no"
        assert _flag(command, "--maxmemory-policy") == "allkeys-lru"
        assert _flag(command, "--maxmemory")
        assert "healthcheck" in services[name]
        assert any(str(v).endswith(":/data") or str(v).endswith(":/data:rw")
                   or (isinstance(v, dict) and v.get("target") == "/data")
                   for v in services[name]["volumes"]), f"{name} keeps nodes.conf"


def test_the_cluster_is_formed_from_every_node_before_the_daemons(
        merged: dict[str, Any]) -> None:
    services = merged["services"]
    init = services["redis-cluster-init"]
    script = " ".join(init["command"])
    assert "--cluster create" in script and "--cluster-replicas 1" in script
    assert all(f" {n} " in f" {script} " or f" {n};" in script for n in NODES)
    assert {n: init["depends_on"][n]["condition"] for n in NODES} == dict.fromkeys(
        NODES, "service_healthy")
    for name in DAEMONS:
        deps = services[name]["depends_on"]
        assert deps["redis-cluster-init"]["condition"] == "service_completed_successfully"


@pytest.mark.parametrize("name", DAEMONS)
def test_daemons_share_the_cluster(merged: dict[str, Any], name: str,
                                   monkeypatch: pytest.MonkeyPatch) -> None:
    svc = merged["services"][name]
    args = build_parser().parse_args(svc["command"][1:])
    assert callable(args.func)
    s = _settings_from_env(_env(svc), monkeypatch)
    assert s.redis.cluster is True and s.redis.share_puts is True
    assert s.redis.url is not None
    host = s.redis.url.removeprefix("redis://").split(":")[0]
    assert host in NODES
    assert _published(svc) == {s.grpc_port, s.http_port}
    health = " ".join(svc["healthcheck"]["test"])
    assert f"127.0.0.1:{s.http_port}/readyz" in health
    assert s.admin_token == COMPOSE_ENV["KVTIER_ADMIN_TOKEN"]


def test_the_two_daemons_publish_different_ports(merged: dict[str, Any]) -> None:
    a, b = (_published(merged["services"][n]) for n in DAEMONS)
    assert a and b and not a & b
    build = merged["services"]["kvtier-daemon-2"]["build"]
    assert Path(build["context"]).resolve() == ROOT.resolve()
    assert (ROOT / build["dockerfile"]).is_file()
