"""Two `kvtier serve` processes on one Redis Cluster (3 primaries, 3 replicas): a page written on
A is read on B, a promotion on B leaves it shared, a primary killed under load fails over with
bounded latency and no wrong data, and a SIGKILLed daemon restarted serves the shared tier."""

from __future__ import annotations

import json
import threading
import time
import urllib.request
from collections.abc import Iterator
from typing import Any

import pytest
import redis

from kvtier.config import MiB
from kvtier.procs.daemon import DaemonProcess
from kvtier.procs.redis_cluster import RedisCluster
from kvtier.store.store import TierStore
from kvtier_client import KVTierClient, Page

from .helpers import wait_until
from .load import Load, close_enough, kv

PAGE = 2 * 2 * 16 * 2 * 64  # bytes of a page (load.SHAPE, float16)
DEADLINE_S = 2.0  # what a worker would give a call; every call must answer within it


def config(url: str) -> dict[str, Any]:
    tiers = [
        {"name": "hot", "medium": "device", "codec": "none", "capacity_bytes": 64 * PAGE},
        {"name": "cold", "medium": "host", "codec": "int4", "capacity_bytes": 64 * PAGE},
        {"name": "remote", "medium": "redis", "codec": "int4", "capacity_bytes": 64 * MiB},
    ]
    return {"tiers": tiers, "device": "cpu", "mover_interval_s": 0.01,
            "redis": {"url": url, "cluster": True, "prefix": "kvd", "share_puts": True,
                      "socket_timeout_s": 0.3, "connect_timeout_s": 0.3,
                      "retry_interval_s": 0.1}}


@pytest.fixture(scope="module")
def daemons(cluster: RedisCluster) -> Iterator[tuple[DaemonProcess, DaemonProcess]]:
    a, b = DaemonProcess(config(cluster.url)), DaemonProcess(config(cluster.url))
    try:
        threads = [threading.Thread(target=d.start) for d in (a, b)]  # side by side
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        for d in (a, b):
            if not d.alive:
                raise RuntimeError(f"daemon did not start: {d.log_tail()}")
        yield a, b
    finally:
        a.close()
        b.close()


def ready(d: DaemonProcess) -> dict[str, Any]:
    try:
        with urllib.request.urlopen(f"{d.http_url}/readyz", timeout=2) as r:
            body: dict[str, Any] = json.loads(r.read())
            return body
    except OSError:
        return {}


def put_shared(d: DaemonProcess, ns: str, keys: list[bytes], seeds: list[int]) -> None:
    with KVTierClient(d.address, ns) as c:
        c.put(keys, [Page(*kv(s), start_position=64) for s in seeds])


def test_written_on_a_read_on_b(cluster_url: str,
                                daemons: tuple[DaemonProcess, DaemonProcess]) -> None:
    a, b = daemons
    keys = [b"ab-%d" % i for i in range(16)]
    put_shared(a, "ab", keys, list(range(16)))
    with KVTierClient(b.address, "ab") as cb, KVTierClient(a.address, "ab") as ca:
        wait_until(lambda: cb.lookup(keys).prefix_length == 16, what="shared with b")
        assert ca.lookup(keys).tiers == ("hot",) * 16  # a keeps what it was given
        for i, g in enumerate(cb.get(keys)):
            assert g is not None and g.tier == "remote" and g.precision == 4
            assert close_enough(g.k, kv(i)[0]) and close_enough(g.v, kv(i)[1])


def test_promoted_on_b_still_shared(cluster: RedisCluster, cluster_url: str,
                                   daemons: tuple[DaemonProcess, DaemonProcess]) -> None:
    a, b = daemons
    keys = [b"pb-%d" % i for i in range(8)]
    put_shared(a, "pb", keys, list(range(100, 108)))
    with KVTierClient(b.address, "pb") as cb:
        wait_until(lambda: cb.lookup(keys).prefix_length == 8, what="shared with b")
        assert cb.promote(keys, "hot") == [True] * 8
        assert cb.lookup(keys).tiers == ("hot",) * 8
    third = TierStore(_store_settings(cluster_url))  # a third node, knowing nothing
    third.start(mover=False)
    try:
        got = third.get("pb", keys)
        assert all(g is not None and g.tier == "remote" for g in got)
    finally:
        third.close()


def _store_settings(url: str) -> Any:
    from kvtier.config import Settings

    return Settings(**config(url))


def test_primary_killed_under_load_fails_over(
        cluster: RedisCluster, cluster_url: str,
        daemons: tuple[DaemonProcess, DaemonProcess]) -> None:
    a, b = daemons
    keys = [b"fo-%d" % i for i in range(48)]
    seeds = list(range(200, 248))
    put_shared(a, "fo", keys, seeds)
    with KVTierClient(b.address, "fo") as cb:
        wait_until(lambda: cb.lookup(keys).prefix_length == 48, what="shared")
    for n in cluster.primary_nodes():  # the replicas have every page before the crash
        redis.Redis(host=n.host, port=n.port).execute_command("WAIT", 1, 2000)
    load = Load(DEADLINE_S)
    load.reader(b.address, "fo", dict(zip(keys, seeds, strict=True)), 1)
    load.reader(b.address, "fo", dict(zip(keys, seeds, strict=True)), 2)
    load.writer(a.address, "fo-new", 1000)
    try:
        time.sleep(0.5)
        victim = cluster.primary_of(f"kvd:fo:{{{keys[0].hex()}}}")
        victim.kill()
        wait_until(lambda: ready(b).get("redis") == "degraded", what="b reports degraded")
        body = ready(b)
        assert body["status"] == "ready" and body["degraded"] is True
        assert any(not s["up"] for s in body["redis_shards"])
        cluster.wait_failover(victim)
        wait_until(lambda: ready(b).get("redis") == "up", what="b healthy again")
        time.sleep(0.5)
    finally:
        load.stop()
    load.check()
    assert sum(load.misses) > 0  # the dead shard's keys were misses for a while
    with KVTierClient(b.address, "fo") as cb:  # and every page is served again, no restart
        wait_until(lambda: all(g is not None for g in cb.get(keys)), what="served again")


def test_sigkilled_daemon_restarted_serves_the_shared_tier(
        cluster_url: str, daemons: tuple[DaemonProcess, DaemonProcess]) -> None:
    a, b = daemons
    keys = [b"rs-%d" % i for i in range(24)]
    put_shared(a, "rs", keys[:12], list(range(300, 312)))
    put_shared(b, "rs", keys[12:], list(range(312, 324)))
    with KVTierClient(b.address, "rs") as cb:
        wait_until(lambda: cb.lookup(keys).prefix_length == 24, what="shared")
    a.kill()
    a.start()
    with KVTierClient(a.address, "rs") as ca:
        got = ca.get(keys)
        for i, g in enumerate(got):
            assert g is not None and g.tier == "remote", i
            assert close_enough(g.k, kv(300 + i)[0]) and close_enough(g.v, kv(300 + i)[1])
