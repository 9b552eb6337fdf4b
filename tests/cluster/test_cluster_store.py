"""Stores over a real Redis Cluster: slots, redirects, scripts, and one shard failing alone."""

from __future__ import annotations

import time
from collections.abc import Iterator
from typing import Any

import pytest
import redis

from kvtier.procs.redis_cluster import RedisCluster, key_slot
from kvtier.store.redis_shards import Shards
from kvtier.store.results import PutOutcome
from kvtier.store.store import TierStore

from .helpers import NS, int4_close, key, make_page, settings, wait_until


@pytest.fixture()
def stores() -> Iterator[list[TierStore]]:
    made: list[TierStore] = []
    yield made
    for s in made:
        s.close()


def start(made: list[TierStore], url: str, mover: bool = False, **kw: object) -> TierStore:
    store = TierStore(settings(url, **kw))  # type: ignore[arg-type]
    made.append(store)
    store.start(mover=mover)
    return store


def share(store: TierStore, n: int, first: int = 0) -> list[bytes]:
    keys = [key(i) for i in range(first, first + n)]
    store.put(NS, [(k, make_page(first + i)) for i, k in enumerate(keys)])
    assert store.demote(NS, keys, "remote") == [True] * n
    return keys


def rkey(k: bytes) -> str:
    return f"kvc:{NS}:{{{k.hex()}}}"


def test_pages_spread_over_every_shard_and_any_store_reads_them(
        cluster: RedisCluster, cluster_url: str, stores: list[TierStore]) -> None:
    a = start(stores, cluster_url)
    b = start(stores, cluster_url)  # attached before a wrote anything
    status = a.redis_status()
    assert status is not None and status.health.cluster
    keys = share(a, 30)
    per_node = [redis.Redis(host=n.host, port=n.port).dbsize() for n in cluster.primary_nodes()]
    assert len(per_node) == 3 and all(n > 0 for n in per_node) and sum(per_node) == 30
    exchanges: list[int] = []
    real = Shards._exchange

    def counted(self: Shards, groups: dict[str, Any], *args: Any) -> Any:
        exchanges.append(len(groups))
        return real(self, groups, *args)

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(Shards, "_exchange", counted)
        assert b.lookup(NS, keys).prefix_length == 30
        got = b.get(NS, keys)
    assert exchanges == [3, 3]  # one round trip each: one pipeline per shard, all at once
    for i, g in enumerate(got):
        assert g is not None and g.tier == "remote"
        assert int4_close(g.page.k, make_page(i).k) and int4_close(g.page.v, make_page(i).v)
    c = start(stores, cluster_url)  # the start-up scan covers every primary
    assert c.stats().tiers[1].pages == 30


def test_promoting_copies_and_a_delete_removes_everywhere(
        cluster_url: str, stores: list[TierStore]) -> None:
    a = start(stores, cluster_url)
    b = start(stores, cluster_url)
    keys = share(a, 6)
    assert b.promote(NS, keys, "hot") == [True] * 6
    assert b.lookup(NS, keys).tiers == ["hot"] * 6
    assert a.lookup(NS, keys).tiers == ["remote"] * 6  # the shared copies stayed
    # a's own copies come back after it forgot them: the view re-adopts its own writes
    assert a.promote(NS, keys[:1], "hot") == [True]
    assert a.delete(NS, keys[1:2]) == 1  # removes b's target page everywhere ...
    assert a.lookup(NS, keys[1:2]).tiers == [None]
    assert b.lookup(NS, keys[1:2]).tiers == ["hot"]  # ... but b's private memory copy
    fresh = start(stores, cluster_url)
    assert fresh.get(NS, keys[1:2]) == [None]
    assert all(g is not None for g in fresh.get(NS, keys[2:]))


def test_moved_and_ask_are_followed(cluster: RedisCluster, cluster_url: str,
                                    stores: list[TierStore]) -> None:
    a = start(stores, cluster_url)
    keys = share(a, 2)
    src = cluster.primary_of(rkey(keys[0]))
    dst = next(n for n in cluster.primary_nodes() if n.name != src.name)
    s_cli, d_cli = redis.Redis(host=src.host, port=src.port), redis.Redis(host=dst.host,
                                                                           port=dst.port)
    slot = key_slot(rkey(keys[0]))
    src_id, dst_id = (c.execute_command("CLUSTER", "MYID").decode() for c in (s_cli, d_cli))
    d_cli.execute_command("CLUSTER", "SETSLOT", slot, "IMPORTING", src_id)
    s_cli.execute_command("CLUSTER", "SETSLOT", slot, "MIGRATING", dst_id)
    s_cli.execute_command("MIGRATE", dst.host, dst.port, "", 0, 5000, "KEYS", rkey(keys[0]))
    got = a.get(NS, keys[:1])[0]  # mid-migration: the source answers ASK
    assert got is not None and int4_close(got.page.k, make_page(0).k)
    for c in (s_cli, d_cli):
        c.execute_command("CLUSTER", "SETSLOT", slot, "NODE", dst_id)
    wait_until(lambda: cluster.primary_of(rkey(keys[0])).name == dst.name, what="slot moved")
    got = a.get(NS, keys[:1])[0]  # the slot moved for good: MOVED, and the map is patched
    assert got is not None and int4_close(got.page.k, make_page(0).k)
    status = a.redis_status()
    assert status is not None
    counters = status.shards
    assert counters.ask >= 1 and counters.moved >= 1 and counters.unavailable == 0
    assert a.delete(NS, keys[:1]) == 1 and d_cli.exists(rkey(keys[0])) == 0
    s_cli.close()
    d_cli.close()


