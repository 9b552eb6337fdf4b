"""`kvtier serve` as a real process: SIGKILL + restart on the same Redis, and SIGTERM --drain.

The first life is a `kvtier serve` process (signals are what is tested); the second is a fresh
daemon in this process, which reads nothing but Redis, to keep the tests quick.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import pytest

from kvtier.procs.redis import RedisProcess, free_port
from kvtier.daemon import Daemon
from kvtier_client import KVTierClient

from .conftest import DaemonFactory, make_kv, tiny_tiers


class Served:
    def __init__(self, proc: subprocess.Popen[str], address: str) -> None:
        self.proc, self.address = proc, address


def _config(redis_url: str) -> dict[str, object]:
    return {
        "tiers": [t.model_dump(mode="json") for t in tiny_tiers(with_redis=True)],
        "redis": {"url": redis_url},
        "mover_interval_s": 0.01,
    }


@pytest.fixture()
def restarted(make_daemon: DaemonFactory, private_redis: RedisProcess) -> Callable[[], Daemon]:
    """The second life: a fresh daemon (in process, to keep the test quick) on the same Redis."""
    return lambda: make_daemon(**_config(private_redis.url))


@pytest.fixture()
def serve(tmp_path: Path, private_redis: RedisProcess) -> Iterator[object]:
    procs: list[subprocess.Popen[str]] = []
    config = tmp_path / "kvtier.json"
    config.write_text(json.dumps(_config(private_redis.url)))

    def start(*extra: str) -> Served:
        port = free_port()
        env = dict(os.environ, KVTIER_GRPC_PORT=str(port), KVTIER_HTTP_PORT=str(free_port()))
        proc = subprocess.Popen(
            [sys.executable, "-m", "kvtier.cli", "serve", "--config", str(config), *extra],
            env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        procs.append(proc)
        assert proc.stdout is not None
        lines = []
        for line in proc.stdout:
            lines.append(line)
            if line.startswith("kvtier: ready"):
                return Served(proc, f"127.0.0.1:{port}")
        raise AssertionError(f"daemon exited {proc.wait()}:\n{''.join(lines)}")

    yield start
    for p in procs:
        if p.poll() is None:
            p.kill()
        p.wait()


def _settled(c: KVTierClient, keys: list[bytes]) -> list[str | None]:
    last: list[str | None] = []
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        tiers = list(c.lookup(keys).tiers)
        if "remote" in tiers and tiers == last:
            break
        last = tiers
        time.sleep(0.1)
    return last


def test_sigkilled_daemon_restarted_on_same_redis_serves_redis_tier_pages(
        serve: object, restarted: Callable[[], Daemon]) -> None:
    first = serve()  # type: ignore[operator]
    kv = [make_kv(i) for i in range(8)]
    keys = [b"r%d" % i for i in range(8)]
    with KVTierClient(first.address, "restart") as c:
        for key, (k, v) in zip(keys, kv):
            c.put([key], [(k, v, 4)])
        tiers = _settled(c, keys)
    remote = [i for i, t in enumerate(tiers) if t == "remote"]
    assert remote, tiers
    first.proc.send_signal(signal.SIGKILL)
    first.proc.wait()
    second = restarted()
    with KVTierClient(second.grpc_address, "restart") as c:
        got = c.get([keys[i] for i in remote])
        for i, g in zip(remote, got):
            assert g is not None and g.tier == "remote" and g.precision == 4
            assert g.start_position == 4
            k = kv[i][0].astype(np.float32)
            assert np.abs(g.k.astype(np.float32) - k).max() <= (k.max() - k.min()) / 15 * 1.01


def test_sigterm_with_drain_keeps_memory_pages(serve: object,
                                               restarted: Callable[[], Daemon]) -> None:
    first = serve("--drain")  # type: ignore[operator]
    kv = [make_kv(i) for i in range(2)]
    with KVTierClient(first.address, "drain") as c:
        c.put([b"d0", b"d1"], [(k, v) for k, v in kv])
        assert set(c.lookup([b"d0", b"d1"]).tiers) <= {"hot", "warm", "cold"}  # memory only
    first.proc.send_signal(signal.SIGTERM)
    out, _ = first.proc.communicate(timeout=30)
    assert first.proc.returncode == 0, out
    assert "drained 2 memory-tier pages" in out and "stopped" in out
    second = restarted()
    with KVTierClient(second.grpc_address, "drain") as c:
        assert c.lookup([b"d0", b"d1"]).tiers == ("remote", "remote")
        assert all(g is not None for g in c.get([b"d0", b"d1"]))
