"""Soak (slow): two daemons under read and write load while every primary of the cluster is
killed in turn, fails over and comes back as a replica."""

from __future__ import annotations

import threading
import time

import pytest
import redis

from kvtier.procs.daemon import DaemonProcess
from kvtier.procs.redis_cluster import RedisCluster
from kvtier_client import KVTierClient

from .helpers import wait_until
from .load import Load
from .test_daemons import DEADLINE_S, config, put_shared

pytestmark = pytest.mark.slow


def test_every_primary_killed_in_turn_under_load(cluster: RedisCluster, cluster_url: str) -> None:
    a, b = DaemonProcess(config(cluster_url)), DaemonProcess(config(cluster_url))
    threads = [threading.Thread(target=d.start) for d in (a, b)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    try:
        keys = [b"soak-%d" % i for i in range(96)]
        put_shared(a, "soak", keys, list(range(96)))
        with KVTierClient(b.address, "soak") as cb:
            wait_until(lambda: cb.lookup(keys).prefix_length == 96, what="shared")
        load = Load(DEADLINE_S)
        seeds = dict(zip(keys, range(96), strict=True))
        for n, d in enumerate((a, b, b)):
            load.reader(d.address, "soak", seeds, n)
        for n, d in enumerate((a, b)):
            load.writer(d.address, f"w{n}", 5000)
        try:
            for victim in list(cluster.primary_nodes()):
                time.sleep(3)
                victim.kill()
                cluster.wait_failover(victim)
                time.sleep(3)
                victim.start()  # back as a replica of whoever took its slots over
                cluster.wait_healthy()
                for n in cluster.primary_nodes():
                    redis.Redis(host=n.host, port=n.port).execute_command("WAIT", 1, 2000)
        finally:
            load.stop()
        load.check()
        with KVTierClient(b.address, "soak") as cb:  # replicated before each kill: all back
            wait_until(lambda: sum(g is not None for g in cb.get(keys)) >= 90,
                       what="served again")
    finally:
        a.close()
        b.close()