def test_scripts_are_loaded_where_a_node_lost_them(cluster: RedisCluster, cluster_url: str,
                                                   stores: list[TierStore]) -> None:
    a = start(stores, cluster_url)
    share(a, 6)  # the write script is loaded on every primary now
    for n in cluster.primary_nodes():
        redis.Redis(host=n.host, port=n.port).script_flush()
    keys = share(a, 6, first=6)  # NOSCRIPT on every node: loaded and sent again
    status = a.redis_status()
    assert status is not None
    assert status.shards.script_loads >= 3 and status.deletes.failures == 0
    assert a.lookup(NS, keys).prefix_length == 6


def test_one_dead_shard_misses_only_its_slots_and_serves_after_failover(
        cluster: RedisCluster, cluster_url: str, stores: list[TierStore]) -> None:
    a = start(stores, cluster_url, mover=True)
    keys = share(a, 30)
    for n in cluster.primary_nodes():  # every write reached the replicas
        redis.Redis(host=n.host, port=n.port).execute_command("WAIT", 1, 2000)
    victim = cluster.primary_of(rkey(keys[0]))
    on_victim = {k for k in keys if cluster.primary_of(rkey(k)).name == victim.name}
    fresh = start(stores, cluster_url)  # a view with nothing in memory
    victim.kill()
    t0 = time.monotonic()
    got = fresh.get(NS, keys)
    assert time.monotonic() - t0 < 1.0  # refused at once: no hang
    for k, g in zip(keys, got, strict=True):
        assert (g is None) == (k in on_victim), k
    t0 = time.monotonic()
    assert [t is None for t in fresh.lookup(NS, keys).tiers] == [k in on_victim for k in keys]
    assert time.monotonic() - t0 < 0.2  # the dead shard is not asked again
    status = fresh.redis_status()
    assert status is not None and status.health.degraded
    assert 5000 < status.health.slots_down < 6000
    doomed = sorted(on_victim)[:2]  # deleted while their shard is down: kept, sent later
    assert fresh.delete(NS, doomed) == 2  # its view had them (start-up scan)
    status = fresh.redis_status()
    assert status is not None and (status.deletes.failures, status.deletes.pending) == (2, 2)
    cluster.wait_failover(victim)
    fresh.start(mover=True)  # its mover refreshes the slot map while a shard is down
    kept = [k for k in keys if k not in doomed]
    wait_until(lambda: fresh.lookup(NS, kept).prefix_length == 28, what="served after failover")
    status = fresh.redis_status()
    assert status is not None and status.health.state == "up"
    assert all(g is not None for g in fresh.get(NS, kept))
    wait_until(lambda: fresh.redis_status().deletes.pending == 0,  # type: ignore[union-attr]
               what="pending deletes sent")
    assert fresh.lookup(NS, doomed).tiers == [None, None]  # gone from the shared tier ...
    assert a.lookup(NS, doomed).tiers == [None, None]  # ... and from a's view of it
    # and writes to every slot work again, with no restart: a, which had not met the dead
    # node, fails its first write there at once and its mover then finds the new primary
    more = [key(i) for i in range(100, 130)]
    a.put(NS, [(k, make_page(i)) for i, k in enumerate(more)])
    wait_until(lambda: all(a.demote(NS, more, "remote")), what="writes after failover")
    assert fresh.lookup(NS, more).prefix_length == 30


