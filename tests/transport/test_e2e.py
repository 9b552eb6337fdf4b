"""End to end over a real gRPC server on port 0, a real TierStore and a real redis-server."""

from __future__ import annotations

import time

import numpy as np
import pytest

from kvtier.procs.redis import RedisProcess
from kvtier.daemon import Daemon
from kvtier_client import KVTierClient, prefix_keys

from .conftest import DaemonFactory, make_kv, make_page, tiny_tiers, wait_for


def test_put_get_roundtrip_is_bit_exact_from_hot(client: KVTierClient) -> None:
    keys = prefix_keys(list(range(48)), 16, "tenant-a")
    pages = [make_page(i, start_position=16 * i) for i in range(3)]
    assert client.put(keys, pages) == ["stored"] * 3
    assert client.put(keys[:1], pages[:1]) == ["exists"]
    got = client.get(keys + [b"absent"])
    assert got[3] is None
    for page, g in zip(pages, got[:3]):
        assert g is not None and g.tier == "hot" and g.precision == 16
        assert g.dtype == "float16" and g.shape == page.k.shape
        assert np.array_equal(g.k, page.k) and np.array_equal(g.v, page.v)
    assert [g.start_position for g in got[:3] if g] == [0, 16, 32]


@pytest.mark.parametrize("shm", [False, True])
def test_a_put_after_a_delete_reuses_the_deleted_pages_buffer(daemon: Daemon, shm: bool) -> None:
    pool = daemon.context.buffers
    client = KVTierClient(daemon.grpc_address, "tenant-a", shared_memory=shm, lend_bytes=0)
    client.put([b"first"], [make_page(1)])
    client.delete([b"first"])
    hits = pool.hits
    page = make_page(2)
    assert client.put([b"second"], [page]) == ["stored"]
    assert pool.hits == hits + 1  # the buffer "first" had, with nothing of it showing
    got = client.get([b"second", b"first"])
    assert got[1] is None and got[0] is not None
    assert np.array_equal(got[0].k, page.k) and np.array_equal(got[0].v, page.v)
    client.close()


def test_the_buffer_pool_size_is_the_configured_one(make_daemon: DaemonFactory) -> None:
    pool = make_daemon(host_buffer_pool_bytes=0).context.buffers  # off, and its reserve too
    assert (pool.max_free_bytes, pool.reserve_bytes) == (0, 0)
    pool = make_daemon(host_buffer_pool_bytes=1 << 20).context.buffers
    assert (pool.max_free_bytes, pool.reserve_bytes) == (1 << 20, 1 << 19)  # half by default
    pool = make_daemon(host_buffer_pool_bytes=1 << 20,
                       host_buffer_reserve_bytes=1 << 18).context.buffers
    assert pool.reserve_bytes == 1 << 18
    assert make_daemon().context.buffers.reserve_bytes == 32 << 20


def test_namespaces_are_isolated(client: KVTierClient) -> None:
    client.put([b"shared-key"], [make_page(1)])
    assert client.get([b"shared-key"], namespace="tenant-b") == [None]
    assert client.get([b"shared-key"])[0] is not None


def test_torch_out_and_bfloat16(client: KVTierClient) -> None:
    torch = pytest.importorskip("torch")
    k = torch.randn(2, 16, 2, 64, dtype=torch.bfloat16)
    v = torch.randn(2, 16, 2, 64, dtype=torch.bfloat16)
    client.put([b"bf"], [(k, v, 5)])
    raw = client.get([b"bf"])[0]
    assert raw is not None and raw.dtype == "bfloat16"
    assert raw.k.data == k.view(torch.int16).numpy().tobytes()  # RawTensor without torch out
    t = client.get([b"bf"], as_torch=True)[0]
    assert t is not None and t.k.dtype == torch.bfloat16 and t.start_position == 5
    assert torch.equal(t.k, k) and torch.equal(t.v, v)


def _wait_for_tiers(c: KVTierClient, keys: list[bytes], want: set[str]) -> list[str | None]:
    """The tiers of ``keys`` once ``want`` are all used and the mover has settled."""
    deadline = time.monotonic() + 10
    last: list[str | None] = []
    while True:
        tiers = list(c.lookup(keys).tiers)
        if (want <= set(tiers) and tiers == last) or time.monotonic() > deadline:
            return tiers
        last = tiers
        time.sleep(0.1)


def test_demotion_through_every_tier_and_back(make_daemon: DaemonFactory,
                                              redis_url: str) -> None:
    d = make_daemon(tiers=tiny_tiers(with_redis=True), redis={"url": redis_url})
    with KVTierClient(d.grpc_address, "e2e", timeout_s=20) as c:
        kv = [make_kv(i) for i in range(8)]
        keys = [b"page-%d" % i for i in range(8)]
        for key, (k, v) in zip(keys, kv):  # one at a time: older pages demote first
            assert c.put([key], [(k, v, 0)]) == ["stored"]
        tiers = _wait_for_tiers(c, keys, {"hot", "warm", "cold", "remote"})
        assert {"hot", "warm", "cold", "remote"} <= set(tiers), tiers
        got = c.get(keys)
        bounds = {"hot": 0.0, "warm": 1 / 255, "cold": 1 / 15, "remote": 1 / 15}
        precision = {"hot": 16, "warm": 8, "cold": 4, "remote": 4}
        for (k, v), g in zip(kv, got):
            assert g is not None
            assert g.precision <= precision[g.tier]
            for want, have in ((k, g.k), (v, g.v)):
                err = np.abs(want.astype(np.float32) - have.astype(np.float32)).max()
                span = float(want.max() - want.min())
                bound = bounds["hot" if g.precision == 16 else
                               "warm" if g.precision == 8 else "cold"] * span * 1.01 + 2e-3
                assert err <= bound, (g.tier, g.precision, err, bound)
        stats = c.stats()
        assert stats.redis_up and [t.name for t in stats.tiers] == ["hot", "warm", "cold",
                                                                   "remote"]
        assert sum(t.pages for t in stats.tiers) == 8
        assert sum(t.demotions for t in stats.tiers) >= 3
        assert stats.gets >= 8 and stats.puts == 8


