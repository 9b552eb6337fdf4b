"""docker-compose.yml and deploy/ agree with the code.

No container engine runs here, so these tests check the files against the code instead of
running them: `docker-compose config` validates and resolves the compose file, every service
command parses with the real CLI parser, every KVTIER_ variable builds a valid Settings whose
ports are the ports the compose file publishes and Prometheus scrapes, `promtool` validates the
scrape config, and every file the stack mounts exists.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml

from kvtier.procs.prometheus import DAEMON_JOB, POLICY_JOB, scrape_config
from kvtier.cli import build_parser
from kvtier.config import Settings

ROOT = Path(__file__).resolve().parents[2]
COMPOSE = ROOT / "docker-compose.yml"
GPU_OVERLAY = ROOT / "deploy" / "compose.gpu.yml"
PROMETHEUS_YML = ROOT / "deploy" / "prometheus.yml"
KVTIER_SERVICES = ("kvtier-daemon", "kvtier-policy")
COMPOSE_ENV = {"KVTIER_ADMIN_TOKEN": "compose-test-token",
               "KVTIER_POLICY__TOKEN": "compose-policy-token"}


def _compose_config(*files: Path, env: dict[str, str] | None = None) -> dict[str, Any]:
    exe = shutil.which("docker-compose")
    if exe is None:
        pytest.skip("docker-compose is not installed (make system-deps installs it)")
    args = [exe]
    for f in files:
        args += ["-f", str(f)]
    run_env = {k: v for k, v in os.environ.items() if not k.startswith("KVTIER_")}
    run_env.update(env if env is not None else COMPOSE_ENV)
    out = subprocess.run(
        args + ["config"], cwd=ROOT, env=run_env, capture_output=True, text=True, timeout=60
    )
    assert out.returncode == 0, out.stderr
    resolved: dict[str, Any] = yaml.safe_load(out.stdout)
    return resolved


@pytest.fixture(scope="module")
def compose() -> dict[str, Any]:
    return _compose_config(COMPOSE)


def _env(service: dict[str, Any]) -> dict[str, str]:
    env = service.get("environment", {})
    if isinstance(env, list):
        env = dict(e.split("=", 1) for e in env)
    return {k: str(v) for k, v in env.items()}


def _settings_from_env(env: dict[str, str], monkeypatch: pytest.MonkeyPatch) -> Settings:
    for key in list(os.environ):
        if key.startswith("KVTIER_"):
            monkeypatch.delenv(key)
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    return Settings()


def _volume(v: Any) -> tuple[str, str]:
    """(source, target) of a volume in short ("src:dst[:mode]") or long syntax."""
    if isinstance(v, dict):
        return str(v.get("source", "")), str(v["target"])
    src, dst = str(v).split(":")[:2]
    return src, dst


def _published(service: dict[str, Any]) -> set[int]:
    ports = set()
    for p in service.get("ports", []):
        if isinstance(p, dict):
            ports.add(int(p["target"]))
        else:
            ports.add(int(str(p).split(":")[-1].split("/")[0]))
    return ports


def test_compose_file_validates() -> None:
    exe = shutil.which("docker-compose")
    if exe is None:
        pytest.skip("docker-compose is not installed")
    env = {k: v for k, v in os.environ.items() if not k.startswith("KVTIER_")}
    ok = subprocess.run([exe, "config", "-q"], cwd=ROOT, env={**env, **COMPOSE_ENV},
                        capture_output=True, text=True, timeout=60)
    assert ok.returncode == 0, ok.stderr
    # The admin and policy tokens are mandatory: without either the file does not resolve.
    for name in COMPOSE_ENV:
        partial = {k: v for k, v in COMPOSE_ENV.items() if k != name}
        missing = subprocess.run([exe, "config", "-q"], cwd=ROOT, env={**env, **partial},
                                 capture_output=True, text=True, timeout=60)
        assert missing.returncode != 0
        assert name in missing.stderr


def test_stack_has_the_five_services(compose: dict[str, Any]) -> None:
    assert set(compose["services"]) == {
        "redis", "kvtier-daemon", "kvtier-policy", "prometheus", "grafana"
    }
    redis = compose["services"]["redis"]
    assert ("redis-data", "/data") in [_volume(v) for v in redis["volumes"]], (
        "redis keeps its data in a named volume"
    )
    assert "redis-data" in compose["volumes"]


@pytest.mark.parametrize("name", KVTIER_SERVICES)
def test_service_command_is_a_real_cli_command(compose: dict[str, Any], name: str) -> None:
    command = compose["services"][name]["command"]
    assert command[0] == "kvtier"
    args = build_parser().parse_args(command[1:])  # SystemExit (a failure) if not a command
    assert callable(args.func)


def test_dockerfile_default_command_is_a_real_cli_command() -> None:
    text = (ROOT / "deploy" / "Dockerfile").read_text()
    entry = re.search(r'^ENTRYPOINT \["kvtier"\]', text, re.M)
    cmd = re.search(r"^CMD (\[.*\])$", text, re.M)
    assert entry and cmd
    args = build_parser().parse_args(yaml.safe_load(cmd.group(1)))
    assert callable(args.func)


@pytest.mark.parametrize("name", KVTIER_SERVICES)
def test_kvtier_variables_are_settings(
    compose: dict[str, Any], name: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    env = _env(compose["services"][name])
    kv = {k: v for k, v in env.items() if k.startswith("KVTIER_")}
    assert kv, f"{name} is configured through KVTIER_ variables"
    # Settings forbids unknown fields, so a misspelt variable fails here; check each value
    # landed where its name says.
    settings = _settings_from_env(kv, monkeypatch)
    for key, value in kv.items():
        path = key.removeprefix("KVTIER_").lower().split("__")
        obj: Any = settings
        for part in path:
            assert hasattr(obj, part), f"{key} is not a Settings field"
            obj = getattr(obj, part)
        assert str(obj) == value or str(obj).lower() == value.lower(), (key, obj, value)


def test_daemon_ports_match_settings(
    compose: dict[str, Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    svc = compose["services"]["kvtier-daemon"]
    s = _settings_from_env(_env(svc), monkeypatch)
    assert _published(svc) == {s.grpc_port, s.http_port}
    assert s.grpc_host == "0.0.0.0" and s.http_host == "0.0.0.0"
    assert s.redis.url is not None and s.redis.url.startswith("redis://redis:")
    assert s.policy.address is not None and s.policy.address.startswith("kvtier-policy:")
    assert s.admin_token == COMPOSE_ENV["KVTIER_ADMIN_TOKEN"]
    assert s.auth.tokens_file and s.policy.token == COMPOSE_ENV["KVTIER_POLICY__TOKEN"]
    volumes = [_volume(v) for v in svc.get("volumes", [])]
    assert any(s.auth.tokens_file.startswith(dst + "/") for _, dst in volumes)
    health = " ".join(svc["healthcheck"]["test"])
    assert f"127.0.0.1:{s.http_port}/readyz" in health


def test_policy_ports_match_settings(
    compose: dict[str, Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    svc = compose["services"]["kvtier-policy"]
    s = _settings_from_env(_env(svc), monkeypatch)
    assert _published(svc) == {s.policy_grpc_port, s.policy_http_port}
    daemon = _settings_from_env(_env(compose["services"]["kvtier-daemon"]), monkeypatch)
    assert daemon.policy.address == f"kvtier-policy:{s.policy_grpc_port}"
    health = " ".join(svc["healthcheck"]["test"])
    assert "grpc_health" in health and f"127.0.0.1:{s.policy_grpc_port}" in health


def test_depends_on_uses_conditions(compose: dict[str, Any]) -> None:
    services = compose["services"]
    daemon_deps = services["kvtier-daemon"]["depends_on"]
    assert daemon_deps["redis"]["condition"] == "service_healthy"
    assert "condition" in daemon_deps["kvtier-policy"]
    for name, svc in services.items():
        for dep, spec in svc.get("depends_on", {}).items():
            assert dep in services, f"{name} depends on unknown service {dep}"
            assert spec["condition"] in {"service_started", "service_healthy"}
            if spec["condition"] == "service_healthy":
                assert "healthcheck" in services[dep], f"{dep} needs a healthcheck"


def test_prometheus_targets_are_the_services_and_ports(
    compose: dict[str, Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    prom = yaml.safe_load(PROMETHEUS_YML.read_text())
    daemon = _settings_from_env(_env(compose["services"]["kvtier-daemon"]), monkeypatch)
    policy = _settings_from_env(_env(compose["services"]["kvtier-policy"]), monkeypatch)
    want = scrape_config(
        [f"kvtier-daemon:{daemon.http_port}"], [f"kvtier-policy:{policy.policy_http_port}"],
        interval_s=5.0, rule_files=["kvtier-alerts.yml"],
    )
    # deploy/prometheus.yml is the local monitoring config with the compose service names.
    assert prom == want
    jobs = {j["job_name"]: j for j in prom["scrape_configs"]}
    assert set(jobs) == {DAEMON_JOB, POLICY_JOB}
    for job in jobs.values():
        for target in job["static_configs"][0]["targets"]:
            host, port = target.rsplit(":", 1)
            assert host in compose["services"]
            assert int(port) in _published(compose["services"][host])


def test_promtool_accepts_the_scrape_config() -> None:
    exe = shutil.which("promtool")
    if exe is None:
        pytest.skip("promtool is not installed (make system-deps installs prometheus)")
    out = subprocess.run([exe, "check", "config", str(PROMETHEUS_YML)],
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stdout + out.stderr


def _mounts(service: dict[str, Any]) -> list[tuple[str, str]]:
    """Bind mounts (host path, container path) of a service."""
    return [(src, dst) for src, dst in map(_volume, service.get("volumes", []))
            if src.startswith(("/", "."))]


def test_mounted_files_and_provisioning_paths_exist(compose: dict[str, Any]) -> None:
    services = compose["services"]
    container_to_host: dict[str, Path] = {}
    for name in ("prometheus", "grafana"):
        for src, dst in _mounts(services[name]):
            host = Path(src) if Path(src).is_absolute() else ROOT / src
            assert host.exists(), f"{name} mounts {src}, which does not exist"
            container_to_host[dst] = host
    prom_cfg = container_to_host["/etc/prometheus/prometheus.yml"]
    assert prom_cfg.resolve() == PROMETHEUS_YML.resolve()
    for rules in yaml.safe_load(PROMETHEUS_YML.read_text())["rule_files"]:
        # Relative to the config file, on the host and in the container alike.
        assert (PROMETHEUS_YML.parent / rules).is_file()
        mounted = container_to_host[f"/etc/prometheus/{rules}"]
        assert mounted.resolve() == (PROMETHEUS_YML.parent / rules).resolve()

    def host_path(container_path: str) -> Path:
        for dst, host in sorted(container_to_host.items(), key=lambda kv: -len(kv[0])):
            if container_path == dst or container_path.startswith(dst + "/"):
                return host / container_path[len(dst):].lstrip("/")
        raise AssertionError(f"{container_path} is not mounted into grafana")

    prov = host_path("/etc/grafana/provisioning")
    datasources = yaml.safe_load((prov / "datasources" / "kvtier.yml").read_text())
    ds = datasources["datasources"][0]
    assert ds["type"] == "prometheus"
    host, port = ds["url"].removeprefix("http://").split(":")
    assert host in services and int(port) in _published(services[host])

    providers = yaml.safe_load((prov / "dashboards" / "kvtier.yml").read_text())
    dash_dir = host_path(providers["providers"][0]["options"]["path"])
    assert (dash_dir / "kvtier.json").is_file()
    home = _env(services["grafana"])["GF_DASHBOARDS_DEFAULT_HOME_DASHBOARD_PATH"]
    assert host_path(home).is_file(), "Grafana's home dashboard is the kvtier dashboard"
    assert host_path(home).name == "kvtier.json"


def test_gpu_overlay_reserves_a_gpu_for_the_daemon() -> None:
    merged = _compose_config(COMPOSE, GPU_OVERLAY)
    daemon = merged["services"]["kvtier-daemon"]
    devices = daemon["deploy"]["resources"]["reservations"]["devices"]
    assert devices[0]["capabilities"] == ["gpu"]
    assert daemon["build"]["args"]["EXTRAS"] == "server,gpu"
    assert _env(daemon)["KVTIER_DEVICE"] == "cuda"
    assert "deploy" not in _compose_config(COMPOSE)["services"]["kvtier-daemon"]