def test_shared_puts_reach_the_other_daemons_while_hot_here(
        cluster_url: str, stores: list[TierStore]) -> None:
    a = start(stores, cluster_url, mover=True, share_puts=True)
    b = start(stores, cluster_url, mover=True, share_puts=True)
    c = start(stores, cluster_url, mover=True, share_puts=True)  # knows nothing yet
    keys = [key(i) for i in range(12)]
    a.put(NS, [(k, make_page(i)) for i, k in enumerate(keys)])
    wait_until(lambda: b.lookup(NS, keys).prefix_length == 12, what="pages shared")
    assert a.lookup(NS, keys).tiers == ["hot"] * 12  # a keeps them where they were put
    got = b.get(NS, keys)
    assert all(g is not None and g.tier == "remote" for g in got)
    assert b.put(NS, [(keys[0], make_page(0))]) == [PutOutcome.EXISTS]  # b knows it now
    c.put(NS, [(k, make_page(i)) for i, k in enumerate(keys)])  # the same pages, put on c
    wait_until(lambda: c.redis_status().sharing.present == 12,  # type: ignore[union-attr]
               what="c found them shared already")
    assert c.redis_status().sharing.shared == 0  # type: ignore[union-attr]
    assert a.delete(NS, keys[:3]) == 3
    assert c.lookup(NS, keys[:3]).tiers == ["hot"] * 3  # c's own puts stay in its memory
    fresh = start(stores, cluster_url)
    assert fresh.lookup(NS, keys).tiers == [None] * 3 + ["remote"] * 9


def test_capacity_is_enforced_by_redis_once_for_the_cluster(
        cluster: RedisCluster, cluster_url: str, stores: list[TierStore]) -> None:
    import torch

    from kvtier.types import Page

    def big(i: int) -> Page:  # 64 KiB as put, about 17 KiB in the Redis tier
        g = torch.Generator().manual_seed(i)
        return Page(k=torch.randn((1, 256, 1, 64), generator=g).half(),
                    v=torch.randn((1, 256, 1, 64), generator=g).half(), start_position=64)

    primaries = [redis.Redis(host=n.host, port=n.port) for n in cluster.primary_nodes()]
    limits = [int(c.info("memory")["used_memory"]) + (2 << 20) for c in primaries]
    try:
        for c, limit in zip(primaries, limits, strict=True):
            c.config_set("maxmemory", limit)
            c.config_set("maxmemory-policy", "allkeys-lru")
        a = start(stores, cluster_url, hot_pages=1 << 16)  # 16 MiB: puts stay until demoted
        b = start(stores, cluster_url, remote_pages=8)  # a tiny view
        keys = [key(i) for i in range(1200)]  # about 20 MiB: over three times the cluster
        for lo in range(0, len(keys), 100):
            chunk = keys[lo:lo + 100]
            a.put(NS, [(k, big(lo + i)) for i, k in enumerate(chunk)])
            assert a.demote(NS, chunk, "remote") == [True] * len(chunk)  # no write refused
            b.rebalance()  # b's view of what it reads stays tiny ...
            assert b.lookup(NS, chunk[-5:]).prefix_length == 5  # ... the newest are there
        evicted = sum(int(c.info("stats")["evicted_keys"]) for c in primaries)
        held = sum(int(c.dbsize()) for c in primaries)
        assert evicted > 0 and held + evicted == len(keys)  # Redis evicted, nobody deleted
        for c, limit in zip(primaries, limits, strict=True):  # evicted before each write:
            mem = c.info("memory")  # over by one page at most, replication buffers aside
            assert int(mem["used_memory"]) - int(mem["mem_not_counted_for_evict"]) <= (
                limit + (64 << 10))
        status = a.redis_status()
        assert status is not None and status.deletes.failures == 0
        assert b.stats().tiers[1].pages <= 8
    finally:
        for c in primaries:
            c.config_set("maxmemory", 0)
            c.close()


def test_a_hung_primary_costs_one_timeout_and_comes_back_by_itself(
        cluster: RedisCluster, cluster_url: str, stores: list[TierStore]) -> None:
    a = start(stores, cluster_url, mover=True)
    keys = share(a, 30)
    victim = cluster.primary_of(rkey(keys[0]))
    on_victim = {k for k in keys if cluster.primary_of(rkey(k)).name == victim.name}
    victim.pause()  # accepts connections, answers nothing (shorter than the node timeout)
    try:
        t0 = time.monotonic()
        got = a.get(NS, keys)
        assert time.monotonic() - t0 < 1.0  # one socket timeout (0.3 s), not a hang
        assert [g is None for g in got] == [k in on_victim for k in keys]
        t0 = time.monotonic()
        assert a.lookup(NS, keys).prefix_length == 0  # keys[0] is on the hung shard
        assert time.monotonic() - t0 < 0.1  # marked down: not asked again
    finally:
        victim.resume()
    wait_until(lambda: a.lookup(NS, keys).prefix_length == 30, what="the node answers again")
    status = a.redis_status()
    assert status is not None and status.health.state == "up"
    assert status.shards.node_failures == 1
