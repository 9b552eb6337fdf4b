"""Soak (slow): two daemons under read and write load while every primary of the cluster is
killed in turn, fails over and comes back as a replica."""

from __future__ import annotations

import threading
import time

import numpy as np
import pytest
import redis

from kvtier.procs.daemon import DaemonProcess
from kvtier.procs.redis_cluster import RedisCluster
from kvtier_client import KVTierClient, Page

from .helpers import wait_until
from .test_daemons import DEADLINE_S, close_enough, config, kv, put_shared

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
        stop = threading.Event()
        latencies: list[float] = []
        errors: list[BaseException] = []

        def reader(d: DaemonProcess, seed: int) -> None:
            rng = np.random.default_rng(seed)
            with KVTierClient(d.address, "soak", timeout_s=DEADLINE_S) as c:
                while not stop.is_set():
                    idx = [int(i) for i in rng.choice(len(keys), 8, replace=False)]
                    t0 = time.monotonic()
                    try:
                        got = c.get([keys[i] for i in idx])
                    except Exception as e:  # noqa: BLE001 - any error fails the test
                        errors.append(e)
                        return
                    latencies.append(time.monotonic() - t0)
                    for i, g in zip(idx, got, strict=True):
                        if g is not None and not close_enough(g.k, kv(i)[0]):
                            errors.append(AssertionError(f"wrong data for {keys[i]!r}"))

        def writer(d: DaemonProcess, ns: str) -> None:
            i = 0
            with KVTierClient(d.address, ns, timeout_s=DEADLINE_S) as c:
                while not stop.is_set():
                    t0 = time.monotonic()
                    try:
                        c.put([b"w-%d" % i], [Page(*kv(5000 + i), start_position=64)])
                    except Exception as e:  # noqa: BLE001
                        errors.append(e)
                        return
                    latencies.append(time.monotonic() - t0)
                    i += 1

        load = [threading.Thread(target=reader, args=(d, s)) for s, d in enumerate((a, b, b))]
        load += [threading.Thread(target=writer, args=(d, f"w{n}")) for n, d in enumerate((a, b))]
        for t in load:
            t.start()
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
            stop.set()
            for t in load:
                t.join(30)
        assert not errors, errors[:3]
        assert latencies and max(latencies) < DEADLINE_S
        with KVTierClient(b.address, "soak") as cb:  # replicated before each kill: all back
            wait_until(lambda: sum(g is not None for g in cb.get(keys)) >= 90,
                       what="served again")
    finally:
        a.close()
        b.close()
