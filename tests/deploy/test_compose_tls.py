"""deploy/compose.tls.yml and deploy/prometheus-tls.yml: the stack with TLS agrees with the code.

Checked without a container engine: the overlay validates and resolves with the base file; its
KVTIER_ variables build Settings with TLS on; the certificate made by the command in the
overlay's header is one the daemon's TLS setup loads; the healthchecks and Prometheus speak TLS
with that certificate as their CA; promtool accepts the HTTPS scrape configuration.
"""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest

from .test_compose import COMPOSE, ROOT, _compose_config, _env, _settings_from_env, _volume

OVERLAY = ROOT / "deploy" / "compose.tls.yml"
PROMETHEUS_TLS = ROOT / "deploy" / "prometheus-tls.yml"
CERT_IN_CONTAINER = "/etc/kvtier/tls/server.crt"


@pytest.fixture(scope="module")
def merged() -> dict[str, Any]:
    return _compose_config(COMPOSE, OVERLAY)


@pytest.mark.parametrize("name", ["kvtier-daemon", "kvtier-policy"])
def test_kvtier_services_serve_tls_from_the_mounted_pair(
        merged: dict[str, Any], name: str, monkeypatch: pytest.MonkeyPatch) -> None:
    service = merged["services"][name]
    env = {k: v for k, v in _env(service).items() if k.startswith("KVTIER_")}
    settings = _settings_from_env(env, monkeypatch)
    assert settings.tls.enabled and settings.tls.cert_file == CERT_IN_CONTAINER
    assert settings.tls.key_file == "/etc/kvtier/tls/server.key"
    assert settings.auth.tokens_file or name == "kvtier-policy"  # tokens stay on
    mounts = dict(_volume(v)[::-1] for v in service["volumes"])
    assert Path(mounts["/etc/kvtier/tls"]) == ROOT / "deploy" / "tls"
    check = " ".join(service["healthcheck"]["test"])
    assert CERT_IN_CONTAINER in check and ("https://" in check or "secure_channel" in check)


def test_prometheus_scrapes_over_https(merged: dict[str, Any]) -> None:
    mounts = {dst: src for src, dst in map(_volume, merged["services"]["prometheus"]["volumes"])}
    assert Path(mounts["/etc/prometheus/prometheus.yml"]) == PROMETHEUS_TLS
    text = PROMETHEUS_TLS.read_text()
    assert text.count("scheme: https") == 2
    assert "/etc/prometheus/tls/ca.crt" in mounts


def test_promtool_accepts_the_https_scrape_config() -> None:
    exe = shutil.which("promtool")
    if exe is None:
        pytest.skip("promtool is not installed (make system-deps installs prometheus)")
    out = subprocess.run([exe, "check", "config", "--syntax-only", str(PROMETHEUS_TLS)],
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stdout + out.stderr


def test_the_documented_openssl_command_makes_a_pair_the_daemon_loads(tmp_path: Path) -> None:
    if shutil.which("openssl") is None:
        pytest.skip("openssl is not installed")
    header = "".join(line[2:].strip() + " " for line in OVERLAY.read_text().splitlines()
                     if line.startswith("#   openssl") or line.startswith("#     -"))
    command = re.sub(r"\\\s*", "", header).replace("deploy/tls/", f"{tmp_path}/")
    assert command.startswith("openssl req")
    subprocess.run(command, shell=True, check=True, capture_output=True, timeout=60)

    from kvtier.config import TlsConfig
    from kvtier.transport.tls import server_credentials, ssl_server_context

    tls = TlsConfig(cert_file=str(tmp_path / "server.crt"), key_file=str(tmp_path / "server.key"))
    assert server_credentials(tls) is not None
    assert ssl_server_context(tls) is not None  # loads the pair: the key matches the cert
    san = subprocess.run(["openssl", "x509", "-in", str(tmp_path / "server.crt"), "-noout",
                          "-ext", "subjectAltName"], capture_output=True, text=True, check=True)
    for host in ("kvtier-daemon", "kvtier-policy"):
        assert f"DNS:{host}" in san.stdout