def test_lookup_of_partly_present_chain(client: KVTierClient) -> None:
    keys = prefix_keys(list(range(80)), 16, "tenant-a")
    client.put(keys[:2] + keys[3:4], [make_page(i) for i in (0, 1, 3)])
    res = client.lookup(keys)
    assert res.prefix_length == 2
    assert res.tiers == ("hot", "hot", None, "hot", None)


def test_promote_moves_a_page_up(make_daemon: DaemonFactory) -> None:
    d = make_daemon(tiers=tiny_tiers(with_redis=False, hot_room=True))
    with KVTierClient(d.grpc_address, "promo") as c:
        keys = [b"p%d" % i for i in range(5)]
        for i, key in enumerate(keys):
            c.put([key], [make_page(i)])
        tiers = _wait_for_tiers(c, keys, {"warm"})
        low = [k for k, t in zip(keys, tiers) if t == "warm"]
        assert low, tiers
        assert c.promote(low[:1], "hot") == [True]
        assert c.lookup(low[:1]).tiers == ("hot",)
        g = c.get(low[:1])[0]
        assert g is not None and g.tier == "hot" and g.precision < 16  # bits lost stay lost
        assert c.promote([b"never-put"], "hot") == [False]


def test_delete(client: KVTierClient) -> None:
    client.put([b"a", b"b"], [make_page(1), make_page(2)])
    assert client.delete([b"a", b"zz"]) == 1
    assert client.get([b"a", b"b"])[0] is None
    assert client.delete([b"a"]) == 0


def test_stats_and_rpc_stats(daemon: Daemon, client: KVTierClient) -> None:
    client.put([b"s"], [make_page(3)])
    client.get([b"s"])
    s = client.stats()
    assert s.tiers[0].name == "hot" and s.tiers[0].pages == 1
    assert s.tiers[0].bytes >= 16 * 1024 and s.puts == 1 and s.gets == 1
    assert s.uptime_s >= 0 and s.policy
    get = "DataGet" if client.uses_data_channel else "Get"  # counted once its answer is sent
    assert wait_for(lambda: (get, "OK") in daemon.context.rpc_stats.totals(), 2.0)
    totals = daemon.context.rpc_stats.totals()
    assert totals[(get, "OK")].calls == 1 and totals[(get, "OK")].bytes_in > 0
    put_calls = sum(t.calls for (m, code), t in totals.items()
                    if m.startswith(("Put", "DataPut")))
    assert put_calls == 1


def test_health_and_reflection(daemon: Daemon) -> None:
    import grpc
    from grpc_health.v1 import health_pb2, health_pb2_grpc
    from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

    with grpc.insecure_channel(daemon.grpc_address) as ch:
        h = health_pb2_grpc.HealthStub(ch).Check(
            health_pb2.HealthCheckRequest(service="kvtier.v1.CacheService"), timeout=5)
        assert h.status == health_pb2.HealthCheckResponse.SERVING
        stub = reflection_pb2_grpc.ServerReflectionStub(ch)
        reply = next(stub.ServerReflectionInfo(iter([
            reflection_pb2.ServerReflectionRequest(list_services="")]), timeout=5))
        names = {s.name for s in reply.list_services_response.service}
        assert {"kvtier.v1.CacheService", "grpc.health.v1.Health"} <= names


def test_redis_outage_degrades_to_misses(make_daemon: DaemonFactory,
                                         private_redis: RedisProcess) -> None:
    d = make_daemon(tiers=tiny_tiers(with_redis=True),
                    redis={"url": private_redis.url, "socket_timeout_s": 0.2,
                           "connect_timeout_s": 0.2})
    with KVTierClient(d.grpc_address, "outage", timeout_s=20) as c:
        keys = [b"o%d" % i for i in range(8)]
        for i, key in enumerate(keys):
            c.put([key], [make_page(i)])
        tiers = _wait_for_tiers(c, keys, {"remote"})
        remote = [k for k, t in zip(keys, tiers) if t == "remote"]
        memory = [k for k, t in zip(keys, tiers) if t in ("hot", "warm", "cold")]
        assert remote and memory
        private_redis.stop()
        t0 = time.monotonic()
        got = c.get(remote + memory)
        assert time.monotonic() - t0 < 5  # no hang
        assert got[:len(remote)] == [None] * len(remote)  # a miss, not an error
        assert all(g is not None for g in got[len(remote):])
        assert not c.stats().redis_up
