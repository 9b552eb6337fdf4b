"""`kvtier up --redis-cluster 3` starts a cluster and a daemon and prints how to start a second
daemon on it; run as printed, the second daemon reads what the first was given."""

from __future__ import annotations

import os
import shlex
import signal
import subprocess
import sys
from collections.abc import Iterator

import numpy as np
import pytest

from kvtier.procs.redis import free_port
from kvtier_client import KVTierClient, Page

from .helpers import wait_until


def _env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("KVTIER_")}
    env.update(extra)
    return env


def _wait_line(proc: subprocess.Popen[str], prefix: str, lines: list[str]) -> str:
    assert proc.stdout is not None
    for line in proc.stdout:
        lines.append(line)
        if line.startswith(prefix):
            return line
    raise AssertionError(f"exited {proc.wait()} before {prefix!r}:\n{''.join(lines)}")


@pytest.fixture()
def procs() -> Iterator[list[subprocess.Popen[str]]]:
    started: list[subprocess.Popen[str]] = []
    yield started
    for p in started:
        if p.poll() is None:
            p.send_signal(signal.SIGTERM)
            try:
                p.wait(30)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()


def test_up_with_a_cluster_and_a_second_daemon(procs: list[subprocess.Popen[str]]) -> None:
    port = free_port()
    up = subprocess.Popen(
        [sys.executable, "-m", "kvtier.cli", "up", "--redis-cluster", "3"],
        env=_env(KVTIER_GRPC_PORT=str(port), KVTIER_HTTP_PORT=str(free_port()),
                 KVTIER_DEVICE="cpu", KVTIER_POLICY__NAME="lru"),
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    procs.append(up)
    lines: list[str] = []
    cluster_line = _wait_line(up, "kvtier: Redis Cluster", lines)
    assert "3 primaries, 1 replica(s) each" in cluster_line
    command = _wait_line(up, "kvtier: a second daemon on this cluster:", lines)
    _wait_line(up, "kvtier: ready", lines)
    words = shlex.split(command.split(":", 2)[2])
    assert words[-2:] == ["kvtier", "serve"]
    env = dict(w.split("=", 1) for w in words[:-2])
    assert env["KVTIER_REDIS__CLUSTER"] == "true" and env["KVTIER_REDIS__SHARE_PUTS"] == "true"
    second_port = free_port()  # the printed ports may be taken on a shared test machine
    env.update(KVTIER_GRPC_PORT=str(second_port), KVTIER_HTTP_PORT=str(free_port()),
               KVTIER_DEVICE="cpu")
    second = subprocess.Popen([sys.executable, "-m", "kvtier.cli", "serve"],
                              env=_env(**env), stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT, text=True)
    procs.append(second)
    _wait_line(second, "kvtier: ready", [])
    rng = np.random.default_rng(0)
    k, v = (rng.standard_normal((2, 16, 2, 64)).astype(np.float16) for _ in range(2))
    with KVTierClient(f"127.0.0.1:{port}", "up") as a, \
            KVTierClient(f"127.0.0.1:{second_port}", "up") as b:
        assert a.put([b"p0"], [Page(k, v, start_position=64)]) == ["stored"]
        wait_until(lambda: b.lookup([b"p0"]).tiers == ("remote",), what="read on the second")
        got = b.get([b"p0"])[0]
        assert got is not None and got.precision == 4
    up.send_signal(signal.SIGTERM)
    out, _ = up.communicate(timeout=60)
    assert up.returncode == 0 and "kvtier: stopped" in out
