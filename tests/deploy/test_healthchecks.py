"""The compose healthcheck commands, run as they are against real servers on free ports.

Inside a container they run in the kvtier image; here they run with this interpreter, which
has the same packages. Only the fixed port in each command is swapped for the test server's.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from kvtier.admin.server import serve_http
from kvtier.config import Settings
from kvtier.store.policy import LRUPolicy
from kvtier.store.store import TierStore
from kvtier.transport.context import DaemonContext, Readiness
from kvtier.transport.policy.service import make_policy_server

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def services() -> dict[str, Any]:
    exe = shutil.which("docker-compose")
    if exe is None:
        pytest.skip("docker-compose is not installed")
    env = {k: v for k, v in os.environ.items() if not k.startswith("KVTIER_")}
    env["KVTIER_ADMIN_TOKEN"] = "t"
    env["KVTIER_POLICY__TOKEN"] = "p"
    out = subprocess.run([exe, "config"], cwd=ROOT, env=env, capture_output=True, text=True,
                         timeout=60, check=True)
    resolved: dict[str, Any] = yaml.safe_load(out.stdout)["services"]
    return resolved


def run_check(service: dict[str, Any], fixed_port: int, port: int) -> int:
    test = service["healthcheck"]["test"]
    assert test[0] == "CMD" and test[1] == "python"
    argv = [sys.executable] + [a.replace(str(fixed_port), str(port)) for a in test[2:]]
    assert any(str(port) in a for a in argv[1:]), "the command names its port"
    return subprocess.run(argv, capture_output=True, timeout=30).returncode


@pytest.fixture()
def daemon_context() -> Iterator[DaemonContext]:
    settings = Settings(http_port=0, grpc_port=0, device="cpu", admin_token="t")
    store = TierStore(settings)
    store.start(mover=False)
    try:
        yield DaemonContext(settings=settings, store=store)
    finally:
        store.close()


def test_daemon_healthcheck_follows_readiness(
    services: dict[str, Any], daemon_context: DaemonContext
) -> None:
    server, port = serve_http(daemon_context, "127.0.0.1", 0)
    try:
        svc = services["kvtier-daemon"]
        daemon_context.health.set(Readiness.STARTING)
        assert run_check(svc, 8080, port) != 0
        daemon_context.health.set(Readiness.SERVING)
        assert run_check(svc, 8080, port) == 0
        daemon_context.health.set(Readiness.DRAINING)
        assert run_check(svc, 8080, port) != 0
    finally:
        server.stop(0.5)
    assert run_check(svc, 8080, port) != 0  # nothing listening


def test_policy_healthcheck_against_the_policy_service(services: dict[str, Any]) -> None:
    server, port, _servicer = make_policy_server(LRUPolicy(), "127.0.0.1", 0)
    server.start()
    svc = services["kvtier-policy"]
    try:
        assert run_check(svc, 50052, port) == 0
    finally:
        server.stop(0).wait()
    assert run_check(svc, 50052, port) != 0
